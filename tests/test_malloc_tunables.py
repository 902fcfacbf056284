"""fatq.cli.tune_malloc: the entry points restart once, with glibc's malloc tunables, keeping their arguments; and
the tunables keep a large block mapped from one allocation to the next."""

import os
import subprocess
import sys
import textwrap

import pytest

from fatq import cli

# A stand-in entry point: prints what the (possibly restarted) process sees.
SCRIPT = textwrap.dedent("""
    import os, sys
    from fatq import cli
    print("started", flush=True)
    cli.tune_malloc(keep_mapped=os.environ.get("TEST_KEEP_MAPPED_ARG", "1") == "1")
    print(repr(sys.argv[1:]), os.environ.get("GLIBC_TUNABLES", ""), cli.huge_pages_enabled(),
          cli.buffers_kept_mapped())
""")

KEEP = ":".join(cli.KEEP_MAPPED_TUNABLES)
ARGS = "['--config.x=1', 'a b']"


def _run(tmp_path, env_updates, script=SCRIPT):
  path = tmp_path / "entry.py"
  path.write_text(script)
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FATQ_HUGE_PAGES", "FATQ_KEEP_MAPPED")}
  env.update(env_updates)
  out = subprocess.run([sys.executable, "-u", str(path), "--config.x=1", "a b"], capture_output=True, text=True,
                       env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.splitlines()


def _huge_pages_apply() -> bool:
  return cli._huge_page_tunable_applies()  # noqa: SLF001 - the condition under test


# what huge_pages_enabled() says in a process without the tunable: THP mode "always" needs none
ALWAYS = cli._thp_mode() == "always"  # noqa: SLF001


needs_glibc = pytest.mark.skipif(not cli._glibc_at_least(2, 26), reason="no glibc tunables here")  # noqa: SLF001


@needs_glibc
def test_restarts_once_with_the_tunables_and_the_same_arguments(tmp_path):
  lines = _run(tmp_path, {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=4"})
  huge = ":glibc.malloc.hugetlb=1" if _huge_pages_apply() else ""
  # "started" twice: the first process printed it, then exec'd itself; the second one did not restart
  enabled = ALWAYS or _huge_pages_apply()
  assert lines == ["started", "started", f"{ARGS} glibc.malloc.tcache_count=4:{KEEP}{huge} {enabled} True"]


@needs_glibc
def test_opt_outs_and_already_set(tmp_path):
  lines = _run(tmp_path, {"FATQ_HUGE_PAGES": "0", "FATQ_KEEP_MAPPED": "0"})
  assert lines == ["started", f"{ARGS}  {ALWAYS} False"]  # nothing to add: no restart
  lines = _run(tmp_path, {"FATQ_HUGE_PAGES": "0", "TEST_KEEP_MAPPED_ARG": "0"})
  assert lines == ["started", f"{ARGS}  {ALWAYS} False"]
  lines = _run(tmp_path, {"FATQ_HUGE_PAGES": "0"})
  assert lines == ["started", "started", f"{ARGS} {KEEP} {ALWAYS} True"]
  # a tunable the user set is left as it is, and nothing is added twice
  lines = _run(tmp_path, {"FATQ_HUGE_PAGES": "0", "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
  assert lines[-1] == f"{ARGS} glibc.malloc.arena_max=4:{KEEP.split(':', 1)[1]} {ALWAYS} False"
  tunables = lines[-1].removeprefix(ARGS + " ").split()[0]
  lines = _run(tmp_path, {"GLIBC_TUNABLES": tunables})
  if _huge_pages_apply():  # restarts only to add the huge-page tunable
    assert lines[:-1] == ["started", "started"] and lines[-1].removeprefix(ARGS + " ").split()[0] == (
        tunables + ":glibc.malloc.hugetlb=1")
  else:
    assert lines[:-1] == ["started"]


def test_malloc_environment_for_a_child_process(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", f"glibc.malloc.tcache_count=4:{KEEP}:glibc.malloc.hugetlb=1")
  monkeypatch.setenv("FATQ_TEST_KEEP", "kept")
  for huge in (False, True):
    for kept in (False, True):
      env = cli.malloc_environment(huge, kept)
      # the tunables are left for the child to set when it restarts itself; the rest is passed on
      assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=4" and env["FATQ_TEST_KEEP"] == "kept"
      assert (env["FATQ_HUGE_PAGES"], env["FATQ_KEEP_MAPPED"]) == ("01"[huge], "01"[kept])
  assert os.environ["GLIBC_TUNABLES"] == f"glibc.malloc.tcache_count=4:{KEEP}:glibc.malloc.hugetlb=1"  # unchanged


# Allocates and frees a 256 MiB block (as XLA:CPU does its temporaries) from a thread other than the main one, and
# counts the page faults of touching it again after the first time.
FAULTS = textwrap.dedent("""
    import ctypes, resource, threading
    from fatq import cli
    cli.tune_malloc()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    n = 256 << 20
    faults = []
    def use():
      p = libc.malloc(n)
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      ctypes.memset(p, 1, n)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      libc.free(p)
    for _ in range(3):
      t = threading.Thread(target=use); t.start(); t.join()
    print(cli.buffers_kept_mapped(), *faults)
""")


@needs_glibc
def test_kept_mapped_block_is_not_faulted_in_again(tmp_path):
  kept, *faults = _run(tmp_path, {"FATQ_HUGE_PAGES": "0"}, FAULTS)[-1].split()
  assert kept == "True"
  assert int(faults[0]) >= (256 << 20) // (2 << 20)  # mapped on first touch: at least one fault per 2 MiB
  assert faults[1:] == ["0", "0"]  # the same memory again
  kept, *faults = _run(tmp_path, {"FATQ_HUGE_PAGES": "0", "FATQ_KEEP_MAPPED": "0"}, FAULTS)[-1].split()
  assert kept == "False"
  assert all(int(f) >= (256 << 20) // 4096 for f in faults)  # glibc's default: mapped afresh, every 4 KiB page

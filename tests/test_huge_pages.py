"""fatq.cli.use_huge_pages: the entry points restart once, with glibc's huge-page tunable, keeping their arguments."""

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
    cli.use_huge_pages()
    print(repr(sys.argv[1:]), os.environ.get("GLIBC_TUNABLES", ""), cli.huge_pages_enabled())
""")


def _run(tmp_path, env_updates):
  script = tmp_path / "entry.py"
  script.write_text(SCRIPT)
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FATQ_HUGE_PAGES")}
  env.update(env_updates)
  out = subprocess.run([sys.executable, "-u", str(script), "--config.x=1", "a b"], capture_output=True, text=True,
                       env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.splitlines()


def test_restarts_once_with_the_tunable_and_the_same_arguments(tmp_path):
  if not (cli._thp_mode() == "madvise" and cli._glibc_hugetlb()):  # noqa: SLF001 - the condition under test
    pytest.skip("this system has no use for the tunable (THP mode not 'madvise', or glibc < 2.35)")
  lines = _run(tmp_path, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
  # "started" twice: the first process printed it, then exec'd itself; the second one did not restart
  assert lines == ["started", "started",
                   "['--config.x=1', 'a b'] glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 True"]


def test_opt_out_and_already_set(tmp_path):
  assert _run(tmp_path, {"FATQ_HUGE_PAGES": "0"})[-2:] == ["started", "['--config.x=1', 'a b']  False"]
  lines = _run(tmp_path, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
  assert lines[:-1] == ["started"]  # no restart
  assert lines[-1].startswith("['--config.x=1', 'a b'] glibc.malloc.hugetlb=1 ")


def test_page_environment_for_a_child_process(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1")
  monkeypatch.setenv("FATQ_TEST_KEEP", "kept")
  for huge in (False, True):
    env = cli.page_environment(huge)
    # the tunable is left for a huge-page child to set when it restarts itself; the rest is passed on
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4" and env["FATQ_TEST_KEEP"] == "kept"
    assert env["FATQ_HUGE_PAGES"] == ("1" if huge else "0")
  assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"  # this process unchanged

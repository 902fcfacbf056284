"""Command-line flag parsing for the entry points (experiments/*.py): a mistake in a flag ends in one line.

    from fatq import cli
    ...
    if __name__ == "__main__":
      cli.run(main)            # absl's app.run(main) with cli.parse_flags as the flags parser

Without it a config key that does not exist (``--config.fat.epoch=3``) ends in a long traceback of ml_collections
and absl. With it::

    error: config has no key 'fat.epoch' (did you mean 'fat.epochs'?)
    error: config key 'fat.epochs' takes an int (default 4), got 'abc'
    error: config file 'configs/lenet5_mnistt.py' not found

All of this happens while parsing flags: before any data is read or anything is compiled.

:func:`run` (and the benchmarks, through :func:`tune_malloc`) first restarts the process with glibc's malloc tuned
for XLA:CPU's large buffers: transparent huge pages (2 MiB instead of 4 KiB; ``FATQ_HUGE_PAGES=0`` turns them off),
and each compiled program's temporaries kept mapped from one call to the next instead of page-faulted in again at
every training step (``FATQ_KEEP_MAPPED=0``). ``python bench/finetune_step.py --malloc`` measures each (README).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import platform
import re
import sys
from collections.abc import Iterator, Sequence

from absl import app, flags
from ml_collections import ConfigDict
from ml_collections.config_flags import config_flags, config_path

__all__ = ["run", "interruptible", "parse_flags", "load_config", "flat_keys", "missing_key_message", "tune_malloc",
           "huge_pages_enabled", "buffers_kept_mapped", "malloc_environment"]

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# One arena (the main one, the only one that grows in place: another thread's arena serves a block over 64 MiB
# with a fresh mmap that free unmaps), no mmap for large blocks, and no trimming of the heap's free top.
KEEP_MAPPED_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                        "glibc.malloc.trim_threshold=1099511627776")
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def run(main, argv: Sequence[str] | None = None) -> None:
  """``absl.app.run(main)`` with :func:`parse_flags`; from the command line (``argv`` None), in a process whose
  malloc is tuned for XLA:CPU (:func:`tune_malloc`)."""
  if argv is None:
    tune_malloc()
  app.run(interruptible(main), argv=argv, flags_parser=parse_flags)


def interruptible(main):
  """``main`` ending in one line and status 130 on Ctrl-C, not a traceback through JAX (fine-tuning saves its state
  and says so before this, :func:`fatq.training.finetune`). :func:`run` wraps its ``main`` in it; the argparse entry
  points call ``interruptible(main)()``."""
  def interruptible_main(*args):
    try:
      return main(*args)
    except KeyboardInterrupt:
      print("interrupted (Ctrl-C)", file=sys.stderr)
      sys.stdout.flush()
      sys.stderr.flush()
      # 130: the shell's status for a process ended by SIGINT. os._exit: what must last is written by now (results
      # after each row, training state on the way out), and tearing XLA down normally while a compilation was
      # interrupted segfaulted (2 of 11 Ctrl-C's in LeNet-5's fine-tuning, both in its first step)
      os._exit(130)
  return interruptible_main


def tune_malloc(keep_mapped: bool = True) -> None:
  """Restart this process (same interpreter, same arguments) with ``GLIBC_TUNABLES`` set for XLA:CPU's large
  buffers, on Linux with glibc. Two settings, each with its own opt-out:

  * huge pages (``FATQ_HUGE_PAGES=0`` turns it off): ``glibc.malloc.hugetlb=1``, where glibc is 2.35 or newer and
    the kernel's THP mode is ``madvise``. With 4 KiB pages an element-wise pass over one of MobileNet's 150 MB
    activations ran at a third of the speed it has on huge pages (page faults and TLB misses; 41 against 12 ms).
  * buffers kept mapped (``keep_mapped``; ``FATQ_KEEP_MAPPED=0`` turns it off): :data:`KEEP_MAPPED_TUNABLES`.
    Every call of a compiled program allocates its temporaries as one block (5.2 GB for MobileNet v2's training
    step at batch 32). By default malloc maps such a block afresh and unmaps it on free, so each step page-faults
    and zeroes it again; with huge pages every other step spent three times the system time (0.5 and 1.6-2.3 s in
    turn, likely the kernel compacting memory). With one arena, no mmap and no trimming, the block is mapped once
    and reused; the process keeps its peak resident set (bench/memory.py, which measures each call's, turns this
    off).

  The numbers computed are the same. glibc reads its tunables only at start-up, hence the restart; a tunable
  already in ``GLIBC_TUNABLES`` is left as it is, and a process that has all it would add does not restart.
  """
  wanted = _wanted_tunables(os.environ, keep_mapped)
  names = {_name(t) for t in _tunables(os.environ)}
  added = [t for t in wanted if _name(t) not in names]
  if not added:
    return
  os.environ["GLIBC_TUNABLES"] = ":".join(_tunables(os.environ) + added)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def huge_pages_enabled() -> bool:
  """Whether malloc hands this process transparent huge pages: THP mode ``always``, or ``madvise`` with glibc's
  tunable set at start-up (:func:`tune_malloc`)."""
  return _thp_mode() == "always" or (_huge_page_tunable_applies() and _tunable_set(HUGE_PAGES_TUNABLE))


def buffers_kept_mapped() -> bool:
  """Whether this process started with :data:`KEEP_MAPPED_TUNABLES` (:func:`tune_malloc`)."""
  return _glibc_at_least(2, 26) and all(_tunable_set(t) for t in KEEP_MAPPED_TUNABLES)


def malloc_environment(huge: bool, keep_mapped: bool = True) -> dict[str, str]:
  """This process's environment for a child that tunes its malloc (it restarts itself, :func:`tune_malloc`) with
  or without huge pages and kept-mapped buffers: the tunables this process may have been started with are left
  for the child to set."""
  env = dict(os.environ, FATQ_HUGE_PAGES="1" if huge else "0", FATQ_KEEP_MAPPED="1" if keep_mapped else "0")
  ours = {_name(t) for t in (HUGE_PAGES_TUNABLE, *KEEP_MAPPED_TUNABLES)}
  env["GLIBC_TUNABLES"] = ":".join(t for t in _tunables(env) if _name(t) not in ours)
  return env


def _wanted_tunables(env, keep_mapped: bool) -> list[str]:
  if not _glibc_at_least(2, 26):  # the first glibc with tunables
    return []
  wanted = []
  if keep_mapped and env.get("FATQ_KEEP_MAPPED", "1") != "0":
    wanted += KEEP_MAPPED_TUNABLES
  if env.get("FATQ_HUGE_PAGES", "1") != "0" and _huge_page_tunable_applies():
    wanted.append(HUGE_PAGES_TUNABLE)
  return wanted


def _huge_page_tunable_applies() -> bool:
  """Whether :data:`HUGE_PAGES_TUNABLE` changes anything here: THP mode ``madvise`` (``always`` needs no tunable)
  and glibc 2.35 or newer, the first with it."""
  return _thp_mode() == "madvise" and _glibc_at_least(2, 35)


def _tunables(env) -> list[str]:
  return [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]


def _name(tunable: str) -> str:
  """``glibc.malloc.arena_max`` of ``glibc.malloc.arena_max=1``."""
  return tunable.split("=", 1)[0]


def _tunable_set(tunable: str) -> bool:
  return tunable in _tunables(os.environ)


def _glibc_at_least(major: int, minor: int) -> bool:
  """Linux with glibc ``major.minor`` or newer."""
  libc, version = platform.libc_ver()
  try:
    return sys.platform == "linux" and libc == "glibc" and tuple(map(int, version.split(".")[:2])) >= (major, minor)
  except ValueError:
    return False


def _thp_mode() -> str | None:
  """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), None where there is none."""
  try:
    with open(_THP_SETTING) as f:
      match = re.search(r"\[(\w+)\]", f.read())
  except OSError:
    return None
  return match.group(1) if match else None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """``flags.FLAGS(argv)``; a bad config file, config key or value exits with one ``error: ...`` line (status 2)."""
  argv = list(argv)
  try:
    remaining = flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - anything raised while parsing flags is a command-line mistake or re-raised
    message = explain(e, argv)
    if message is None:
      raise
    _fail(message)
  for name in _config_flag_names():
    path = _config_argument(name, argv)
    if path is not None and not os.path.isfile(path.split(":", 1)[0]):
      _fail(f"config file {path.split(':', 1)[0]!r} not found (--{name})")
  return remaining


def load_config(argument: str) -> ConfigDict:
  """The config that ``--config=ARGUMENT`` gives, for tests, scripts and configs built on another config file:
  ``'configs/lenet5_mnist.py:quick'`` is that file's ``get_config('quick')``, ``'configs/x.py'`` its
  ``get_config()`` (the argument split at its first colon, as ml_collections does). Each call runs the file afresh
  as a module of its own (ml_collections' loader reuses one module name, so a config that loads another would run
  the second file in the first one's namespace). A missing file raises ``FileNotFoundError`` naming it."""
  file, *arg = argument.split(":", 1)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"config file {file!r} not found")
  spec = importlib.util.spec_from_file_location(
      "_fatq_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(file))[0]), file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*arg)


def explain(error: BaseException, argv: Sequence[str]) -> str | None:
  """One line for an error raised while parsing ``argv``, or None when it is not a command-line mistake."""
  names = _config_flag_names()
  expanded = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
  for name in names:
    path = _config_argument(name, expanded)
    if path is None:
      continue
    file = path.split(":", 1)[0]
    if not os.path.isfile(file):
      return f"config file {file!r} not found (--{name})"
    if isinstance(error, flags.IllegalFlagValueError) and f"--{name}=" in str(error) and \
        "Error whilst parsing config file" in str(error):
      return f"--{name}={path}: {_last_line(str(error))}"
    overrides = _overrides(name, expanded)
    if not overrides:
      continue
    try:
      config = flags.FLAGS[name].parser.parse(path)  # a fresh copy, without the overrides
    except Exception:  # noqa: BLE001 - the config file itself is broken: report that
      return f"--{name}={path}: {_last_line(str(error))}"
    if not isinstance(config, ConfigDict):
      continue
    for key in overrides:
      message = missing_key_message(config, key)
      if message:
        return message
    m = re.match(rf"flag --{re.escape(name)}\.(\S+?)=(.*?): (.*)$", str(error), re.S)
    if isinstance(error, flags.IllegalFlagValueError) and m:
      key, value, why = m.groups()
      try:
        default = config_path.get_value(key, config)
      except Exception:  # noqa: BLE001
        return f"config key {key!r}: bad value {value!r} ({_last_line(why)})"
      if isinstance(default, ConfigDict):  # its repr is one line per key
        return (f"config key {key!r} is a group of keys, not a value: set one of them, e.g. "
                f"--{name}.{key}.{next(iter(default.keys()), 'KEY')}=..., got {value!r}")
      kind = type(default).__name__
      return f"config key {key!r} takes {_article(kind)} {kind} (default {default!r}), got {value!r}"
  if isinstance(error, flags.Error):  # another flag: unknown, missing, wrong type
    return _last_line(str(error)).rstrip(".") + " (see --helpshort)"
  return None


def flat_keys(config: ConfigDict, prefix: str = "") -> Iterator[str]:
  """Every key of ``config`` as a dotted path, nested dicts' own keys included (``'fat'``, ``'fat.epochs'``)."""
  for key, value in config.items():
    yield prefix + key
    if isinstance(value, ConfigDict):
      yield from flat_keys(value, prefix + key + ".")


def missing_key_message(config: ConfigDict, key: str) -> str | None:
  """None when ``key`` (a dotted override path) exists in ``config``, else the error line with a suggestion."""
  try:
    config_path.get_value(key, config)
    return None
  except (KeyError, AttributeError, IndexError, ValueError, TypeError):
    pass
  keys = list(flat_keys(config))
  parent, _, leaf = key.rpartition(".")
  if not parent or parent in keys:  # the dict exists, the name in it does not: compare the name with its siblings
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    close = [siblings[c] for c in difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.7)]
  else:  # a typo further up ('fatt.epochs'): compare whole paths of the same depth
    close = difflib.get_close_matches(key, [k for k in keys if k.count(".") == key.count(".")], n=1, cutoff=0.7)
  if close:
    return f"config has no key {key!r} (did you mean {close[0]!r}?)"
  while parent and parent not in keys:
    parent = parent.rpartition(".")[0]
  siblings = [k for k in keys if k.rpartition(".")[0] == parent]
  where = f"keys under {parent!r}" if parent else "top-level keys"
  return f"config has no key {key!r} ({where}: {', '.join(siblings)})"


def _config_flag_names() -> list[str]:
  return [name for name, flag in flags.FLAGS._flags().items()  # noqa: SLF001 - absl has no public listing by type
          if config_flags.is_config_flag(flag) and name == flag.name]


def _config_argument(name: str, argv: Sequence[str]) -> str | None:
  """The value of ``--name=PATH`` / ``--name PATH`` in ``argv`` (the last one), or None."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    m = re.match(rf"^-{{1,2}}{re.escape(name)}(=|$)", arg)
    if m:
      value = arg.split("=", 1)[1] if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _overrides(name: str, argv: Sequence[str]) -> list[str]:
  """The dotted keys of ``--name.KEY=...`` overrides, in order (as ml_collections reads them)."""
  keys = []
  for arg in argv[1:]:
    m = re.match(rf"^-{{1,2}}(no)?{re.escape(name)}\.([^=]+)", arg)
    if m and m.group(2) not in keys:
      keys.append(m.group(2))
  return keys


def _last_line(text: str) -> str:
  lines = [s.strip() for s in text.strip().splitlines() if s.strip()]
  line = lines[-1] if lines else text.strip()
  return re.sub(r"^\w+(Error|Exception): ", "", line)


def _article(word: str) -> str:
  return "an" if word[:1] in "aeiou" else "a"


def refuse_a_finetune_workdir(workdir: str) -> None:
  """End in one line if ``workdir`` holds an experiments/finetune.py run: its results.json, which --resume and the
  export scripts read, would be overwritten."""
  path = os.path.join(workdir, "results.json")
  try:
    with open(path) as f:
      earlier = json.load(f)
  except (OSError, ValueError):
    return
  if isinstance(earlier, dict) and "rows" in (earlier.get("config") or {}):
    sys.exit(f"error: {path} holds the results of an experiments/finetune.py run, which this would overwrite: "
             "choose another --workdir")


def make_workdir(workdir: str) -> None:
  """Create ``workdir`` and check that a file can be written in it, before any work; else end in one line."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    open(probe, "w").close()
    os.remove(probe)
  except OSError as e:
    sys.exit(f"error: workdir {workdir!r} is not writable ({e.strerror}); choose another --workdir")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)

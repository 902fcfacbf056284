"""Crash safety: a fine-tuning run killed (SIGKILL), interrupted (Ctrl-C) or left with a damaged newest checkpoint
resumes and ends exactly like an uninterrupted run, and a fresh run leaves nothing of an earlier one to resume (tests/scripts/finetune_tiny.py: a two-layer MLP, 21 steps, a
checkpoint every 2 steps and at every evaluation)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "finetune_tiny.py")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  # One persistent compilation cache for the module's runs: each later run loads the executables the first compiled
  # (the same programs, so the same numbers) instead of spending most of its time in XLA.
  cache = tmp_path_factory.mktemp("jax_cache")
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _run(env, workdir, *extra):
  out = subprocess.run([sys.executable, SCRIPT, str(workdir), *extra], capture_output=True, text=True, timeout=300,
                       env=env)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1]), out


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  result, _ = _run(env, workdir)
  return workdir, result


def _steps(workdir) -> list[int]:
  # orbax writes "<step>.orbax-checkpoint-tmp" and renames it when complete: only bare numbers are checkpoints
  return sorted(int(d) for d in os.listdir(workdir / "train_state") if d.isdigit())


def _start_and_wait(env, workdir, after=9, extra=(), line=None):
  """Start a run that pauses 2 s before each step after ``after``, and return it once it reports the first pause:
  its state is then at step ``after`` (for 9: of which no checkpoint exists, the last is step 8). With ``line``,
  ``extra`` sets the pause and ``line`` is the report to wait for."""
  line = line or f"waiting before step {after + 1}"
  err = open(workdir.parent / f"{workdir.name}.stderr", "w")
  pause = [] if extra and "--slow-eval-from" in extra else ["--slow-after", str(after)]
  proc = subprocess.Popen([sys.executable, SCRIPT, str(workdir), *pause, *extra],
                          stdout=subprocess.PIPE, stderr=err, text=True, env=env)
  watchdog = threading.Timer(240, proc.kill)  # never hang the test suite on a stuck child
  watchdog.start()
  seen = []
  for out in proc.stdout:
    seen.append(out)
    if out.strip() == line:
      break
  watchdog.cancel()
  assert proc.poll() is None, f"the run ended before {line!r}: {''.join(seen)[-2000:]}"
  return proc


def _finish(proc) -> tuple[int, str]:
  rest, _ = proc.communicate(timeout=120)
  return proc.returncode, rest


def _assert_same_as_reference(workdir, resumed, reference):
  ref_dir, ref = reference
  assert resumed["best"] == ref["best"]  # bit-identical thresholds
  assert [h["holdout_loss"] for h in resumed["history"]] == [h["holdout_loss"] for h in ref["history"]]
  assert [h["step"] for h in resumed["history"]] == [h["step"] for h in ref["history"]]
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  ref_lines = [json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]
  assert [(x["step"], x["holdout_loss"]) for x in lines] == [(x["step"], x["holdout_loss"]) for x in ref_lines]
  # the logged train loss (mean since the last evaluation) too: the checkpoints keep the steps' losses since then
  assert [x.get("train_loss") for x in lines] == [x.get("train_loss") for x in ref_lines]
  assert _steps(workdir) == _steps(ref_dir) == [20, 21]


def test_sigkill_then_resume_equals_uninterrupted(env, reference, tmp_path):
  workdir = tmp_path / "killed"
  proc = _start_and_wait(env, workdir)
  proc.kill()  # SIGKILL: no handler runs, nothing is saved
  rc, _ = _finish(proc)
  assert rc == -signal.SIGKILL
  assert _steps(workdir) == [6, 8]  # step 9 was computed but never saved: it is redone
  resumed, out = _run(env, workdir, "--resume")
  assert "resumed at step 8 of 21" in out.stdout
  _assert_same_as_reference(workdir, resumed, reference)


def test_ctrl_c_saves_state_then_resume_equals_uninterrupted(env, reference, tmp_path):
  workdir = tmp_path / "interrupted"
  proc = _start_and_wait(env, workdir)
  proc.send_signal(signal.SIGINT)
  rc, rest = _finish(proc)
  assert rc == 130, rest
  assert "interrupted at step 9: state saved; continue with --resume" in rest
  assert _steps(workdir) == [8, 9]  # the interrupted step is checkpointed on the way out
  resumed, out = _run(env, workdir, "--resume")
  assert "resumed at step 9 of 21" in out.stdout
  _assert_same_as_reference(workdir, resumed, reference)


def test_ctrl_c_during_an_evaluation_resumes_at_that_step_again(env, reference, tmp_path):
  """Interrupted while step 10's thresholds are being evaluated (the 7th held-out batch: 3 per evaluation, at steps
  0, 5, 10): step 10 is not saved without its evaluation, which a resume would otherwise never run (it could never
  become the best, and metrics.jsonl would skip it)."""
  workdir = tmp_path / "interrupted_eval"
  proc = _start_and_wait(env, workdir, extra=("--slow-eval-from", "7"), line="evaluating (7)")
  proc.send_signal(signal.SIGINT)
  rc, rest = _finish(proc)
  assert rc == 130, rest
  assert "interrupted at step 9: state saved; continue with --resume" in rest
  assert _steps(workdir) == [8, 9]
  resumed, out = _run(env, workdir, "--resume")
  assert "resumed at step 9 of 21" in out.stdout
  _assert_same_as_reference(workdir, resumed, reference)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(env, reference, tmp_path):
  ref_dir, _ = reference
  workdir = tmp_path / "damaged"
  shutil.copytree(ref_dir, workdir)
  states = workdir / "train_state"
  # the newest checkpoint's array files cut short (a full disk; a filesystem without atomic renames) ...
  data = [p for p in (states / "21").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data
  for p in data:
    with open(p, "r+b") as f:
      f.truncate(3)
  # ... and a half-written copy of it left behind by a killed save
  (states / "21.orbax-checkpoint-tmp" / "default").mkdir(parents=True)
  (states / "21.orbax-checkpoint-tmp" / "default" / "_METADATA").write_text('{"tree_metadata": {')
  resumed, out = _run(env, workdir, "--resume")
  assert "unreadable checkpoint(s)" in out.stderr and "resuming from step 20" in out.stderr
  assert "resumed at step 20 of 21" in out.stdout
  _assert_same_as_reference(workdir, resumed, reference)
  # the rewritten step 21 is whole again: a second resume restores it without complaint
  again, out = _run(env, workdir, "--resume")
  assert "resumed at step 21 of 21" in out.stdout and "unreadable" not in out.stderr
  assert again["best"] == reference[1]["best"]



def test_fresh_run_in_an_earlier_runs_workdir_leaves_nothing_of_it_to_resume(env, reference, tmp_path):
  """A run without --resume where an earlier run left checkpoints (steps 20 and 21), killed after its own first
  checkpoint (step 2). Orbax keeps the two newest saves, so without clearing 21 and 2 would be left, 21 the latest,
  and --resume would restore the earlier run's end."""
  ref_dir, ref = reference
  workdir = tmp_path / "rerun"
  shutil.copytree(ref_dir, workdir)
  proc = _start_and_wait(env, workdir, after=2, extra=("--lr", "0.01"))
  proc.kill()
  _finish(proc)
  assert _steps(workdir) == [2]
  resumed, out = _run(env, workdir, "--lr", "0.01", "--resume")
  assert "resumed at step 2 of 21" in out.stdout
  uninterrupted, _ = _run(env, tmp_path / "uninterrupted", "--lr", "0.01")
  assert resumed["best"] == uninterrupted["best"] != ref["best"]
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [x["holdout_loss"] for x in lines] == [h["holdout_loss"] for h in uninterrupted["history"]]


def test_resume_on_another_device_count_needs_the_same_global_batch(env, reference, tmp_path):
  """The reference run (one device, global batch 20) resumed from step 20 on two devices: with the same global batch
  it continues to the reference's thresholds (up to float summation order); with per_device_batch_size 20 (a global
  batch of 40, so other batches than the steps before) it stops and names the change instead of mixing the two."""
  ref_dir, ref = reference
  two = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  workdir = tmp_path / "two_devices"
  shutil.copytree(ref_dir, workdir)
  shutil.rmtree(workdir / "train_state" / "21")  # resume from step 20
  out = subprocess.run([sys.executable, SCRIPT, str(workdir), "--resume", "--per-device-batch-size", "20"],
                       capture_output=True, text=True, timeout=300, env=two)
  assert out.returncode != 0
  assert ("was saved by a run on 1 device(s) with other batches than this one: batch_size 20 -> 40. Resuming would "
          "continue its steps on other batches: resume with the settings it had (here: batch_size 20, or "
          "per_device_batch_size 10 on these 2 device(s))") in out.stderr
  assert _steps(workdir) == [20]  # nothing trained, nothing saved
  resumed, log = _run(two, workdir, "--resume")
  assert "resumed at step 20 of 21" in log.stdout and "data parallel over 2 cpu device(s)" in log.stdout
  assert resumed["best"].keys() == ref["best"].keys()
  for key in ref["best"]:
    np.testing.assert_allclose(jax.tree.leaves(resumed["best"][key]), jax.tree.leaves(ref["best"][key]), atol=1e-5)

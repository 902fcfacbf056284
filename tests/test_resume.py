"""Crash safety: a fine-tuning run killed with SIGKILL resumes and ends exactly like an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "finetune_tiny.py")


def _run(workdir, *extra):
  out = subprocess.run([sys.executable, SCRIPT, str(workdir), *extra], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
  reference, _ = _run(tmp_path / "ref")

  killed = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, SCRIPT, str(killed)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 500
  while time.time() < deadline and proc.poll() is None:
    steps = [int(d) for d in os.listdir(killed / "train_state")] if (killed / "train_state").exists() else []
    steps = [s for s in steps if s >= 8] if steps else []
    if steps:
      break
    time.sleep(0.2)
  assert proc.poll() is None, "the run finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  # a checkpoint being written at the moment of the kill is left as a temporary directory and never used
  resumed, stdout = _run(killed, "resume")
  assert "resumed at step" in stdout
  assert resumed["best"] == reference["best"]
  assert [h["holdout_loss"] for h in resumed["history"]] == [h["holdout_loss"] for h in reference["history"]]
  lines = (killed / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x)["step"] for x in lines] == [h["step"] for h in reference["history"]]

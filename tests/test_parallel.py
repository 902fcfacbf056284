"""Data parallelism: the same fine-tuning and predictions on 1 and on 4 (simulated host) devices.

The runs are float64 (see tests/scripts/finetune_parallel.py for why float32 cannot promise 1e-5 after several
steps of a fake-quantized model).
"""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from fatq import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "finetune_parallel.py")


@pytest.fixture(scope="module")
def runs():
  """The script on 1 and on 4 host devices, side by side."""
  procs = []
  for n in (1, 4):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    procs.append(subprocess.Popen([sys.executable, SCRIPT], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  return results


def _max_diff(a: dict, b: dict) -> float:
  return max(float(np.max(np.abs(np.subtract(a[k][leaf], b[k][leaf])))) for k in a for leaf in a[k])


def test_four_devices_really_used(runs):
  one, four = runs
  assert one["n_devices"] == 1 and four["n_devices"] == 4
  assert four["batch_devices"] == 4 and four["batch_shard_rows"] == [5, 5, 5, 5]
  assert four["state_devices"] == 4 and four["state_fully_replicated"]
  assert four["logs"][0] == "data parallel over 4 cpu device(s): global batch 20 (5 per device)"
  assert one["batch_devices"] == 1 and one["batch_shard_rows"] == [20]
  assert not any("data parallel" in line for line in one["logs"])  # one device logs as before


def test_same_thresholds_on_one_and_four_devices(runs):
  one, four = runs
  # 7 points: input and 3 outputs (shift, width), 3 kernels (per-channel scale)
  assert one["best"].keys() == four["best"].keys() and len(one["best"]) == 7
  # the best thresholds are the last step's (the held-out loss fell at each evaluation: steps 0, 3, 6, 7) ...
  assert len(one["holdout"]) == 4 and np.all(np.diff(one["holdout"]) < 0)
  # ... and training moved them (else equality would say nothing), by far more than the 1-vs-4 difference
  assert _max_diff(one["init"], one["best"]) > 1e-2
  assert _max_diff(one["best"], four["best"]) <= 1e-5
  np.testing.assert_allclose(one["holdout"], four["holdout"], rtol=1e-9)


def test_held_out_images_fewer_than_the_devices_split_all_count(runs):
  one, four = runs
  assert len(one["holdout7"]) == 2
  np.testing.assert_allclose(one["holdout7"][0], one["holdout7_direct"], rtol=1e-9)
  np.testing.assert_allclose(one["holdout7"], four["holdout7"], rtol=1e-9)


def test_one_device_is_the_plain_program(runs):
  one, _ = runs
  assert one["mesh_vs_plain_step"] == 0.0
  assert one["predict_vs_plain"] == 0.0


def test_predict_same_on_one_and_four_devices(runs):
  one, four = runs
  a, b = np.asarray(one["logits"]), np.asarray(four["logits"])
  assert a.shape == b.shape == (50, 10)
  assert np.max(np.abs(a - b)) <= 1e-5
  assert np.std(a) > 1e-3  # real logits, not a constant


def test_bad_batch_size_is_a_clear_error(runs):
  one, four = runs
  assert one["bad_batch_error"] is None  # any batch size splits over one device
  assert four["bad_batch_error"] == ("batch_size 18 is not a multiple of the 4 devices: set batch_size to a "
                                     "multiple of 4 (e.g. 20) or per_device_batch_size (e.g. 4)")


def test_global_batch_size():
  cfg = ml_collections.ConfigDict(dict(batch_size=32, per_device_batch_size=0))
  assert parallel.global_batch_size(cfg, 1) == 32
  assert parallel.global_batch_size(cfg, 8) == 32
  cfg.per_device_batch_size = 6
  assert parallel.global_batch_size(cfg, 8) == 48
  assert parallel.global_batch_size(ml_collections.ConfigDict(dict(batch_size=30)), 3) == 30  # key absent: unset
  with pytest.raises(ValueError, match="batch_size 30 is not a multiple of the 4 devices"):
    parallel.global_batch_size(ml_collections.ConfigDict(dict(batch_size=30)), 4)
  assert parallel.round_up(18, 4) == 20 and parallel.round_up(20, 4) == 20 and parallel.round_up(1, 1) == 1

"""A tiny FAT run for the crash-safety tests (tests/test_resume.py), which kill or interrupt it.

    finetune_tiny.py WORKDIR [--resume] [--slow-after N] [--slow-eval-from C] [--lr LR] [--per-device-batch-size B]

A two-layer MLP on random 8-feature inputs (compiles in about a second), 4-bit per-channel weights and asymmetric
activations, 21 steps (3 epochs of 7 batches), held-out evaluation every 5 steps, a checkpoint every 2 steps.
``--slow-after N`` prints ``waiting before step K`` and sleeps 2 s before every step K > N, so that a test can signal
the process at a known point of training however loaded the machine is; ``--slow-eval-from C`` does the same before
the C-th and later held-out batch evaluations (3 per evaluation: steps 0, 5, 10, ...), printing ``evaluating (C)``. Prints the best thresholds and the history as JSON on its last line;
exits with 130 after Ctrl-C (SIGINT), once the training loop has saved its state.
"""
import argparse
import json
import signal
import sys
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

import fatq
from fatq import training


class TinyMLP(nn.Module):
  quant: fatq.QuantConfig | None = None

  @nn.compact
  def __call__(self, x):
    x = fatq.quant_point(self, self.quant, "input", x)
    x = fatq.QDense(16, activation="relu", quant=self.quant, name="fc1")(x)
    return fatq.QDense(4, quant=self.quant, name="fc2")(x)


def tiny_problem(n: int, n_calibration: int):
  """``(model, x, teacher logits, frozen, thresholds)``: ``n`` random inputs, 4-bit per-channel weights and asymmetric
  activations calibrated on the first ``n_calibration``."""
  qcfg = fatq.QuantConfig.uniform(fatq.QuantSpec.fat(4, per_channel=True), fatq.QuantSpec.fat(4, symmetric=False))
  model = TinyMLP(quant=qcfg)
  x = np.random.default_rng(0).uniform(-1, 1, (n, 8)).astype(np.float32)
  params = TinyMLP().init(jax.random.key(1), x[:1])["params"]
  stats = fatq.calibrate(model, params, [x[:n_calibration]])
  th = fatq.init_thresholds(model, params, stats, x[:1])
  teacher = np.asarray(TinyMLP().apply({"params": params}, x))
  return model, x, teacher, {"params": params, "quant_stats": stats}, th


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("workdir")
  ap.add_argument("--resume", action="store_true")
  ap.add_argument("--slow-after", type=int, default=0)
  ap.add_argument("--slow-eval-from", type=int, default=0)
  ap.add_argument("--lr", type=float, default=3e-2)
  ap.add_argument("--per-device-batch-size", type=int, default=0)  # else a global batch of 20
  args = ap.parse_args()

  if args.slow_after or args.slow_eval_from:
    # Ctrl-C as from a terminal: a shell starts background jobs (`pytest ... &`) with SIGINT ignored, which this
    # process would inherit, and Python would then never raise KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
  if args.slow_eval_from:
    make_eval, calls = training.make_eval_loss, [0]

    def slow_make_eval(*a, **k):
      eval_fn = make_eval(*a, **k)

      def slow(*rest):
        calls[0] += 1
        if calls[0] >= args.slow_eval_from:
          print(f"evaluating ({calls[0]})", flush=True)
          time.sleep(2.0)
        return eval_fn(*rest)
      return slow
    training.make_eval_loss = slow_make_eval
  if args.slow_after:  # wrap the jitted step: the sleep happens between steps, in Python, where signals land
    make = training.make_train_step

    def slow_make(*a, **k):
      step_fn = make(*a, **k)

      def slow(state, *rest):
        if int(state.step) >= args.slow_after:
          print(f"waiting before step {int(state.step) + 1}", flush=True)  # the test signals on this line
          time.sleep(2.0)
        return step_fn(state, *rest)
      return slow
    training.make_train_step = slow_make

  model, x, teacher, frozen, th = tiny_problem(200, 50)
  cfg = ml_collections.ConfigDict(dict(epochs=3, batch_size=20, loss="rmse", schedule="cosine_restarts", lr=args.lr,
                                       lr_min=0.0, restart_period=10, eval_every=5, seed=0, checkpoint_every=2,
                                       per_device_batch_size=args.per_device_batch_size))
  try:
    best, hist = training.finetune(model, frozen, th, x[:140], teacher[:140],
                                   (x[140:], teacher[140:]), cfg, workdir=args.workdir, resume=args.resume,
                                   progress=False, log=lambda s: print(s, flush=True))
  except KeyboardInterrupt:
    sys.exit(130)
  print(json.dumps(dict(best=jax.tree.map(lambda a: np.asarray(a).tolist(), fatq.points(best)), history=hist)))


if __name__ == "__main__":
  main()

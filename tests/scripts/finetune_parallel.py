"""A tiny data-parallel FAT run (random 2-conv + dense net, 8 bits, float64, 7 steps of global batch 20) on every
visible device.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/scripts/finetune_parallel.py

Prints one JSON line: the device count, how a batch and the trained state are placed, the best thresholds and
held-out losses, logits from ``predict`` and (on one device) the difference between the mesh step and the plain
``jax.jit`` step. Used by tests/test_parallel.py, which runs it with 1 and with 4 host devices.

No max pooling: random 4-bit LeNet-5 differed by 0.02 (2 lr) after one step, on 1 vs 4 devices and also between
two compilations of its step on one device: one gradient component changed sign. Max pooling over quantized
activations (many ties; which tied input gets the gradient depends on the compiled code) is the likely cause.

float64: splitting the batch changes the order of the gradient's sums. In float32 that noise moves thresholds by
~1e-7, which sooner or later moves a value across a rounding boundary of the fake quantizer; the gradient then jumps,
and 7 steps ended 3e-7 or 3e-5 apart, depending on the random weights. In float64 the same code shows whether the
parallel step computes the single-device update, far below the 1e-5 tolerance.
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

jax.config.update("jax_enable_x64", True)

import fatq  # noqa: E402
from fatq import parallel, training  # noqa: E402
from fatq.layers import QConv, QDense, quant_point  # noqa: E402


class Tiny(nn.Module):
  quant: fatq.QuantConfig | None = None

  @nn.compact
  def __call__(self, x):
    x = quant_point(self, self.quant, "input", x)
    x = QConv(8, (3, 3), strides=(2, 2), activation="relu", quant=self.quant, name="conv1")(x)
    x = QConv(16, (3, 3), strides=(2, 2), activation="relu", quant=self.quant, name="conv2")(x)
    return QDense(10, quant=self.quant, name="fc")(x.reshape(x.shape[0], -1))


n_dev = jax.device_count()
mesh = parallel.make_mesh()
qcfg = fatq.QuantConfig.uniform(fatq.QuantSpec.fat(8, per_channel=True), fatq.QuantSpec.fat(8, symmetric=False))
m = Tiny(quant=qcfg)
x = np.random.default_rng(0).uniform(size=(200, 16, 16, 1))
# Weights from numpy (1/sqrt(fan-in) normal kernels, small biases) on flax's shapes: compiling flax's random
# initialisers takes 15-25 s on these shared cores, longer than everything else here.
rng = np.random.default_rng(1)
shapes = jax.eval_shape(m.init, jax.random.key(1), x[:1])["params"]
params = jax.tree.map(lambda s: np.float64(rng.normal(size=s.shape) * (np.prod(s.shape[:-1]) ** -0.5 if len(s.shape) > 1
                                                                      else 0.1)), shapes)
# jitted: op-by-op dispatch compiles every primitive for every device, which is slow with 4 host devices
stats = fatq.calibrate(m, params, [x[:50]])
th = jax.jit(lambda p, s, x: fatq.init_thresholds(m, p, s, x))(params, stats, x[:1])
# Start from clipped ranges (every factor 0.8 of its initial value) so that the held-out loss falls steadily and the
# best thresholds are those of the last step. Shifts start at 0.05, off their lower bound 0: on a range that starts
# at 0 (ReLU outputs, this input) a shift has no effect (nudge keeps the width and puts 0 back), so its gradient is 0;
# at the bound itself it was 0 only up to rounding noise, which Adam turned into a step of either sign, and 1 vs 4
# devices (another order of sums) ended 0.014 apart on CI's machine.
th = jax.tree_util.tree_map_with_path(
    lambda path, a: np.full_like(np.asarray(a, np.float64), 0.05) if "shift" in jax.tree_util.keystr(path)
    else np.asarray(a, np.float64) * 0.8, th)
teacher = np.asarray(jax.jit(m.clone(quant=None).apply)({"params": params}, x))
frozen = {"params": params, "quant_stats": stats}
out = dict(n_devices=n_dev)

# The same global batch of 20 everywhere: 5 per device on 4 devices, batch_size 20 on one.
cfg = ml_collections.ConfigDict(dict(epochs=1, batch_size=20, loss="rmse", schedule="constant", lr=5e-3,
                                     lr_min=0.0, restart_period=10, eval_every=3, seed=0, per_device_batch_size=0))
if n_dev > 1:
  cfg.update(batch_size=18, per_device_batch_size=20 // n_dev)  # batch_size is ignored when per-device is set
logs = []
best, hist = training.finetune(m, frozen, th, x[:140], teacher[:140], (x[140:], teacher[140:]), cfg,
                               log=logs.append, progress=False)
leaf = jax.tree.leaves(best)[0]  # the training state's thresholds: replicated over the mesh
xb = parallel.shard_batch(mesh, x[:20])
out.update(logs=logs, best=jax.tree.map(lambda a: np.asarray(a).tolist(), fatq.points(best)),
           init=jax.tree.map(lambda a: np.asarray(a).tolist(), fatq.points(th)),
           holdout=[h["holdout_loss"] for h in hist], batch_devices=len(xb.sharding.device_set),
           batch_shard_rows=[s.data.shape[0] for s in xb.addressable_shards],
           state_devices=len(leaf.sharding.device_set), state_fully_replicated=bool(leaf.sharding.is_fully_replicated))

# 7 held-out images, fewer than a batch and not a multiple of 4: every one counts, on any number of devices (on 4,
# the loss was of 4 of them); one training step, the loss at steps 0 and 1
_, hist7 = training.finetune(m, frozen, th, x[:20], teacher[:20], (x[140:147], teacher[140:147]), cfg,
                             log=lambda *_: None, progress=False)
out["holdout7"] = [h["holdout_loss"] for h in hist7]
out["holdout7_direct"] = float(training.rmse(m.apply({**frozen, "quant": th}, x[140:147]), teacher[140:147]))

# predict: 50 images in batches of 18 (rounded up to 20 on 4 devices), the last one padded.
out["logits"] = training.predict(m, {**frozen, "quant": th}, x[:50], batch_size=18).tolist()

try:
  parallel.global_batch_size(ml_collections.ConfigDict(dict(batch_size=18)), n_dev)
  out["bad_batch_error"] = None
except ValueError as e:
  out["bad_batch_error"] = str(e)

if n_dev == 1:
  # One device: the mesh step is the plain jitted step (today's numbers, bit for bit).
  # finetune's batch order (one epoch: a permutation of the 140 images, 7 batches of 20, each sorted)
  tx, _ = training.make_optimizer(cfg)
  plain = training.make_train_step(m, tx, training.rmse)
  s0 = training.TrainState(jnp.zeros([], jnp.int32), th, tx.init(th))
  order = np.random.default_rng([0, 0]).permutation(140)
  for i in range(7):
    idx = np.sort(order[20 * i:20 * (i + 1)])
    s0, _ = plain(s0, frozen, x[idx], teacher[idx])
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s0.thresholds, best))
  fwd = jax.jit(lambda v, x: m.apply(v, x))
  plain_logits = np.concatenate([np.asarray(fwd({**frozen, "quant": th}, x[i:i + 25])) for i in (0, 25)])
  out.update(mesh_vs_plain_step=max(diffs),
             predict_vs_plain=float(np.max(np.abs(np.asarray(out["logits"]) - plain_logits))))
print(json.dumps(out))

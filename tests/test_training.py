"""Losses, schedules, optimizer-state resets and the train step."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import fatq
from fatq import layers, training
from fatq.models import LeNet5


def test_losses_formulas():
  s = jnp.array([[1.0, 2.0], [0.0, -1.0]])
  t = jnp.array([[0.0, 2.0], [2.0, -1.0]])
  np.testing.assert_allclose(training.rmse(s, t), np.sqrt((1 + 0 + 4 + 0) / 4), rtol=1e-6)
  expected = np.mean([np.sqrt(1 + 1e-5) + np.sqrt(1e-5), np.sqrt(4 + 1e-5) + np.sqrt(1e-5)])
  np.testing.assert_allclose(training.smoothed_l1(s, t), expected, rtol=1e-6)


def test_cosine_restarts_schedule():
  sched = training.cosine_restarts(1e-2, 10, floor=1e-4)
  np.testing.assert_allclose([sched(0), sched(10), sched(20)], [1e-2] * 3, rtol=1e-6)
  np.testing.assert_allclose(sched(5), 1e-4 + (1e-2 - 1e-4) * 0.5, rtol=1e-5)
  assert float(sched(9)) < float(sched(1))


def test_reference_schedule():
  sched = training.reference_schedule(1e-3, 400)
  np.testing.assert_allclose(sched(0), 1e-3)
  np.testing.assert_allclose(sched(600), 1e-3 * np.exp(-0.06) * abs(np.cos(np.pi * 600 / 1600)), rtol=1e-5)


def test_reset_every_reinitialises_adam_state():
  tx = training.reset_every(optax.adam(0.1), 3)
  params = {"a": jnp.ones(2)}
  state = tx.init(params)
  grads = {"a": jnp.array([1.0, -2.0])}
  counts = []
  for _ in range(7):
    _, state = tx.update(grads, state, params)
    counts.append(int(state.inner[0].count))
  # Adam's own step counter restarts at each reset (updates 3 and 6 start from fresh state)
  assert counts == [1, 2, 3, 1, 2, 3, 1]
  # right after a reset Adam's first update has magnitude lr (bias-corrected first step)
  fresh_tx = optax.adam(0.1)
  u_fresh, _ = fresh_tx.update(grads, fresh_tx.init(params), params)
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update({"a": jnp.array([5.0, 5.0])}, state, params)
  u_reset, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(u_reset["a"], u_fresh["a"], rtol=1e-6)


def test_bad_schedule_name():
  cfg = ml_collections.ConfigDict(dict(schedule="cosine", lr=1e-3, restart_period=10))
  with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
    training.make_optimizer(cfg)


@pytest.mark.parametrize("learn_biases", [None, "fc.*"])
def test_train_step_changes_only_thresholds_and_lowers_loss(learn_biases):
  qcfg = fatq.QuantConfig.uniform(fatq.QuantSpec.fat(4, per_channel=True), fatq.QuantSpec.fat(4, symmetric=False))
  qcfg = dataclasses.replace(qcfg, learn_biases=learn_biases)  # bias offsets live with the thresholds in 'quant'
  m = LeNet5(quant=qcfg)
  x = np.asarray(jax.random.uniform(jax.random.key(0), (64, 28, 28, 1)))
  params = m.init(jax.random.key(1), x)["params"]
  stats = fatq.calibrate(m, params, [x])
  th = fatq.init_thresholds(m, params, stats, x)
  teacher = m.clone(quant=None).apply({"params": params}, x)
  cfg = ml_collections.ConfigDict(dict(schedule="cosine_restarts", lr=2e-2, lr_min=0.0, restart_period=20))
  tx, _ = training.make_optimizer(cfg)
  step = training.make_train_step(m, tx, training.rmse)
  frozen = {"params": params, "quant_stats": stats}
  params_before = jax.tree.map(np.array, params)
  state = training.TrainState(jnp.zeros([], jnp.int32), th, tx.init(th))
  losses = []
  for _ in range(40):
    state, loss = step(state, frozen, x, teacher)
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < losses[0]
  jax.tree.map(np.testing.assert_array_equal, params_before, jax.tree.map(np.array, params))
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), th, state.thresholds))
  assert max(moved) > 1e-3
  offsets = layers.bias_offsets(state.thresholds)
  assert sorted(offsets) == ([] if learn_biases is None else [("fc1",), ("fc2",), ("fc3",)])
  assert all(float(jnp.max(jnp.abs(v))) > 1e-3 for v in offsets.values())


def test_train_classifier_weight_decay_shrinks_weights():
  """AdamW's decoupled decay (the float LeNet recipe): same data and seed, smaller kernels, same fit to the data."""
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 256).astype(np.int32)
  x = rng.uniform(0, 0.5, (256, 28, 28, 1)).astype(np.float32)
  x[y == 1, :14] += 0.5  # class 1: the top half is brighter
  fit = {wd: training.train_classifier(LeNet5(num_classes=2), x, y, epochs=4, batch_size=32, lr=3e-3,
                                       weight_decay=wd, progress=False)
         for wd in (0.0, 10.0)}

  def kernel_norm(p):
    return float(np.sqrt(sum(np.sum(np.square(p[layer]["kernel"])) for layer in p)))

  assert kernel_norm(fit[10.0]) < 0.8 * kernel_norm(fit[0.0])
  for p in fit.values():  # both still learn the rule
    acc = np.mean(np.argmax(LeNet5(num_classes=2).apply({"params": p}, x), -1) == y)
    assert acc > 0.9, acc

"""Losses, schedules, optimizer-state resets and the train step."""

import dataclasses

import flax
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


def _adam_steps(tx, state, n, grad=1.0):
  """``n`` updates of a 2-element parameter under a constant gradient: their magnitudes."""
  params, out = {"a": jnp.zeros(2)}, []
  for _ in range(n):
    u, state = tx.update({"a": jnp.full(2, grad)}, state, params)
    out.append(float(jnp.abs(u["a"][0])))
  return out, state


@pytest.mark.parametrize("schedule", ["reference", "cosine_restarts"])
def test_optimizer_applies_the_schedule_at_the_global_step(schedule):
  """Update t is scaled by schedule(t), also after each restart's reset of Adam's moments. Under a constant gradient
  Adam's bias-corrected direction is exactly 1, so each update's magnitude is the learning rate applied. (The
  reference schedule's decay used to restart with the moments: after the reset at step 4 it applied lr(0) again.)"""
  cfg = ml_collections.ConfigDict(dict(schedule=schedule, lr=1e-2, lr_min=1e-4, restart_period=4))
  tx, sched = training.make_optimizer(cfg)
  params = {"a": jnp.zeros(2)}
  sizes, _ = _adam_steps(tx, tx.init(params), 12)
  np.testing.assert_allclose(sizes, [float(sched(t)) for t in range(12)], rtol=1e-4)
  if schedule == "reference":  # its decay goes on past the first period: step 8 is not step 0
    assert sizes[8] < 0.6 * sizes[0]


def test_reset_optimizer_state_keeps_the_schedule_and_the_restart_cycle():
  """After a NaN/Inf the loop resets Adam's moments at step s: the next update is a fresh Adam step (magnitude
  lr(s) whatever the gradients before), the schedule does not start over, and restarts stay at multiples of P."""
  cfg = ml_collections.ConfigDict(dict(schedule="cosine_restarts", lr=1e-2, lr_min=0.0, restart_period=4))
  tx, sched = training.make_optimizer(cfg)
  params = {"a": jnp.zeros(2)}
  _, state = _adam_steps(tx, tx.init(params), 5, grad=-3.0)  # moments pointing the other way
  state = training.reset_optimizer_state(tx, params, 5)
  sizes, _ = _adam_steps(tx, state, 7)  # updates 5..11, a restart at 8
  np.testing.assert_allclose(sizes, [float(sched(t)) for t in range(5, 12)], rtol=1e-4)
  assert sizes[3] == pytest.approx(1e-2, rel=1e-4)  # update 8: the cycle's peak again


def test_nan_step_restores_good_thresholds_and_still_evaluates_the_last_step():
  """A batch whose loss is NaN (here: a NaN teacher logit on one image) restores the last checkpoint's thresholds and
  training goes on; when that batch is the very last step, the final evaluation still runs."""
  from scripts.finetune_tiny import tiny_problem  # tests/scripts: the crash-safety tests' model and data

  model, x, teacher, frozen, th = tiny_problem(100, 40)
  cfg = ml_collections.ConfigDict(dict(epochs=2, batch_size=20, loss="rmse", schedule="cosine_restarts", lr=3e-2,
                                       lr_min=0.0, restart_period=3, eval_every=2, seed=0))
  train, steps_per_epoch = x[:80], 4
  last_batch = np.random.default_rng([0, 1]).permutation(80)[3 * 20:]  # step 8's images (training.finetune's order)
  teacher_train = teacher[:80].copy()
  teacher_train[last_batch[0], 0] = np.nan  # that image is in one batch of each epoch, the last step's in epoch 1
  logs = []
  best, history = training.finetune(model, frozen, th, train, teacher_train,
                                    (x[80:], teacher[80:]), cfg, progress=False, log=logs.append)
  nan_steps = [int(line.split(":")[0].split()[1]) for line in logs if "became NaN/Inf" in line]
  assert len(nan_steps) == 2 and nan_steps[-1] == 2 * steps_per_epoch, logs
  assert [h["step"] for h in history] == [0, 2, 4, 6, 8]  # the last step evaluated after its NaN
  assert all(np.isfinite(h["holdout_loss"]) for h in history)
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(best))
  # after the NaN at step 8 the thresholds are step 6's (the last evaluation): the same held-out loss
  assert history[-1]["holdout_loss"] == history[-2]["holdout_loss"]


def test_a_ctrl_c_whose_keyboard_interrupt_python_drops_still_stops_fine_tuning(tmp_path, monkeypatch):
  """Python drops a KeyboardInterrupt raised inside a garbage-collection callback (JAX registers one): the run went
  on. Here the interrupt is raised inside the step and dropped there; the loop stops before the next step, state
  saved, and the default handler is back afterwards."""
  import signal
  from scripts.finetune_tiny import tiny_problem

  model, x, teacher, frozen, th = tiny_problem(100, 40)
  cfg = ml_collections.ConfigDict(dict(epochs=2, batch_size=20, loss="rmse", schedule="constant", lr=1e-3,
                                       lr_min=0.0, restart_period=3, eval_every=2, seed=0, checkpoint_every=0))
  make = training.make_train_step

  def dropping_make(*a, **k):
    step_fn = make(*a, **k)

    def step(state, *rest):
      if int(state.step) == 2:
        try:
          signal.raise_signal(signal.SIGINT)  # Ctrl-C...
        except KeyboardInterrupt:
          pass  # ... whose exception is lost, as in a gc callback
      return step_fn(state, *rest)
    return step

  monkeypatch.setattr(training, "make_train_step", dropping_make)
  # as from a terminal: a shell starts background jobs (CI under nohup) with SIGINT ignored
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  logs = []
  try:
    with pytest.raises(KeyboardInterrupt):
      training.finetune(model, frozen, th, x[:80], teacher[:80], (x[80:], teacher[80:]), cfg, workdir=str(tmp_path),
                        progress=False, log=logs.append)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, previous)
  assert logs[-1] == "interrupted at step 3: state saved; continue with --resume", logs


def test_held_out_set_whose_tail_is_not_a_batch_is_logged_and_an_empty_one_refused():
  from scripts.finetune_tiny import tiny_problem

  model, x, teacher, frozen, th = tiny_problem(100, 40)
  cfg = ml_collections.ConfigDict(dict(epochs=1, batch_size=20, loss="rmse", schedule="constant", lr=1e-3,
                                       lr_min=0.0, restart_period=3, seed=0))
  logs = []
  _, history = training.finetune(model, frozen, th, x[:40], teacher[:40], (x[40:90], teacher[40:90]), cfg,
                                 progress=False, log=logs.append)
  assert "held-out loss over 40 of 50 images (whole batches of 20); set data.num_holdout to a multiple of 20" in logs[0]
  loss = np.mean([float(training.rmse(model.apply({**frozen, "quant": th}, x[i:i + 20]), teacher[i:i + 20]))
                  for i in (40, 60)])
  np.testing.assert_allclose(history[0]["holdout_loss"], loss, rtol=1e-6)
  with pytest.raises(ValueError, match="fine-tuning needs held-out images"):
    training.finetune(model, frozen, th, x[:40], teacher[:40], (x[:0], teacher[:0]), cfg, progress=False)


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


def test_projected_factors_come_back_from_their_bounds():
  """FAT's alpha starts on its upper bound. Data wider than the calibrated range push it past the bound; once the data
  narrow, the loss wants alpha = 0.5. Unprojected, alpha stays past 1 (clipped there: no gradient) for good."""
  fq = layers.FakeQuant(fatq.QuantSpec.fat(4))
  stats = fq.apply({}, jnp.linspace(-1.0, 1.0, 101), mutable=[layers.STATS])[1][layers.STATS]
  th = fq.apply({layers.STATS: stats}, jnp.ones(3), mutable=[layers.THRESHOLDS])[1][layers.THRESHOLDS]
  frozen = {layers.STATS: stats}
  lower, upper = training.factor_bounds(fq, frozen, th, np.ones(3, np.float32))
  assert (float(lower["scale"]), float(upper["scale"])) == (0.5, 1.0)
  wide, narrow = (jnp.linspace(-t, t, 101)[None] for t in (1.5, 0.3))
  tx = optax.adam(1e-2)
  alphas = {}
  for bounds in (None, (lower, upper)):
    step = training.make_train_step(fq, tx, training.rmse, bounds=bounds)
    state = training.TrainState(jnp.zeros([], jnp.int32), th, tx.init(th))
    for i in range(200):
      x = wide if i < 3 else narrow
      state, _ = step(state, frozen, x, x)  # teacher: the float tensor itself
    alphas[bounds is not None] = float(state.thresholds["scale"])
  assert alphas[False] > 1.0 and 0.5 <= alphas[True] < 0.6, alphas


def test_factor_bounds_follow_each_tensors_calibrated_sign():
  qcfg = dataclasses.replace(fatq.QuantConfig.uniform(fatq.QuantSpec.fat(4, per_channel=True),
                                                      fatq.QuantSpec.fat(4, symmetric=False)), learn_biases="fc3")
  m = LeNet5(quant=qcfg)
  x = np.asarray(jax.random.uniform(jax.random.key(0), (8, 28, 28, 1)))
  params = m.init(jax.random.key(1), x)["params"]
  stats = fatq.calibrate(m, params, [x])
  th = fatq.init_thresholds(m, params, stats, x[:1])
  lower, upper = training.factor_bounds(m, {"params": params, "quant_stats": stats}, th, x[:1])
  flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(th)).items()}
  low = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(lower)).items()}
  high = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(upper)).items()}
  assert set(flat) == set(low) == set(high) and "fc3/bias_offset" in flat and "conv1/kernel_quant/scale" in flat
  stat_min = {"/".join(k[:-1]): v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(stats)).items()
              if k[-1] == "min"}
  for name, v in flat.items():
    point, factor = name.rsplit("/", 1)
    lo_b, hi_b = np.asarray(low[name]), np.asarray(high[name])
    assert lo_b.shape == hi_b.shape == v.shape, name
    if factor == "bias_offset":
      assert np.all(lo_b == -np.inf) and np.all(hi_b == np.inf)
    elif factor in ("scale", "width"):
      assert np.all(lo_b == 0.5) and np.all(hi_b == 1.0), name
    else:
      want = (-0.2, 0.4) if np.min(stat_min[point]) < 0 else (0.0, 0.4)
      np.testing.assert_allclose([lo_b.min(), hi_b.max()], want, err_msg=name)


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


def _tiny():
  from scripts.finetune_tiny import tiny_problem
  return tiny_problem(100, 40)


def _holdout_loss(model, frozen, th, x, t, bs=20):
  return float(np.mean([float(training.rmse(model.apply({**frozen, "quant": th}, x[i:i + bs]), t[i:i + bs]))
                        for i in range(0, len(x) - bs + 1, bs)]))


def test_finetune_returns_the_best_held_out_thresholds_not_the_last():
  """A run whose held-out loss rises after the start (lr 3e-2 on the tiny problem): the thresholds returned are
  those of the lowest held-out loss in the history, here not the last evaluation's."""
  model, x, teacher, frozen, th = _tiny()
  cfg = ml_collections.ConfigDict(dict(epochs=2, batch_size=20, loss="rmse", schedule="cosine_restarts", lr=3e-2,
                                       lr_min=0.0, restart_period=3, eval_every=2, seed=0))
  best, history = training.finetune(model, frozen, th, x[:80], teacher[:80], (x[80:], teacher[80:]), cfg,
                                    progress=False, log=lambda *_: None)
  losses = [h["holdout_loss"] for h in history]
  assert losses[-1] > min(losses)  # the scenario: the last evaluation is not the best
  np.testing.assert_allclose(_holdout_loss(model, frozen, best, x[80:], teacher[80:]), min(losses), rtol=1e-6)


def test_nan_step_resets_adam_moments_even_between_restarts():
  """The NaN batch of test_training's NaN test, with restarts far apart (restart_period 100): only the two NaN
  batches are reported; moments left NaN would make every later step NaN."""
  model, x, teacher, frozen, th = _tiny()
  cfg = ml_collections.ConfigDict(dict(epochs=2, batch_size=20, loss="rmse", schedule="cosine_restarts", lr=3e-2,
                                       lr_min=0.0, restart_period=100, eval_every=2, seed=0))
  last_batch = np.random.default_rng([0, 1]).permutation(80)[3 * 20:]
  teacher_train = teacher[:80].copy()
  teacher_train[last_batch[0], 0] = np.nan
  logs = []
  best, history = training.finetune(model, frozen, th, x[:80], teacher_train, (x[80:], teacher[80:]), cfg,
                                    progress=False, log=logs.append)
  nan_steps = [line for line in logs if "became NaN/Inf" in line]
  assert len(nan_steps) == 2, nan_steps
  # and training moved the thresholds between the two NaN steps
  assert len({h["holdout_loss"] for h in history}) >= 4

"""FAT fine-tuning: distillation losses, learning-rate schedules, the pure train step and the training loop.

Only the FAT factors (the ``quant`` collection) are trained; weights (``params``) and calibration statistics
(``quant_stats``) are frozen. The teacher is the same model applied without quantization; its logits are computed
once per image and passed to the step.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from fatq.calibration import finite
from fatq.layers import THRESHOLDS

Tree = Any


# ---------------------------------------------------------------------------------------------------------------------
# Losses on pre-softmax outputs.


def rmse(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """FAT paper: ``sqrt(mean((q - f)^2))`` over batch and classes."""
  return jnp.sqrt(jnp.mean(jnp.square(student - teacher)))


def smoothed_l1(student: jax.Array, teacher: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Reference code: ``mean_batch(sum_classes sqrt((q - f)^2 + eps))``."""
  return jnp.mean(jnp.sum(jnp.sqrt(jnp.square(student - teacher) + eps), axis=-1))


LOSSES = {"rmse": rmse, "smoothed_l1": smoothed_l1}


# ---------------------------------------------------------------------------------------------------------------------
# Schedules and optimizer.


def cosine_restarts(peak: float, period: int, floor: float = 0.0) -> optax.Schedule:
  """Cosine annealing with warm restarts (SGDR): ``lr(t) = floor + (peak - floor)(1 + cos(pi (t mod P) / P)) / 2``."""
  if period < 1:
    raise ValueError(f"restart period must be >= 1 step, got {period}")
  cosine = optax.cosine_decay_schedule(peak, period, alpha=floor / peak if peak else 0.0)
  return lambda step: cosine(step % period)


def reference_schedule(peak: float = 1e-3, period: int = 400, decay: float = 1e-4) -> optax.Schedule:
  """Public reference code: ``lr(t) = peak * exp(-decay t) * |cos(pi t / (4 P))|`` (Adam reset every P steps)."""
  return lambda step: peak * jnp.exp(-decay * step) * jnp.abs(jnp.cos(jnp.pi * step / (4 * period)))


class ResetState(NamedTuple):
  count: jax.Array
  inner: Any


def reset_every(inner: optax.GradientTransformation, period: int) -> optax.GradientTransformation:
  """Re-initialise ``inner``'s state (e.g. Adam's moments) every ``period`` updates: warm restarts reset the
  optimizer, as in the FAT paper. The state is reset *before* the update at steps ``k * period`` (k >= 1)."""

  def init(params):
    return ResetState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    fresh = inner.init(jax.tree.map(jnp.zeros_like, updates))
    restart = (state.count > 0) & (state.count % period == 0)
    inner_state = jax.tree.map(lambda a, b: jnp.where(restart, a, b), fresh, state.inner)
    updates, inner_state = inner.update(updates, inner_state, params)
    return updates, ResetState(state.count + 1, inner_state)

  return optax.GradientTransformation(init, update)


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam under the configured schedule: ``cosine_restarts`` (lr, lr_min, restart_period) or ``reference``."""
  if cfg.schedule == "cosine_restarts":
    schedule = cosine_restarts(cfg.lr, cfg.restart_period, cfg.get("lr_min", 0.0))
  elif cfg.schedule == "reference":
    schedule = reference_schedule(cfg.lr, cfg.restart_period)
  elif cfg.schedule == "constant":
    schedule = optax.constant_schedule(cfg.lr)
  else:
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose 'cosine_restarts', 'reference' or 'constant'")
  return reset_every(optax.adam(schedule), cfg.restart_period), schedule


# ---------------------------------------------------------------------------------------------------------------------
# The train step.


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  thresholds: Tree
  opt_state: Tree


def make_train_step(model, optimizer: optax.GradientTransformation, loss_fn: Callable) -> Callable:
  """``step(state, frozen, images, teacher_logits) -> (state, loss)``: one pure, jitted update of the thresholds.

  ``frozen`` holds ``params`` and ``quant_stats``; gradients are taken with respect to ``state.thresholds`` only.
  """

  def loss_of(thresholds, frozen, images, teacher_logits):
    return loss_fn(model.apply({**frozen, THRESHOLDS: thresholds}, images), teacher_logits)

  @jax.jit
  def step(state: TrainState, frozen: Tree, images: jax.Array, teacher_logits: jax.Array):
    loss, grads = jax.value_and_grad(loss_of)(state.thresholds, frozen, images, teacher_logits)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.thresholds)
    thresholds = optax.apply_updates(state.thresholds, updates)
    return TrainState(state.step + 1, thresholds, opt_state), loss

  return step


def make_eval_loss(model, loss_fn: Callable) -> Callable:
  @jax.jit
  def eval_loss(thresholds, frozen, images, teacher_logits):
    return loss_fn(model.apply({**frozen, THRESHOLDS: thresholds}, images), teacher_logits)

  return eval_loss


def predict(model, variables: Tree, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """Logits of ``images`` in batches (the last batch padded, so only one shape is compiled)."""
  fwd = jax.jit(lambda v, x: model.apply(v, x))
  out = []
  for i in range(0, len(images), batch_size):
    x = images[i:i + batch_size]
    n = len(x)
    if n < batch_size:
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
    out.append(np.asarray(fwd(variables, x))[:n])
  return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------------------------
# The training loop.


def finetune(model, frozen: Tree, thresholds: Tree, images: np.ndarray, teacher_logits: np.ndarray,
             holdout: tuple[np.ndarray, np.ndarray], cfg, workdir: str | None = None,
             log: Callable[[str], None] = print, progress: bool = True) -> tuple[Tree, list[dict]]:
  """Train the FAT factors on unlabeled ``images`` against cached ``teacher_logits``.

  Every ``cfg.eval_every`` steps (and at the end) the distillation loss on the held-out images is measured; the
  thresholds returned are those of the best held-out loss, not the last step. A non-finite threshold restores the
  last good thresholds and resets the optimizer. Returns ``(best_thresholds, history)``; with a ``workdir`` the
  history is also appended to ``workdir/metrics.jsonl``.
  """
  if not jax.tree.leaves(thresholds):
    log("nothing to train: no quantization point has trainable thresholds")
    return thresholds, []
  loss_fn = LOSSES[cfg.loss]
  optimizer, schedule = make_optimizer(cfg)
  step_fn = make_train_step(model, optimizer, loss_fn)
  eval_fn = make_eval_loss(model, loss_fn)
  n, bs = len(images), cfg.batch_size
  if n < bs:
    raise ValueError(f"{n} training images is fewer than one batch of {bs}: lower batch_size or add images")
  steps_per_epoch = n // bs
  total = steps_per_epoch * cfg.epochs
  eval_every = cfg.get("eval_every", 0) or steps_per_epoch

  def holdout_loss(th):
    x, t = holdout
    losses = [float(eval_fn(th, frozen, x[i:i + bs], t[i:i + bs])) for i in range(0, len(x) - bs + 1, bs)]
    if not losses:  # fewer held-out images than a batch
      losses = [float(eval_fn(th, frozen, x, t))]
    return float(np.mean(losses))

  state = TrainState(jnp.zeros([], jnp.int32), thresholds, optimizer.init(thresholds))
  best, best_loss = thresholds, holdout_loss(thresholds)
  last_good = state
  history = []
  metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a") if workdir else None

  def record(entry):
    history.append(entry)
    if metrics_file:
      metrics_file.write(json.dumps(entry) + "\n")
      metrics_file.flush()

  record(dict(step=0, holdout_loss=best_loss))
  bar = tqdm(total=total, disable=not progress, unit="step", dynamic_ncols=True)
  rng = np.random.default_rng(cfg.get("seed", 0))
  t0, seen, window = time.perf_counter(), 0, []
  for epoch in range(cfg.epochs):
    order = rng.permutation(n)
    for b in range(steps_per_epoch):
      idx = np.sort(order[b * bs:(b + 1) * bs])
      state, loss = step_fn(state, frozen, images[idx], teacher_logits[idx])
      step = int(state.step)
      if not bool(finite(state.thresholds)):
        log(f"step {step}: a threshold became NaN/Inf; restoring the last good thresholds and resetting Adam")
        state = TrainState(state.step, last_good.thresholds, optimizer.init(last_good.thresholds))
        continue
      seen += bs
      window.append(float(loss))
      if step % eval_every == 0 or step == total:
        hl = holdout_loss(state.thresholds)
        if hl < best_loss:
          best, best_loss = state.thresholds, hl
        last_good = state
        elapsed = time.perf_counter() - t0
        record(dict(step=step, epoch=epoch, train_loss=float(np.mean(window)), holdout_loss=hl,
                    best_holdout_loss=best_loss, lr=float(schedule(step - 1)), images_per_s=seen / elapsed))
        window = []
      bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{float(schedule(step - 1)):.2e}",
                      img_s=f"{seen / (time.perf_counter() - t0):.0f}", refresh=False)
      bar.update(1)
  bar.close()
  if metrics_file:
    metrics_file.close()
  log(f"fine-tuned {total} steps: held-out loss {history[0]['holdout_loss']:.4f} -> best {best_loss:.4f}")
  return best, history


def train_classifier(model, images: np.ndarray, labels: np.ndarray, *, epochs: int, batch_size: int = 128,
                     lr: float = 1e-3, seed: int = 0, log: Callable[[str], None] = print,
                     progress: bool = True) -> Tree:
  """Supervised float training (cross-entropy, Adam with cosine decay): how the small models get their
  pre-trained weights. Returns ``params``."""
  rng = np.random.default_rng(seed)
  params = model.init(jax.random.key(seed), images[:1])["params"]
  steps_per_epoch = len(images) // batch_size
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps_per_epoch * epochs))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_of(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

    loss, grads = jax.value_and_grad(loss_of)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  bar = tqdm(total=steps_per_epoch * epochs, disable=not progress, unit="step", dynamic_ncols=True)
  for epoch in range(epochs):
    order = rng.permutation(len(images))
    for b in range(steps_per_epoch):
      idx = order[b * batch_size:(b + 1) * batch_size]
      params, opt_state, loss = step(params, opt_state, images[idx], labels[idx])
      bar.set_postfix(epoch=epoch, loss=f"{float(loss):.4f}", refresh=False)
      bar.update(1)
  bar.close()
  return params

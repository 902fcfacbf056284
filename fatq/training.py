"""FAT fine-tuning: distillation losses, learning-rate schedules, the pure train step and the training loop.

Only the FAT factors (the ``quant`` collection) are trained; weights (``params``) and calibration statistics
(``quant_stats``) are frozen. The teacher is the same model applied without quantization; its logits are computed
once per image and passed to the step.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from fatq import parallel
from fatq.calibration import finite
from fatq.fileio import write_atomically
from fatq.layers import FACTOR_BOUNDS, THRESHOLDS

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
  """Adam under the configured schedule: ``cosine_restarts`` (lr, lr_min, restart_period), ``reference`` or
  ``constant``; Adam's moments reset every ``restart_period`` steps.

  ``chain(reset_every(scale_by_adam, P), scale_by_learning_rate(schedule))``: the schedule keeps its own step count,
  which the resets do not touch, so update ``t`` is scaled by ``schedule(t)``. (``reset_every(adam(schedule), P)``
  would reset the schedule's count with the moments: fine for cosine restarts, which wrap every P steps anyway, but the
  reference schedule's decay would never get past step P.)
  """
  if cfg.schedule == "cosine_restarts":
    schedule = cosine_restarts(cfg.lr, cfg.restart_period, cfg.get("lr_min", 0.0))
  elif cfg.schedule == "reference":
    schedule = reference_schedule(cfg.lr, cfg.restart_period)
  elif cfg.schedule == "constant":
    schedule = optax.constant_schedule(cfg.lr)
  else:
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose 'cosine_restarts', 'reference' or 'constant'")
  return optax.chain(reset_every(optax.scale_by_adam(), cfg.restart_period),
                     optax.scale_by_learning_rate(schedule)), schedule


def reset_optimizer_state(optimizer: optax.GradientTransformation, thresholds: Tree, step: int) -> Tree:
  """A state of :func:`make_optimizer`'s optimizer with fresh Adam moments whose next update is update ``step``: the
  schedule and the restart cycle go on where they were (after a NaN/Inf, training resumes from good thresholds)."""
  (resets, schedule) = optimizer.init(thresholds)
  count = jnp.asarray(step, jnp.int32)
  return (resets._replace(count=count), schedule._replace(count=count))


# ---------------------------------------------------------------------------------------------------------------------
# The train step.


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  thresholds: Tree
  opt_state: Tree


def _jit(fn: Callable, mesh, n_replicated: int, n_batch: int) -> Callable:
  """``jax.jit(fn)``; with a ``mesh``, the first ``n_replicated`` arguments and every output are replicated and the
  last ``n_batch`` arguments are split along the batch dimension (data parallelism)."""
  if mesh is None:
    return jax.jit(fn)
  rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(fn, in_shardings=(rep,) * n_replicated + (data,) * n_batch, out_shardings=rep)


class UnrestorableCheckpoint(RuntimeError):
  """``--resume`` found training checkpoints, none of which can be read (the message says what to do)."""


def factor_bounds(model, frozen: Tree, thresholds: Tree, sample: np.ndarray) -> tuple[Tree, Tree]:
  """``(lower, upper)``: trees like ``thresholds`` holding each FAT factor's bounds (its spec's, for a shift those of
  the tensor's calibrated sign), and -inf / inf for other trained values (bias offsets, LSQ steps). One forward pass
  of ``sample`` records them."""
  _, state = model.apply({**frozen, THRESHOLDS: thresholds}, sample, mutable=[FACTOR_BOUNDS])
  bounds = flax.traverse_util.flatten_dict(flax.core.unfreeze(state.get(FACTOR_BOUNDS, {})))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(thresholds))
  lower, upper = ({k: bounds[k][i] if k in bounds else jnp.full_like(v, (-1) ** (i + 1) * jnp.inf)
                   for k, v in flat.items()} for i in (0, 1))
  # numpy: constants of the jitted step that no device holds, so they go wherever a mesh puts the thresholds
  return tuple(jax.tree.map(np.asarray, flax.traverse_util.unflatten_dict(t)) for t in (lower, upper))


def make_train_step(model, optimizer: optax.GradientTransformation, loss_fn: Callable, mesh=None,
                    bounds: tuple[Tree, Tree] | None = None) -> Callable:
  """``step(state, frozen, images, teacher_logits) -> (state, loss)``: one pure, jitted update of the thresholds.

  ``frozen`` holds ``params`` and ``quant_stats``; gradients are taken with respect to ``state.thresholds`` only.
  With a ``mesh`` (``fatq.parallel.make_mesh``) the batch is split over its devices and the state replicated: the
  loss is the mean over the global batch, so the update is the single-device one.

  ``bounds`` (``(lower, upper)`` of :func:`factor_bounds`): projected gradient descent. After each update every
  factor is clipped back into its bounds, ``alpha <- clip(alpha - update, a, b)``. Without it (the paper's and the
  reference code's way) a factor that a step carries past its bound gets no gradient again (the forward pass clips it)
  and stays there whatever the loss asks for later; FAT's factors start on a bound (``alpha = 1``).
  """

  def loss_of(thresholds, frozen, images, teacher_logits):
    return loss_fn(model.apply({**frozen, THRESHOLDS: thresholds}, images), teacher_logits)

  def step(state: TrainState, frozen: Tree, images: jax.Array, teacher_logits: jax.Array):
    loss, grads = jax.value_and_grad(loss_of)(state.thresholds, frozen, images, teacher_logits)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.thresholds)
    thresholds = optax.apply_updates(state.thresholds, updates)
    if bounds is not None:
      thresholds = optax.projections.projection_box(thresholds, *bounds)
    return TrainState(state.step + 1, thresholds, opt_state), loss

  return _jit(step, mesh, n_replicated=2, n_batch=2)


def make_eval_loss(model, loss_fn: Callable, mesh=None) -> Callable:
  """``eval_loss(thresholds, frozen, images, teacher_logits) -> loss``, sharded like the train step."""

  def eval_loss(thresholds, frozen, images, teacher_logits):
    return loss_fn(model.apply({**frozen, THRESHOLDS: thresholds}, images), teacher_logits)

  return _jit(eval_loss, mesh, n_replicated=2, n_batch=2)


def predict(model, variables: Tree, images: np.ndarray, batch_size: int = 256, mesh=None) -> np.ndarray:
  """Logits of ``images`` in batches (the last batch padded, so only one shape is compiled).

  Batches are split over ``mesh`` (default: every visible device); ``batch_size`` is rounded up to a multiple of
  the device count. Each image's logits do not depend on the others in its batch, so padding changes nothing.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  batch_size = parallel.round_up(batch_size, parallel.num_devices(mesh))
  fwd = _jit(lambda v, x: model.apply(v, x), mesh, n_replicated=1, n_batch=1)
  variables = parallel.replicate(mesh, variables)  # once, not per batch
  out = []
  for i in range(0, len(images), batch_size):
    x = images[i:i + batch_size]
    n = len(x)
    if n < batch_size:
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
    out.append(np.asarray(fwd(variables, parallel.shard_batch(mesh, x)))[:n])
  return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------------------------
# The training loop.


def finetune(model, frozen: Tree, thresholds: Tree, images: np.ndarray, teacher_logits: np.ndarray,
             holdout: tuple[np.ndarray, np.ndarray], cfg, workdir: str | None = None, resume: bool = False,
             log: Callable[[str], None] = print, progress: bool = True, mesh=None,
             loss_fn: Callable | None = None) -> tuple[Tree, list[dict]]:
  """Train the FAT factors on unlabeled ``images`` against cached ``teacher_logits``.

  The loss is ``LOSSES[cfg.loss]``, or ``loss_fn(student_logits, targets)`` where a caller trains against other
  targets (the workbench's LSQ rows: one-hot labels), without adding it to the losses that configs can name.

  Every ``cfg.eval_every`` steps (and at the end) the distillation loss on the held-out images is measured; the
  thresholds returned are those of the best held-out loss, not the last step. A non-finite threshold or loss restores
  the thresholds of the last checkpoint (every evaluation and periodic checkpoint; the calibrated ones before the
  first) and resets Adam's moments; the schedule goes on where it was.

  With a ``workdir``: metrics go to ``workdir/metrics.jsonl`` (one JSON object per evaluation, with each point's
  mean factor values for trajectory plots), and an orbax checkpoint of the whole training state is kept in
  ``workdir/train_state`` every ``cfg.checkpoint_every`` steps, at every evaluation and on Ctrl-C.
  ``resume=True`` continues from the latest checkpoint exactly: the batch order is a pure function of
  ``(seed, epoch)``, so the resumed run sees the same batches as an uninterrupted one. A step is saved only once its
  held-out evaluation is recorded: interrupted during one, the run resumes at that step again.

  Data parallel over ``mesh`` (default: every visible device, ``fatq.parallel``): each batch is split over the
  devices, thresholds, optimizer state and ``frozen`` are replicated. The global batch is
  ``cfg.per_device_batch_size * devices`` when that is set, else ``cfg.batch_size`` (a multiple of the device
  count). One device runs the single-device program.

  Returns ``(best_thresholds, history)``.
  """
  if not jax.tree.leaves(thresholds):
    log("nothing to train: no quantization point has trainable thresholds")
    return thresholds, []
  mesh = parallel.make_mesh() if mesh is None else mesh
  n_dev = parallel.num_devices(mesh)
  loss_fn = LOSSES[cfg.loss] if loss_fn is None else loss_fn
  optimizer, schedule = make_optimizer(cfg)
  bounds = factor_bounds(model, frozen, thresholds, images[:1]) if cfg.get("project_factors", False) else None
  step_fn = make_train_step(model, optimizer, loss_fn, mesh, bounds)
  eval_fn = make_eval_loss(model, loss_fn, mesh)
  n, bs = len(images), parallel.global_batch_size(cfg, n_dev)
  if n < bs:
    raise ValueError(f"{n} training images is fewer than one batch of {bs}: lower batch_size or add images")
  steps_per_epoch = n // bs
  total = steps_per_epoch * cfg.epochs
  eval_every = cfg.get("eval_every", 0) or steps_per_epoch
  seed = cfg.get("seed", 0)
  batches = dict(batch_size=bs, train_images=n, seed=seed)  # what the batch order is a function of
  if n_dev > 1:
    log(f"data parallel over {parallel.describe(mesh)}: global batch {bs} ({bs // n_dev} per device)")
  frozen = parallel.replicate(mesh, frozen)  # placed once; the step's in_shardings then move nothing

  # the held-out loss: the mean loss of whole batches of bs, or of one batch of all the images when there are fewer
  if not len(holdout[0]):
    raise ValueError("fine-tuning needs held-out images (to keep the thresholds of the best held-out loss); got none")
  hb = min(bs, len(holdout[0]))
  if len(holdout[0]) % hb:
    log(f"held-out loss over {len(holdout[0]) // hb * hb} of {len(holdout[0])} images (whole batches of {hb}); "
        f"set data.num_holdout to a multiple of {hb} to use every one")

  def holdout_loss(th):
    x, t = holdout
    starts = range(0, len(x) - hb + 1, hb)
    if hb % n_dev:  # one batch that does not split over the devices: its logits padded, the loss on these images
      return float(loss_fn(jnp.asarray(predict(model, {**frozen, THRESHOLDS: th}, x, hb, mesh)), jnp.asarray(t)))
    return float(np.mean([float(eval_fn(th, frozen, *parallel.shard_batch(mesh, (x[i:i + hb], t[i:i + hb]))))
                          for i in starts]))

  state = parallel.replicate(mesh, TrainState(jnp.zeros([], jnp.int32), thresholds, optimizer.init(thresholds)))
  best, best_loss = thresholds, None
  ckpt = _TrainCheckpoints(workdir, cfg.get("checkpoint_every", 0)) if workdir else None
  history: list[dict] = []
  if resume and ckpt and ckpt.latest() is not None:
    restored = ckpt.restore(dict(state=state, best=best, best_loss=0.0, last_good=thresholds, window=np.zeros(2)))
    state, best, best_loss = restored["state"], restored["best"], float(restored["best_loss"])
    window = restored["window"]  # the train losses since the last evaluation: their sum and count
    state = parallel.replicate(mesh, state)  # restored as host numpy arrays
    last_good = restored["last_good"]
    history = _read_history(ckpt.metrics_path, int(state.step))
    _check_same_batches(history, batches, n_dev, ckpt.metrics_path)
    log(f"resumed at step {int(state.step)} of {total} (best held-out loss {best_loss:.4f})")
  else:
    last_good, window = state.thresholds, np.zeros(2)

  def record(entry):
    history.append(entry)
    if ckpt:
      with open(ckpt.metrics_path, "a") as f:
        f.write(json.dumps(entry) + "\n")

  if best_loss is None:  # a fresh run: nothing of an earlier run in this workdir is left for a later --resume
    if ckpt:
      ckpt.clear()
    # the replicated copy: the same argument types as every later evaluation, so eval_loss compiles once
    best_loss = holdout_loss(state.thresholds)
    record(dict(step=0, holdout_loss=best_loss, factors=factor_summary(thresholds), **batches, devices=n_dev))

  def save(reason: str):
    if ckpt:
      ckpt.save(int(state.step), dict(state=state, best=best, best_loss=best_loss, last_good=last_good,
                                      window=window), reason)

  bar = tqdm(total=total, initial=int(state.step), disable=not progress, unit="step", dynamic_ncols=True)
  t0, seen = time.perf_counter(), 0
  interrupted, stop_noting = _note_interrupts()
  try:
    while int(state.step) < total:
      if interrupted:  # a Ctrl-C whose KeyboardInterrupt Python dropped (see _note_interrupts)
        raise KeyboardInterrupt
      # ``state`` is committed: saved on Ctrl-C. The step's state becomes it only once its evaluation is recorded.
      step = int(state.step)
      epoch, b = divmod(step, steps_per_epoch)
      order = np.random.default_rng([seed, epoch]).permutation(n)
      idx = np.sort(order[b * bs:(b + 1) * bs])
      new_state, loss = step_fn(state, frozen, *parallel.shard_batch(mesh, (images[idx], teacher_logits[idx])))
      step += 1
      lr = float(schedule(step - 1))
      new_window = window  # the committed state's, until the step is committed
      if bool(finite(new_state.thresholds)) and np.isfinite(float(loss)):
        seen += bs
        new_window = window + np.array([float(loss), 1.0])
      else:
        log(f"step {step}: loss or a threshold became NaN/Inf; restoring the last checkpoint's thresholds and "
            "resetting Adam's moments")
        new_state = parallel.replicate(mesh, TrainState(new_state.step, last_good,
                                                        reset_optimizer_state(optimizer, last_good, step)))
      if step % eval_every == 0 or step == total:
        hl = holdout_loss(new_state.thresholds)
        if hl < best_loss:
          best, best_loss = new_state.thresholds, hl
        train_loss = float(new_window[0] / new_window[1]) if new_window[1] else None
        record(dict(step=step, epoch=epoch, train_loss=train_loss, holdout_loss=hl,
                    best_holdout_loss=best_loss, lr=lr, images_per_s=seen / (time.perf_counter() - t0),
                    factors=factor_summary(new_state.thresholds)))
        state, last_good, window = new_state, new_state.thresholds, np.zeros(2)
        save("eval")
      else:
        state, window = new_state, new_window
        if ckpt and ckpt.every and step % ckpt.every == 0:
          last_good = state.thresholds
          save("periodic")
      bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.2e}",
                      img_s=f"{seen / (time.perf_counter() - t0):.1f}", refresh=False)
      bar.update(1)
  except KeyboardInterrupt:
    save("interrupted")
    bar.close()
    if ckpt:  # closed before the process exits (fatq.cli.interruptible ends it at once)
      ckpt.close()
    log(f"interrupted at step {int(state.step)}: state saved; continue with --resume")
    raise
  finally:
    stop_noting()
  bar.close()
  if ckpt:
    ckpt.close()
  start = f"held-out loss {history[0]['holdout_loss']:.4f} -> " if history else "held-out loss: "
  log(f"fine-tuned {total} steps: {start}best {best_loss:.4f}")
  return best, history


def _note_interrupts() -> tuple[list[int], Callable[[], None]]:
  """Ctrl-C raises ``KeyboardInterrupt`` as usual and is also noted in the returned list, until the returned function
  is called. Python drops an exception raised inside a garbage-collection callback (JAX registers one): a Ctrl-C that
  lands there went unnoticed and the run went on (4 of 21 tries on LeNet-5). Only Python's default handler is replaced,
  and only in the main thread: a background job ignores SIGINT, a program embedding fatq may have its own."""
  noted: list[int] = []
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
    return noted, lambda: None

  def note(signum, frame):
    noted.append(signum)
    signal.default_int_handler(signum, frame)

  signal.signal(signal.SIGINT, note)
  return noted, lambda: signal.signal(signal.SIGINT, signal.default_int_handler)


def factor_summary(thresholds: Tree) -> dict[str, dict[str, float]]:
  """Mean value of each point's FAT factors (scale / shift / width): what a trajectory plot shows."""
  from fatq.calibration import points

  return {name: {k: float(np.mean(v)) for k, v in d.items()} for name, d in points(thresholds).items()}


def _check_same_batches(history: list[dict], batches: dict, n_dev: int, metrics_path: str):
  """Raises ValueError if the run being resumed drew other batches than this one would: the step-0 entry of its
  metrics (``history[0]``) records its global batch size, training image count and seed. A global batch of
  ``per_device_batch_size * devices`` changes with the device count. Entries from an older fatq, without them, pass."""
  before = history[0] if history and history[0].get("step") == 0 else {}
  changed = [f"{key} {before[key]} -> {value}" for key, value in batches.items()
             if key in before and before[key] != value]
  if not changed:
    return
  was = f" on {before['devices']} device(s)" if "devices" in before else ""
  hint = ""
  if "batch_size" in before and before["batch_size"] != batches["batch_size"] and before["batch_size"] % n_dev == 0:
    hint = (f" (here: batch_size {before['batch_size']}, or per_device_batch_size {before['batch_size'] // n_dev} "
            f"on these {n_dev} device(s))")
  raise ValueError(f"the training state to resume ({os.path.dirname(metrics_path)}) was saved by a run{was} with "
                   f"other batches than this one: {'; '.join(changed)}. Resuming would continue its steps on other "
                   f"batches: resume with the settings it had{hint}, or start the row over without --resume")


def _read_history(path: str, up_to_step: int) -> list[dict]:
  """Metrics logged up to the restored step; later lines (from after the checkpoint) are dropped from the file."""
  history = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          entry = json.loads(line)
        except json.JSONDecodeError:
          break  # a line cut short by a crash
        if entry["step"] <= up_to_step:
          history.append(entry)
    write_atomically(path, lambda f: f.writelines(json.dumps(e) + "\n" for e in history))
  return history


class _TrainCheckpoints:
  """Orbax CheckpointManager over ``workdir/train_state``: saves are atomic (orbax writes a temporary directory
  and renames it), the two latest are kept, and a half-written one is never listed."""

  def __init__(self, workdir: str, every: int):
    import orbax.checkpoint as ocp

    self.every = every
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self._ocp = ocp
    self.manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "train_state")),
                                         options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

  def latest(self):
    return self.manager.latest_step()

  def clear(self):
    """Deletes every checkpoint and the metrics file, as a fresh run in the workdir of an earlier one must: orbax
    keeps the newest saves by time, so after the fresh run's first save the earlier run's last step would still be
    the latest, and a ``--resume`` after an interruption would restore it."""
    for step in self.manager.all_steps():
      self.manager.delete(step)
    if os.path.exists(self.metrics_path):
      os.remove(self.metrics_path)

  def save(self, step: int, tree, reason: str):
    if step in self.manager.all_steps():
      return
    tree = jax.tree.map(np.asarray, tree)
    self.manager.save(step, args=self._ocp.args.StandardSave(tree), force=True)
    self.manager.wait_until_finished()

  def restore(self, template):
    """The newest checkpoint that restores. A damaged one (files cut short by a full disk, or a crash on a
    filesystem without atomic renames) is reported, deleted so that its step can be saved again, and the one
    before it used: training from there recomputes the same steps."""
    import warnings

    template = jax.tree.map(np.asarray, template)
    errors = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=self._ocp.args.StandardRestore(template))
      except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise ValueError, OSError, KeyError, ...
        errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
        continue
      for bad in [s for s in self.manager.all_steps() if s > step]:
        self.manager.delete(bad)
      if errors:
        warnings.warn(f"unreadable checkpoint(s) in {self.manager.directory} deleted, resuming from step {step}: "
                      + "; ".join(errors))
      return restored
    raise UnrestorableCheckpoint(
        f"no checkpoint in {self.manager.directory} can be restored ({'; '.join(errors)}). If the model or "
        "quantization config changed since it was written, or it was written by an older fatq, use a new --workdir; "
        "otherwise delete that directory to start this run over")

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def train_classifier(model, images: np.ndarray, labels: np.ndarray, *, epochs: int, batch_size: int = 128,
                     lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                     log: Callable[[str], None] = print, progress: bool = True) -> Tree:
  """Supervised float training (cross-entropy, AdamW with cosine decay): how the small models get their
  pre-trained weights. Returns ``params``.

  ``weight_decay`` is AdamW's decoupled decay, ``w <- w - lr_t * weight_decay * w`` each step (biases included).
  A LeNet-5 trained with it loses less at 4 and 3 bits (docs/results.md measures it)."""
  rng = np.random.default_rng(seed)
  params = model.init(jax.random.key(seed), images[:1])["params"]
  steps_per_epoch = len(images) // batch_size
  tx = optax.adamw(optax.cosine_decay_schedule(lr, steps_per_epoch * epochs), weight_decay=weight_decay)
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

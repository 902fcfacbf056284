"""Numpy-side analysis: data-free weight quantization, model size (raw / gzip / lzma), bit-efficiency statistics and
the QAT-survey memory model.

Bit-efficiency statistics of a quantized tensor ``w_q`` of an n-bit quantizer (bit-efficient-quantization.txt §III.b:
"how well the model parameter values are spread on the quantized range"):

* ``levels_used``: distinct values of ``w_q``; ``occupancy = levels_used / 2^n`` (share of the codes in use);
* ``entropy_bits``: entropy of the code histogram; ``bit_efficiency = entropy_bits / n``;
* ``range_fraction = (max w_q - min w_q) / (max w - min w)``: how much of the float range is kept;
* ``octaves = log2(max|w_q| / min nonzero |w_q|)``: the dynamic range covered, ``range_per_bit = octaves / n``
  (about ``(n-1)/n`` for uniform grids, ``(2^(n-1)-2)/n`` for power of two);
* ``sqnr_db = 10 log10(sum w^2 / sum (w - w_q)^2)``;
* per-channel quartiles (min, 25 %, median, 75 %, max along the output-channel axis) before and after.

Memory model (qat-edge-survey.txt §2-3): a model with ``N_p`` parameters whose largest activation has ``N_a``
elements, parameters at ``b_p`` bits and activations at ``b_a`` bits needs ``Mem = N_p b_p + N_a b_a`` for an
inference (``b_a`` defaults to the survey's ``max(b_p, 4)``). Training keeps the latent parameters (32 bits), an
optimizer state of ``slots x N_p`` 32-bit values (the survey's "~parameters": 1 slot; Adam: 2) and all activations of
a batch of ``B`` images at ``b_a`` bits: ``N_p 32 + slots N_p 32 + B sum(activations) b_a``. Activations counted: the
model input and the output of every conv / dense layer (pooling, reshapes and residual adds are not counted).
"""

from __future__ import annotations

import gzip
import lzma
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fatq import quantizers as uq
from fatq.workbench import quantizers as wq

METHODS = ("asym", "sym", "pot")


def quantize_weight(w: np.ndarray, method: str, bits: int, per_channel: bool = False) -> np.ndarray:
  """Data-free quantize-dequantize of one weight tensor (output channels on the last axis).

  ``asym``: TF fake quant on ``[min(min, 0), max(max, 0)]`` (as TFLite's converter and fatq's FakeQuant choose it,
  then nudged so 0 is on the grid), 2^n levels; ``sym``: narrow signed grid
  on ``[-max|w|, max|w|]`` (2^n - 1 levels); ``pot``: power of two with ``2^(n-1) - 1`` exponents below
  ``round(log2 max|w|)``. Per tensor unless ``per_channel``.
  """
  w = jnp.asarray(w, jnp.float32)
  axes = tuple(range(w.ndim - 1)) if per_channel else None
  lo = jnp.min(w, axis=axes, keepdims=per_channel)
  hi = jnp.max(w, axis=axes, keepdims=per_channel)
  t = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
  if method == "asym":
    out = uq.fake_quant(w, *uq.containing_zero(lo, hi), bits, False)
  elif method == "sym":
    out = uq.fake_quant(w, -t, t, bits, True)
  elif method == "pot":
    out = wq.pot(w, bits, t)
  else:
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
  return np.asarray(out)


def weight_spec(method: str, bits: int, per_channel: bool = False):
  """The QuantSpec that makes FakeQuant compute :func:`quantize_weight` inside a model."""
  from fatq.config import QuantSpec

  if method == "asym":
    return QuantSpec(bits=bits, symmetric=False, per_channel=per_channel, trainable=False,
                     scale_bounds=(1.0, 1.0), signed_shift_bounds=(0.0, 0.0), unsigned_shift_bounds=(0.0, 0.0))
  if method == "sym":
    return QuantSpec(bits=bits, symmetric=True, signed=True, per_channel=per_channel, trainable=False)
  if method == "pot":
    return QuantSpec(bits=bits, kind="pot", per_channel=per_channel, trainable=False)
  raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


# ---------------------------------------------------------------------------------------------------------------------
# Model size.


def codes(wq_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(codebook, indices)``: the tensor's sorted distinct values and each weight's index into them."""
  book, idx = np.unique(wq_.ravel(), return_inverse=True)
  return book.astype(np.float32), idx


def slices(a: np.ndarray, per_channel: bool) -> list[np.ndarray]:
  """The tensor whole, or each output channel's values (the last axis): what one quantization grid covers."""
  a = np.asarray(a)
  return [a.ravel()] if not per_channel else list(a.reshape(-1, a.shape[-1]).T)


def model_size(kernels: list[np.ndarray], others: list[np.ndarray], bits: int | None,
               per_channel: bool = False) -> dict[str, int]:
  """Bytes of a model whose kernels are quantized to ``bits`` (None: float32) and whose other tensors (biases)
  stay float32: ``raw`` (bit-packed codes + codebooks + float32 rest), ``gzip`` and ``lzma`` (level 9) of the
  serialised codes (one byte per code for bits <= 8, else two), codebooks and the rest. ``per_channel``: one
  codebook per output channel, each code an index into its channel's (a tensor-wide codebook of per-channel grids
  has thousands of entries)."""
  rest = b"".join(np.asarray(o, np.float32).tobytes() for o in others)
  if bits is None:
    blob = b"".join(np.asarray(k, np.float32).tobytes() for k in kernels) + rest
    raw = len(blob)
  else:
    parts, raw = [], len(rest)
    dtype = np.uint8 if bits <= 8 else np.uint16
    for k in kernels:
      for values in slices(k, per_channel):
        book, idx = codes(values)
        if book.size > 2**bits:
          raise ValueError(f"a {bits}-bit grid has {book.size} distinct values: the weights are not on one "
                           f"{bits}-bit grid per {'channel' if per_channel else 'tensor'}")
        parts.append(book.tobytes())
        parts.append(idx.astype(dtype).tobytes())
        raw += book.nbytes + math.ceil(idx.size * bits / 8)
    blob = b"".join(parts) + rest
  return {"raw": raw, "gzip": len(gzip.compress(blob, 9)), "lzma": len(lzma.compress(blob, preset=9))}


# ---------------------------------------------------------------------------------------------------------------------
# Bit efficiency.


def quartiles(w: np.ndarray) -> np.ndarray:
  """``(channels, 5)``: min, 25 %, median, 75 %, max of each output channel (last axis)."""
  flat = np.asarray(w).reshape(-1, w.shape[-1])
  return np.percentile(flat, [0, 25, 50, 75, 100], axis=0).T


def efficiency(w: np.ndarray, w_q: np.ndarray, bits: int, per_channel: bool = False) -> dict[str, float]:
  """How ``w_q`` (``w`` on ``bits``-bit grids) uses its codes: ``levels_used`` and ``occupancy`` (distinct values,
  and their share of the 2^bits codes), ``entropy_bits`` and ``bit_efficiency`` (entropy / bits) of one grid, i.e.
  averaged over the channels' grids with ``per_channel``; the range, octave and SQNR figures are of the whole
  tensor."""
  grids = slices(w_q, per_channel)
  levels = entropy = 0.0
  for values in grids:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    levels += counts.size / len(grids)
    entropy += float(-(p * np.log2(p)).sum()) / len(grids)
  w, w_q = np.asarray(w, np.float64).ravel(), np.asarray(w_q, np.float64).ravel()
  nz = np.abs(w_q[w_q != 0])
  octaves = float(np.log2(nz.max() / nz.min())) if nz.size else 0.0
  err = np.sum((w - w_q) ** 2)
  span = w.max() - w.min()
  return dict(levels_used=levels, occupancy=levels / 2**bits, entropy_bits=entropy,
              bit_efficiency=entropy / bits,
              range_fraction=float((w_q.max() - w_q.min()) / span) if span > 0 else 1.0,
              octaves=octaves, range_per_bit=octaves / bits,
              sqnr_db=float(10 * np.log10(np.sum(w**2) / err)) if err > 0 else float("inf"))


# ---------------------------------------------------------------------------------------------------------------------
# Memory model.


def call_order(model, params: Any, input_shape: tuple[int, ...]) -> list[str]:
  """Paths (``'block3/depthwise'``) of the submodules of ``model`` in the order their ``__call__`` starts (a parent
  before its children). Pytree dicts are key-sorted (``block10`` before ``block2``), so this is the only reliable
  execution order."""
  import flax.linen as nn

  order: list[str] = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      path = "/".join(context.module.path)
      if path not in order:
        order.append(path)
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, x)
  return order


def activation_sizes(model, params: Any, input_shape: tuple[int, ...]) -> list[tuple[str, int]]:
  """``(name, elements per example)`` of the input and of every conv / dense layer output, in call order."""
  from fatq.models.common import layers

  kernels = {path for path, _ in layers(params)}
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  _, state = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, capture_intermediates=True), params, x)
  out = [("input", int(np.prod(input_shape)))]

  def walk(tree, prefix):
    for k, v in tree.items():
      if k == "__call__":
        if "/".join(prefix) in kernels:
          out.append(("/".join(prefix), int(np.prod(v[0].shape[1:]))))
      elif hasattr(v, "items"):
        walk(v, prefix + (k,))

  walk(state["intermediates"], ())
  order = {name: i for i, name in enumerate(call_order(model, params, input_shape))}
  return out[:1] + sorted(out[1:], key=lambda a: order.get(a[0], len(order)))


def memory(num_params: int, largest_activation: int, all_activations: int, weight_bits: int,
           act_bits: int | None = None, batch_size: int = 32, optimizer_slots: int = 1) -> dict[str, float]:
  """Inference and training memory in bytes (see the module docstring)."""
  b_a = act_bits if act_bits else max(weight_bits, 4)
  inf_params = num_params * weight_bits / 8
  inf_act = largest_activation * b_a / 8
  train_params = num_params * 32 / 8
  train_opt = optimizer_slots * num_params * 32 / 8
  train_act = batch_size * all_activations * b_a / 8
  return dict(weight_bits=weight_bits, act_bits=b_a, inference_params=inf_params, inference_activation=inf_act,
              inference_total=inf_params + inf_act, training_params=train_params, training_optimizer=train_opt,
              training_activations=train_act, training_total=train_params + train_opt + train_act,
              batch_size=batch_size, optimizer_slots=optimizer_slots)

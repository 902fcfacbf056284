"""Batch-norm folding: merge an inference-mode batch norm into the preceding convolution or dense layer.

    W' = W * gamma / sqrt(var + eps)          (scaled along the output-channel axis, the last axis of fatq kernels)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta

``eps`` must be the checkpoint's own (1e-3 for TF/Keras MobileNets). The last kernel axis is the output channel for
regular (HWIO), depthwise (HW1C, channel multiplier folded into C) and dense (IO) kernels alike.
"""

from __future__ import annotations

import numpy as np


def fold_batch_norm(kernel, bias, gamma, beta, mean, var, eps: float):
  """Returns ``(kernel', bias')``. ``bias`` may be None (a conv without bias); arrays are NumPy or JAX."""
  kernel = np.asarray(kernel, np.float64)
  c = kernel.shape[-1]
  for name, v in dict(gamma=gamma, beta=beta, mean=mean, var=var).items():
    if np.shape(v) != (c,):
      raise ValueError(f"batch norm {name} has shape {np.shape(v)}, expected ({c},) to match the kernel's "
                       f"{c} output channels (kernel shape {kernel.shape})")
  if eps <= 0:
    raise ValueError(f"batch norm eps must be positive, got {eps}")
  if bias is not None and np.shape(bias) != (c,):
    raise ValueError(f"bias has shape {np.shape(bias)}, expected ({c},) to match the kernel's {c} output channels "
                     f"(kernel shape {kernel.shape})")
  var_eps = np.asarray(var, np.float64) + eps
  bad = np.flatnonzero(~(np.isfinite(var_eps) & (var_eps > 0)))
  if bad.size:
    raise ValueError(f"batch norm moving_variance + eps must be finite and positive; channel(s) {bad[:8].tolist()} "
                     f"have variance {np.asarray(var)[bad[:8]].tolist()} (a corrupt or mismatched checkpoint?)")
  scale = np.asarray(gamma, np.float64) / np.sqrt(var_eps)
  b = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
  folded_bias = (b - np.asarray(mean, np.float64)) * scale + np.asarray(beta, np.float64)
  return (kernel * scale).astype(np.float32), folded_bias.astype(np.float32)

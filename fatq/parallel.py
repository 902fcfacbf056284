"""Data parallelism over all visible devices with ``jax.sharding``.

One mesh axis, ``'data'``, over ``jax.devices()``. Batches are split along their first (batch) dimension,
``NamedSharding(mesh, P('data'))``; thresholds, optimizer state and frozen weights are replicated, ``P()``. Under
``jax.jit`` the mean of a loss over a sharded batch becomes per-device partial sums plus an all-reduce, so the
gradient is that of the whole global batch: the same update as on one device, up to float summation order.

On one device the mesh is trivial and the compiled step is the single-device program (numbers are unchanged).
Single-process only: the global batch is one host's numpy array (several hosts would need
``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Tree = Any
DATA = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh, axis ``'data'``, over ``devices`` (default: every visible device)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA,))


def num_devices(mesh: Mesh) -> int:
  return mesh.shape[DATA]


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Split dimension 0 (the batch) across the ``'data'`` axis."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, P())


def replicate(mesh: Mesh, tree: Tree) -> Tree:
  """``tree`` with every leaf replicated on the mesh (a no-op for leaves already placed so)."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(mesh: Mesh, tree: Tree) -> Tree:
  """Every leaf split along its batch dimension; that dimension must be a multiple of the device count."""
  n = num_devices(mesh)
  for x in jax.tree.leaves(tree):
    if np.shape(x)[0] % n:
      raise ValueError(f"a batch of {np.shape(x)[0]} does not split over {n} devices: use a multiple of {n} "
                       "(or set per_device_batch_size)")
  return jax.device_put(tree, data_sharding(mesh))


def global_batch_size(cfg, n_devices: int) -> int:
  """``per_device_batch_size * n_devices`` when ``cfg.per_device_batch_size`` is set (> 0), else
  ``cfg.batch_size``, which must then be a multiple of ``n_devices``."""
  per_device = cfg.get("per_device_batch_size", 0) or 0
  if per_device:
    if per_device < 0:
      raise ValueError(f"per_device_batch_size must be positive, got {per_device}")
    return int(per_device) * n_devices
  bs = int(cfg.batch_size)
  if bs % n_devices:
    raise ValueError(f"batch_size {bs} is not a multiple of the {n_devices} devices: set batch_size to a multiple "
                     f"of {n_devices} (e.g. {math.ceil(bs / n_devices) * n_devices}) or per_device_batch_size "
                     f"(e.g. {max(bs // n_devices, 1)})")
  return bs


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def describe(mesh: Mesh) -> str:
  devices = mesh.devices.ravel()
  return f"{len(devices)} {devices[0].platform} device(s)"

"""Data parallelism with `jax.sharding`: a 1-D mesh over the devices, the batch sharded along it, the
train state replicated; the compiler inserts the gradient all-reduce.  Multi-host runs (TPU pods,
multi-node GPU) call `maybe_initialize_distributed` first; each host then feeds its own slice of the
global batch and `host_to_global` assembles the global array without copying data between hosts.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
DISTRIBUTED_ENV = "SCORE_SDE_DISTRIBUTED"

_initialized = False


def maybe_initialize_distributed(enable: Optional[bool] = None) -> bool:
  """Calls `jax.distributed.initialize()` (cluster auto-detection: TPU pods, SLURM, Open MPI, or the
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables) when `enable` is true, or,
  with `enable=None`, when the environment variable SCORE_SDE_DISTRIBUTED is 1/true.  Must run before
  any other JAX call.  Returns whether it initialised."""
  global _initialized
  if enable is None:
    enable = os.environ.get(DISTRIBUTED_ENV, "").lower() in ("1", "true", "yes")
  if enable and not _initialized:
    jax.distributed.initialize()
    _initialized = True
  return bool(enable)


def make_mesh(devices: Optional[Sequence] = None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: every device of every host)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Sharding of a batch whose example axis comes after `leading_axes` unsharded axes (1 for the
  stacked batches of `n_jitted_steps`)."""
  return NamedSharding(mesh, P(*([None] * leading_axes), AXIS))


def check_divisible(name: str, batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if int(batch_size) % n:
    raise ValueError(f"{name}={batch_size} does not divide by the number of devices ({n}); choose a "
                     f"multiple of {n} (e.g. {max(n, int(batch_size) // n * n)}).")


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
  """This host's share of a global batch (the mesh spans all hosts equally)."""
  procs = {d.process_index for d in mesh.devices.flat}
  return int(global_batch) // len(procs)


def host_to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global jax.Array from this host's slice `x` (single host: the whole batch)."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  return jax.make_array_from_process_local_data(sharding, x)


def replicate(tree, mesh: Mesh):
  """Places every leaf of `tree` on all devices of `mesh` (replicated)."""
  sharding = replicated(mesh)
  return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), tree)


def to_host(x) -> np.ndarray:
  """A jax array as a numpy array on this host: directly when this host holds all of it, from a local
  replica when it is replicated across hosts, else gathered from all hosts (every host must call)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def tree_to_host(tree):
  return jax.tree_util.tree_map(to_host, tree)

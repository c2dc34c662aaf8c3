"""Restoring a training workdir onto the current topology: the one restore of training, sampling and
evaluation.

* `restore_checkpoint(checkpointer, abstract_state, step=None)` — what every path calls: the checkpoint
  `step`, or the newest one that restores (falling back past unreadable ones, one line each), with every
  array placed on the *current* mesh (replicated), whatever devices or hosts wrote it
  (`checkpoint.restore_target`).  Training passes its writable Checkpointer (which alone may move an
  unreadable checkpoint aside, and says so); reading paths pass a read-only one.
* `restore_state(config, workdir, step=None)` — the reading paths (`scripts/sample.py`,
  `scripts/evaluate.py`, `checkpoints.load_pretrained`): a read-only Checkpointer around
  `restore_checkpoint`.  Nothing under the workdir is created, moved, renamed or deleted.
* `load_workdir_config(workdir)`, `abstract_train_state(config, mesh)`.

What is identical across topologies (1 ↔ N devices, n ↔ m hosts):

* the restored arrays (parameters, EMA parameters, optimiser state, step, PRNG key): bit for bit;
* the data order of a resumed training run: the global batches are a function of (seed, global step,
  global batch size) only (`checkpoint.decode_data_state`), each host taking its share;
* a training run resumed on the *same* topology continues bit for bit as if uninterrupted.

What is not guaranteed bit-identical: training resumed on a different device count (the gradient
all-reduce adds the per-device partial sums in another order: float32 rounding, about 1e-7 relative per
step; the runs agree to ~1e-6, as 1 vs 4 devices do), and samples or likelihoods computed on different
device counts: the noise is the same (keys do not depend on the sharding), but batch-wide reductions —
the Langevin corrector's step size, an adaptive solver's error norm — are summed in another order
(tests/test_topology.py: samples within 4e-5 after 40 steps, NLL equal).  Sampling with a batch size that
does not divide by the device count rounds it down, which changes the batches.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Tuple

import jax
import ml_collections

from score_sde_jax import datasets
from score_sde_jax.run import checkpoint as ckpt_lib
from score_sde_jax.run import config_utils
from score_sde_jax.run import state as state_lib


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (`<workdir>/config.json`)."""
  saved = config_utils.load_saved_config(workdir)
  if saved is None:
    raise FileNotFoundError(f"{os.path.join(workdir, config_utils.CONFIG_FILE)} does not exist: "
                            f"{workdir!r} is not a training workdir (or training never started).")
  return config_utils.complete_config(ml_collections.ConfigDict(saved))


def abstract_train_state(config, mesh=None, tx=None, shape: Optional[Tuple[int, ...]] = None):
  """The TrainState of `config` as ShapeDtypeStructs replicated over `mesh` (default: every device of
  every host); no computation."""
  from score_sde_jax import models
  from score_sde_jax.run import parallel
  model = models.get_model(config)
  shape = (1,) + tuple(shape if shape is not None else datasets.data_shape(config))
  abstract = jax.eval_shape(lambda k: state_lib.create_train_state(config, model, k, shape, tx),
                            jax.random.PRNGKey(0))
  rep = parallel.replicated(mesh if mesh is not None else parallel.make_mesh())
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract)


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data: Any                           # the saved data-iterator states (`checkpoint.decode_data_state`)
  saved_hosts: Optional[int] = None   # the topology that wrote it, where recorded
  saved_devices: Optional[int] = None


def restore_checkpoint(checkpointer: ckpt_lib.Checkpointer, abstract_state, step: Optional[int] = None, *,
                       mesh=None, check: Optional[Callable[[Any], None]] = ckpt_lib.check_finite_state,
                       report: Callable[[str], None] = print) -> Optional[Restored]:
  """The one restore (see the module docstring): checkpoint `step` (errors propagate, naming it), or the
  newest that restores and passes `check` (None when there is no checkpoint).  Arrays land replicated
  on `mesh` (default: every device of every host) unless `abstract_state`'s leaves carry shardings."""
  from score_sde_jax.run import parallel
  target = ckpt_lib.restore_target(
      abstract_state, parallel.replicated(mesh) if mesh is not None else None)
  if step is not None:
    steps = checkpointer.all_steps()
    if int(step) not in steps:
      raise ValueError(f"no checkpoint for step {step} in {checkpointer.directory}; available: {steps}")
    state, data = checkpointer.restore(int(step), target)
    found = (int(step), state, data)
  else:
    found = checkpointer.restore_latest(target, check=check, report=report)
    if found is None:
      return None
  hosts, devices = ckpt_lib.saved_topology(found[2])
  return Restored(step=found[0], state=found[1], data=found[2], saved_hosts=hosts, saved_devices=devices)


def restore_state(config, workdir: str, step: Optional[int] = None, *, mesh=None, report=print):
  """(step, TrainState) of `<workdir>/checkpoints`, read-only: checkpoint `step`, or the newest one that
  restores (skipping unreadable ones, one line each through `report`).  Arrays are replicated over
  `mesh` (default: every device of every host; in a multi-host run every process must call this)."""
  if not os.path.isdir(ckpt_lib.checkpoint_dir(workdir)):
    raise FileNotFoundError(f"no checkpoints in {ckpt_lib.checkpoint_dir(workdir)}")
  abstract = abstract_train_state(config, mesh)
  ck = ckpt_lib.Checkpointer(workdir, async_save=False, read_only=True)
  try:
    steps = ck.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints in {ck.directory}")
    found = restore_checkpoint(ck, abstract, step, report=report)
    if found is None:
      raise RuntimeError(f"none of the checkpoints {steps} in {ck.directory} could be restored")
    return found.step, found.state
  finally:
    ck.close()

"""orbax checkpoints of the train state and the data iterator's position.

One `orbax.checkpoint.CheckpointManager` in `<workdir>/checkpoints`: every checkpoint holds the train
state ('state') and the data iterator state of every host ('data', JSON).  The newest checkpoint is
always kept (the rolling preemption checkpoint, `max_to_keep=1`) and so is every step that is a
multiple of `training.snapshot_freq` (`keep_period`).  Saves are asynchronous (the device-to-host copy
happens before `save` returns, the file writing in the background); orbax writes into a temporary
directory and renames it when complete, so a crash mid-write never leaves a checkpoint that looks whole.
`restore_latest` tries the newest checkpoint first and falls back to older ones when one cannot be
read, reporting which it skipped and why.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class _ReadOnlyNotices(logging.Filter):
  """Drops orbax's warnings that a read-only manager is read-only (every reading path would print three)."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not (msg.startswith("CheckpointManagerOptions.read_only=True")
                or msg.startswith("Given directory is read only"))


logging.getLogger("absl").addFilter(_ReadOnlyNotices())


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """Saves and restores (state, data-iterator states) under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, snapshot_freq: Optional[int] = None, async_save: bool = True,
               read_only: bool = False):
    """`read_only`: for the reading paths (sampling, evaluation, `load_pretrained`): nothing under the
    workdir is created, cleaned, moved or deleted, and `save` is refused."""
    self.directory = checkpoint_dir(workdir)
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, keep_period=snapshot_freq if snapshot_freq and snapshot_freq > 0 else None,
        enable_async_checkpointing=async_save and not read_only, create=not read_only,
        cleanup_tmp_directories=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
    self.skipped: List[Tuple[int, str]] = []

  def all_steps(self) -> List[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_states: Any, wait: bool = False) -> None:
    """Saves `state` (a pytree of jax arrays) and `data_states` (JSON-able) at `step`; every host must
    call it.  With `wait`, blocks until the files are written."""
    if self.read_only:
      raise RuntimeError(f"internal: save on a read-only Checkpointer of {self.directory}")
    if step in self.manager.all_steps():
      self.manager.wait_until_finished()
      return
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_states)), force=True)
    if wait:
      self.manager.wait_until_finished()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state):
    out = self.manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def restore_latest(self, abstract_state, check: Optional[Callable[[Any], None]] = None,
                     report: Callable[[str], None] = print):
    """(step, state, data_states) of the newest checkpoint that restores (and passes `check`), or
    None when there is none.  Unreadable checkpoints are skipped with a message (`report`) naming the
    step and the error; they are recorded in `self.skipped` and, once an older one restored, moved to
    `<workdir>/checkpoints_unreadable/` (kept for inspection) so that training can write those steps
    again — except when read-only, where they are only reported."""
    for step in reversed(self.all_steps()):
      try:
        state, data = self.restore(step, abstract_state)
        if check is not None:
          check(state)
        if self.skipped and not self.read_only:
          self._quarantine([s for s, _ in self.skipped], report)
        return step, state, data
      except Exception as e:  # noqa: BLE001  (any read/decode failure means: try the previous one)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        self.skipped.append((step, reason))
        report(f"WARNING: skipping checkpoint {os.path.join(self.directory, str(step))} "
               f"(step {step}): it could not be restored ({reason}); trying the previous one.")
    return None

  def _quarantine(self, steps, report) -> None:
    dest_root = os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable")
    if jax.process_index() == 0:
      os.makedirs(dest_root, exist_ok=True)
      for step in steps:
        src = os.path.join(self.directory, str(step))
        if os.path.isdir(src):
          dest = os.path.join(dest_root, f"{step}.{int(time.time())}")
          os.replace(src, dest)
          report(f"Moved the unreadable checkpoint of step {step} to {dest}.")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("score_sde_jax quarantine checkpoints")
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def check_finite_state(state) -> None:
  """Raises ValueError when any floating leaf of a restored state is NaN/Inf."""
  for leaf in jax.tree_util.tree_leaves(state):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      if not leaf.is_fully_replicated:
        continue
      a = np.asarray(leaf.addressable_data(0))
    else:
      a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
      raise ValueError("restored state contains NaN/Inf values")


def encode_data_states(local_state: Any) -> Any:
  """Every host's data-iterator state as {'process_count': n, 'states': [...]} (all hosts gather the
  JSON of each; single-host: no communication)."""
  n = jax.process_count()
  if n == 1:
    return {"process_count": 1, "states": [local_state]}
  from jax.experimental import multihost_utils
  raw = json.dumps(local_state).encode()
  length = multihost_utils.process_allgather(np.asarray(len(raw), np.int32))
  buf = np.zeros(int(np.max(length)), np.uint8)
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  allbuf = multihost_utils.process_allgather(buf)
  states = [json.loads(bytes(allbuf[i][:int(length[i])]).decode()) for i in range(n)]
  return {"process_count": n, "states": states}


def converted_data_state(source: str) -> Any:
  """The data entry of a checkpoint converted from another code base (`scripts/convert_checkpoint.py`):
  there is no data position, so training resumed from it starts the data from the beginning."""
  return {"process_count": 0, "states": [], "converted_from": source}


def decode_data_state(saved: Any) -> Any:
  """This host's data-iterator state from what `encode_data_states` saved (None for a converted
  checkpoint, which has no data position)."""
  if "converted_from" in saved:
    return None
  n = int(saved["process_count"])
  if n != jax.process_count():
    raise ValueError(f"the checkpoint was written by {n} hosts but this run has "
                     f"{jax.process_count()}: the data position of each host cannot be restored.")
  return saved["states"][jax.process_index()]

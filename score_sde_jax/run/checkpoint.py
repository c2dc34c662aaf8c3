"""orbax checkpoints of the train state and the data iterator's position, portable across topologies.

One `orbax.checkpoint.CheckpointManager` in `<workdir>/checkpoints`: every checkpoint holds the train
state ('state') and the data iterator state of every host ('data', JSON).  The newest checkpoint is
always kept (the rolling preemption checkpoint, `max_to_keep=1`) and so is every step that is a
multiple of `training.snapshot_freq` (`keep_period`).  Saves are asynchronous (the device-to-host copy
happens before `save` returns, the file writing in the background); orbax writes into a temporary
directory and renames it when complete, so a crash mid-write never leaves a checkpoint that looks whole.

Topology.  A checkpoint does not depend on the devices or hosts that wrote it: every array is restored
with the sharding of the *current* run (`restore_target`: by default replicated over every device of every
host), never with the sharding recorded in the checkpoint, so a checkpoint written on 8 devices (or n
hosts) restores on 1 device (or m hosts) and back.  The restored arrays are bit-identical to the saved
ones.  The data iterator's state is global (the number of global batches drawn, the seed, the global batch
size: the data order is a function of these alone, `datasets.images.TrainIterator`), identical on every
host; `decode_data_state` therefore gives every host of an m-host run the state saved by an n-host run.

`restore_latest` tries the newest checkpoint first and falls back to older ones when one cannot be read,
reporting each one it skipped, and why, in one line.  Only a writable Checkpointer (training) moves an
unreadable checkpoint aside (to `<workdir>/checkpoints_unreadable/`, saying so) — whether an older one
restored or none did — so that training writes that step again: an unreadable checkpoint is never left
as the newest one of a run that says "Done" (orbax would otherwise skip the save of an existing step, and
its `max_to_keep` would count the unreadable one as the newest and delete the good new ones).  `save`
of a step whose existing checkpoint is known unreadable moves that one aside first (a rename; nothing is
deleted).  No good checkpoint is ever removed before its successor is complete: orbax writes a new one
under a temporary name, renames it when complete, and only then deletes what `max_to_keep` lets go.  A
read-only Checkpointer (sampling, evaluation, `load_pretrained`) never creates, moves, renames, cleans or
deletes anything — in particular not orbax's temporary directories, which may be a running training's
checkpoint in progress.

A save that fails (disk full, permission denied, a lost file system: raised by `save` or, for an
asynchronous save, by the next `save`/`wait`) raises `CheckpointWriteError` naming the step, the cause
and the newest complete checkpoint (which is intact); the Checkpointer then refuses further saves
(retrying cannot succeed until the cause is fixed) and `close` no longer raises.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from typing import Any, Callable, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

log = logging.getLogger(__name__)


class _ReadOnlyNotices(logging.Filter):
  """Drops orbax's warnings that a read-only manager is read-only (every reading path would print three)."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not (msg.startswith("CheckpointManagerOptions.read_only=True")
                or msg.startswith("Given directory is read only"))


logging.getLogger("absl").addFilter(_ReadOnlyNotices())


# After a restore fails (an unreadable checkpoint, reported in one line), tensorstore still completes the
# reads it had started and hands them to orbax's closed event loop: one "Event loop is closed" traceback
# per array and, at exit, "Future exception was never retrieved" with the error already reported.  Only
# these two are dropped.
class _AbandonedReadNotices(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    if not msg.startswith("Future exception was never retrieved"):
      return True
    text = msg + repr(getattr(record, "exc_info", None))
    return not ("tensorstore" in text or "OCDBT" in text)


logging.getLogger("asyncio").addFilter(_AbandonedReadNotices())
_previous_unraisablehook = sys.unraisablehook


def _unraisablehook(unraisable) -> None:
  exc, tb = unraisable.exc_value, unraisable.exc_traceback
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and tb is not None:
    while tb.tb_next is not None:
      tb = tb.tb_next
    if tb.tb_frame.f_code.co_name == "_check_closed" and "asyncio" in tb.tb_frame.f_code.co_filename:
      return
  _previous_unraisablehook(unraisable)


sys.unraisablehook = _unraisablehook


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def restore_target(abstract_state, sharding=None):
  """`abstract_state` as ShapeDtypeStructs carrying the sharding each array gets on the current topology:
  a leaf's own sharding where it has one, else `sharding` (default: replicated over every device of every
  host).  Restoring with these ignores the devices recorded in the checkpoint."""
  if sharding is None:
    from score_sde_jax.run import parallel
    sharding = NamedSharding(parallel.make_mesh(), PartitionSpec())

  def one(a):
    own = getattr(a, "sharding", None)
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=own if own is not None else sharding)

  return jax.tree_util.tree_map(one, abstract_state)


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, permission denied, ...); the newest complete checkpoint
  is intact.  `step`: the checkpoint that failed; `last_good`: the newest complete one (or None)."""

  def __init__(self, message: str, step: Optional[int] = None, last_good: Optional[int] = None,
               cause: Optional[BaseException] = None, err: Optional[int] = None):
    super().__init__(err, message) if err is not None else super().__init__(message)
    self.message, self.step, self.last_good, self.cause = message, step, last_good, cause

  def __str__(self) -> str:
    return self.message


_NO_SPACE_HINTS = ("no space left", "resource_exhausted", "enospc", "quota exceeded", "disk quota")
_PERMISSION_HINTS = ("permission denied", "permission_denied", "read-only file system", "eacces", "erofs")


def describe_write_failure(e: BaseException) -> Tuple[str, Optional[int]]:
  """(a one-line cause, errno) of a failed write, recognising disk-full and permission errors also when
  orbax/tensorstore report them as ValueError('RESOURCE_EXHAUSTED: ...')."""
  err = getattr(e, "errno", None)
  text = str(e)
  low = text.lower()
  if err == errno.ENOSPC or any(h in low for h in _NO_SPACE_HINTS):
    return "no space left on the device", errno.ENOSPC
  if err in (errno.EACCES, errno.EPERM, errno.EROFS) or any(h in low for h in _PERMISSION_HINTS):
    return "permission denied (or a read-only file system)", err or errno.EACCES
  first = text.splitlines()[0][:300] if text else ""
  return f"{type(e).__name__}: {first}", err


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
    self.unreadable: set = set()     # steps that failed to restore (moved aside before being rewritten)
    self.failed: Optional[CheckpointWriteError] = None
    self._pending: Optional[int] = None   # the step of an asynchronous save not yet known complete

  def all_steps(self) -> List[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_states: Any, wait: bool = False) -> None:
    """Saves `state` (a pytree of jax arrays) and `data_states` (JSON-able) at `step`; every host must
    call it.  With `wait`, blocks until the files are written."""
    if self.read_only:
      raise RuntimeError(f"internal: save on a read-only Checkpointer of {self.directory}")
    if self.failed is not None:
      raise self.failed
    step = int(step)
    if step in self.manager.all_steps():
      if step not in self.unreadable:
        self.wait()          # the same step, already complete (e.g. the one this run resumed from)
        return
      # An unreadable checkpoint of this step: moved aside (kept for inspection), then written anew.
      self._quarantine([step], print if jax.process_index() == 0 else (lambda *_: None))
    if self._pending is not None:   # orbax waits for it anyway; its failure is then its own
      self.wait()
    self._guarded(step, lambda: self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_states)), force=True))
    self.unreadable.discard(step)
    self._pending = step
    if wait:
      self.wait()

  def wait(self) -> None:
    """Blocks until the asynchronous save (if any) is written; CheckpointWriteError when it failed."""
    if self.failed is not None:
      raise self.failed
    self._guarded(self._pending, self.manager.wait_until_finished)
    self._pending = None

  def complete_steps(self) -> List[int]:
    """Steps whose checkpoint directory is complete on disk (orbax renames a checkpoint to its step
    only when it is fully written)."""
    try:
      return sorted(int(n) for n in os.listdir(self.directory)
                    if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))
    except OSError:
      return []

  def _guarded(self, step: Optional[int], fn: Callable[[], Any]) -> Any:
    """Runs an orbax save/wait; any failure becomes a CheckpointWriteError (and this Checkpointer saves
    no more).  An asynchronous save's error surfaces at the next call: it is then attributed to the
    pending step."""
    pending = self._pending
    try:
      return fn()
    except Exception as e:  # noqa: BLE001  (whatever orbax/tensorstore raise for a failed write)
      failed_step = pending if pending is not None else step
      cause, err = describe_write_failure(e)
      good = [s for s in self.complete_steps() if s != failed_step and s not in self.unreadable]
      last_good = good[-1] if good else None
      kept = (f"the newest complete checkpoint, step {last_good}, is intact"
              if last_good is not None else "no complete checkpoint had been written yet")
      what = f"the checkpoint of step {failed_step}" if failed_step is not None else "a checkpoint"
      self.failed = CheckpointWriteError(
          f"writing {what} to {self.directory} failed: {cause}; {kept}. "
          f"Training stopped (retrying cannot succeed until this is fixed): free space or fix the "
          f"permissions, then run the same command again to resume.",
          step=failed_step, last_good=last_good, cause=e, err=err)
      raise self.failed from e

  def restore(self, step: int, abstract_state):
    """(state, data_states) of checkpoint `step`, its arrays placed as `restore_target(abstract_state)`
    says (the current topology, whatever topology wrote it)."""
    out = self.manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(restore_target(abstract_state)), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def restore_latest(self, abstract_state, check: Optional[Callable[[Any], None]] = None,
                     report: Callable[[str], None] = print):
    """(step, state, data_states) of the newest checkpoint that restores (and passes `check`), or
    None when there is none.  Unreadable checkpoints are skipped with one line each (`report`) naming
    the checkpoint and the error; they are recorded in `self.skipped` and — by a writable Checkpointer
    (training) only, once an older one restored — moved to `<workdir>/checkpoints_unreadable/` (kept for
    inspection) so that training can write those steps again.  A read-only one only reports them."""
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
        self.unreadable.add(step)
        report(f"WARNING: skipping checkpoint {os.path.join(self.directory, str(step))} "
               f"(step {step}): it could not be restored ({reason}); trying the previous one.")
    # None restored: training starts from scratch and writes these steps again; an unreadable checkpoint
    # left in place would stay the "newest" one (see the module docstring).
    if self.skipped and not self.read_only:
      self._quarantine([s for s, _ in self.skipped], report)
    return None

  def _quarantine(self, steps, report) -> None:
    dest_root = os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable")
    if jax.process_index() == 0:
      os.makedirs(dest_root, exist_ok=True)
      for step in steps:
        src = os.path.join(self.directory, str(step))
        if os.path.isdir(src):
          dest = os.path.join(dest_root, f"{step}.{int(time.time())}")
          n = 1
          while os.path.exists(dest):   # two quarantines of one step within a second
            dest, n = os.path.join(dest_root, f"{step}.{int(time.time())}.{n}"), n + 1
          os.replace(src, dest)
          report(f"Training moved the unreadable checkpoint of step {step} to {dest} (so that it can write "
                 f"step {step} again; sampling and evaluation never move checkpoints).")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("score_sde_jax quarantine checkpoints")
    self.manager.reload()

  def close(self) -> None:
    """Waits for the last save and closes (once); after a failed save (already raised) it never raises."""
    if getattr(self, "_closed", False):
      return
    self._closed = True
    if self.failed is None:
      try:
        self.wait()
      finally:
        self.manager.close()
      return
    try:
      self.manager.close()
    except Exception:  # noqa: BLE001  (the failure was reported once already)
      log.debug("closing after a failed save", exc_info=True)


def check_finite_state(state) -> None:
  """Raises ValueError naming the first floating leaf (in tree order) of a restored state with NaN/Inf."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      if not leaf.is_fully_replicated:
        continue
      a = np.asarray(leaf.addressable_data(0))
    else:
      a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
      raise ValueError(f"restored state contains NaN/Inf values: {jax.tree_util.keystr(path)} has "
                       f"{int(a.size - np.count_nonzero(np.isfinite(a)))} of {a.size}")


def encode_data_states(local_state: Any, num_devices: Optional[int] = None) -> Any:
  """Every host's data-iterator state as {'process_count': n, 'states': [...], 'num_devices': d} (all
  hosts gather the JSON of each; single-host: no communication).  `num_devices`: the devices of the
  training mesh (recorded for the resume message only)."""
  n = jax.process_count()
  extra = {"num_devices": int(num_devices if num_devices is not None else jax.device_count())}
  if n == 1:
    return {"process_count": 1, "states": [local_state], **extra}
  from jax.experimental import multihost_utils
  raw = json.dumps(local_state).encode()
  length = multihost_utils.process_allgather(np.asarray(len(raw), np.int32))
  buf = np.zeros(int(np.max(length)), np.uint8)
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  allbuf = multihost_utils.process_allgather(buf)
  states = [json.loads(bytes(allbuf[i][:int(length[i])]).decode()) for i in range(n)]
  return {"process_count": n, "states": states, **extra}


def converted_data_state(source: str) -> Any:
  """The data entry of a checkpoint converted from another code base (`scripts/convert_checkpoint.py`):
  there is no data position, so training resumed from it starts the data from the beginning."""
  return {"process_count": 0, "states": [], "converted_from": source}


def saved_topology(saved: Any) -> Tuple[Optional[int], Optional[int]]:
  """(hosts, devices) that wrote a checkpoint, from its data entry (None where not recorded)."""
  if not isinstance(saved, dict) or "converted_from" in saved:
    return None, None
  n = saved.get("process_count")
  d = saved.get("num_devices")
  return (int(n) if n else None), (int(d) if d else None)


def decode_data_state(saved: Any) -> Any:
  """This host's data-iterator state from what `encode_data_states` saved (None for a converted
  checkpoint, which has no data position), whatever the number of hosts that saved it.

  The iterator state is global (global batches drawn, seed, global batch size; no host index), so every
  host of an n-host run saved the same state and any host of an m-host run resumes from it: the global
  batches after the resume are the ones the uninterrupted run would have drawn, each host taking its
  1/m share of each.  Should the saved states of the hosts differ (a per-host iterator), they can only be
  restored by the same number of hosts, each its own; another host count is then an error."""
  if "converted_from" in saved:
    return None
  n = int(saved["process_count"])
  states = list(saved["states"])
  if len(states) != n or not states:
    raise ValueError(f"the checkpoint's data entry is malformed: process_count={n} but "
                     f"{len(states)} iterator states.")
  if all(s == states[0] for s in states[1:]):
    return states[0]
  if n != jax.process_count():
    raise ValueError(f"the checkpoint was written by {n} hosts whose data-iterator states differ (a per-host "
                     f"iterator); this run has {jax.process_count()} hosts, so the data position of each "
                     f"host cannot be restored. Resume on {n} hosts.")
  return states[jax.process_index()]

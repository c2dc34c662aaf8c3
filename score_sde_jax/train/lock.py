"""One training per workdir: an exclusive lock on `<workdir>/.lock`, held while the training runs.

`acquire(workdir)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `<workdir>/.lock` and writes the holder
(pid, host, start time, command line) into it.  A second training of the same workdir gets
`WorkdirLocked` naming that process, at once, before it creates, cleans or writes anything (the lock is
taken before the Checkpointer, whose start-up removes orbax's temporary directories: those of a running
training would be its in-progress checkpoint).

A lock never outlives its process: the kernel releases a flock when the process ends, however it ends
(SIGKILL, a crash, a lost machine's NFS lease), so a stale `.lock` file left by a killed run is taken
over by the next run without any clean-up.  The file itself stays (removing it would race with a run
that is opening it); its content is the last holder's.

Within one process the lock is re-entrant (`train()` called twice on one workdir in one process, e.g. a
script that keeps it for its lifetime and tests that train again): the count is per workdir path.

Multi-host runs: every host of a run writes into the same (shared) workdir, so only process 0 takes the
lock (two hosts flocking one NFS file would exclude each other); its verdict is broadcast and every process
stops with the same error when the workdir is in use (`acquire_for_run`).  A workdir on a file system
without working flock (some network file systems) is not protected; the lock then succeeds vacuously.

Readers (sampling, evaluation) take no lock: they never create, clean, move or delete anything in the
workdir (read-only `Checkpointer`).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Dict, List, Optional

from score_sde_jax.run.config_utils import ConfigError

LOCK_FILE = ".lock"


class WorkdirLocked(ConfigError):
  """Another process is training in this workdir (the message names it)."""


class _Held:
  def __init__(self, path: str, fd: int):
    self.path, self.fd, self.count = path, fd, 1


_HELD: Dict[str, _Held] = {}


def lock_path(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), LOCK_FILE)


def holder_description(info: Optional[dict]) -> str:
  if not info:
    return "another process (it has not written its pid yet)"
  started = info.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
  cmd = info.get("argv")
  cmd = f", command: {' '.join(cmd)[:200]}" if cmd else ""
  return f"process {info.get('pid', '?')} on host {info.get('host', '?')} (started {when}{cmd})"


def read_holder(workdir: str) -> Optional[dict]:
  """The holder recorded in `<workdir>/.lock` (the last one: it may have ended), or None."""
  try:
    with open(lock_path(workdir)) as f:
      text = f.read()
    return json.loads(text) if text.strip() else None
  except (OSError, ValueError):
    return None


class WorkdirLock:
  """A held lock (see `acquire`); `release()` drops this holder's share."""

  def __init__(self, key: Optional[str]):
    self._key = key

  @property
  def held(self) -> bool:
    return self._key is not None and self._key in _HELD

  def release(self) -> None:
    key, self._key = self._key, None
    if key is None or key not in _HELD:
      return
    h = _HELD[key]
    h.count -= 1
    if h.count <= 0:
      del _HELD[key]
      try:
        fcntl.flock(h.fd, fcntl.LOCK_UN)
      finally:
        os.close(h.fd)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def acquire(workdir: str, argv: Optional[List[str]] = None) -> WorkdirLock:
  """Takes the workdir's lock (the workdir must exist) or raises WorkdirLocked naming the holder."""
  path = lock_path(workdir)
  key = os.path.realpath(path)
  if key in _HELD:
    _HELD[key].count += 1
    return WorkdirLock(key)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise WorkdirLocked(
          f"{os.path.abspath(workdir)} is in use by another training: "
          f"{holder_description(read_holder(workdir))} holds {path}. Wait for it to finish or stop it, or "
          f"use another --workdir (a lock is released as soon as its process ends, even when killed)."
      ) from None
    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):   # no flock here: unprotected
      fd = -1
    else:
      raise
  info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
          "argv": list(sys.argv if argv is None else argv)}
  if fd >= 0:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD[key] = _Held(path, fd)
    return WorkdirLock(key)
  return WorkdirLock(None)


def acquire_for_run(workdir: str) -> WorkdirLock:
  """`acquire` as a (possibly multi-host) training takes it: process 0 alone locks, and every process
  raises WorkdirLocked when it could not."""
  import jax
  if jax.process_count() == 1:
    return acquire(workdir)
  import numpy as np
  from jax.experimental import multihost_utils
  lock, error = WorkdirLock(None), None
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir)
    except WorkdirLocked as e:
      error = e
  ok = bool(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(error is None, np.int32))))
  if error is not None:
    raise error
  if not ok:
    raise WorkdirLocked(f"{os.path.abspath(workdir)} is in use by another training (process 0 of this run "
                        f"found {lock_path(workdir)} locked and names the holder).")
  return lock

"""Scalar metrics to TensorBoard event files (and a JSON-lines copy), and the run's error log.

TensorBoard files are written by tensorboardX (TF-free; `clu.metric_writers` needs TensorFlow for its
TensorBoard writer).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
import traceback
from typing import Callable, Dict, Optional

ERRORS_LOG = "errors.log"


class MetricWriter:
  """`write_scalars(step, {name: value})` to `<logdir>/events.out.tfevents.*` (tensorboardX) and
  `<logdir>/metrics.jsonl`.  Only create it on process 0 (or pass `enabled=False`).  The files are opened
  by the first `write_scalars`, so a run that fails before its first number leaves no empty event file."""

  def __init__(self, logdir: str, enabled: bool = True):
    self.logdir = logdir
    self.enabled = enabled
    self._tb = self._jsonl = None

  def write_scalars(self, step: int, scalars: Dict[str, float]) -> None:
    if not self.enabled:
      return
    if self._tb is None:
      from tensorboardX import SummaryWriter
      os.makedirs(self.logdir, exist_ok=True)
      self._tb = SummaryWriter(logdir=self.logdir, flush_secs=30)
      self._jsonl = open(os.path.join(self.logdir, "metrics.jsonl"), "a")
    scalars = {k: float(v) for k, v in scalars.items()}
    now = time.time()
    for tag, value in scalars.items():
      self._tb.add_scalar(tag, value, global_step=int(step), walltime=now)
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._jsonl.close()
    self._tb = self._jsonl = None
    self.enabled = False


class ErrorLog:
  """The full detail (tracebacks, library logs) of problems a run reports on the console in one line:
  `<logdir>/errors.log`, created at the first entry (a run without problems has none).  Best effort: on
  a full disk the log itself may not be writable; `write` then returns False and the one-line report
  says so."""

  def __init__(self, logdir: str, enabled: bool = True):
    self.path = os.path.join(logdir, ERRORS_LOG)
    self.enabled = enabled
    self.written = False

  def write(self, title: str, exc: Optional[BaseException] = None, text: str = "") -> bool:
    if not self.enabled:
      return False
    parts = [f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} on {socket.gethostname()}: "
             f"{title}"]
    if text:
      parts.append(text.rstrip())
    if exc is not None:
      parts.append("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      with open(self.path, "a") as f:
        f.write("\n".join(parts) + "\n")
      self.written = True
      return True
    except OSError:
      return False

  def where(self) -> str:
    """' Details: <path>.' or a note that they could not be written (for the end of a one-line report)."""
    return (f" Details: {self.path}." if self.written else
            f" (The details could not be written to {self.path} either.)" if self.enabled else "")


class DivertToErrorLog(logging.Filter):
  """A logger filter that moves the records `select` picks (e.g. orbax's ERROR records, each with a
  traceback, one per array of a failed save) from the console to an ErrorLog: the run reports the
  problem once, in one line, itself."""

  def __init__(self, error_log: ErrorLog, select: Callable[[logging.LogRecord], bool]):
    super().__init__()
    self.error_log, self.select = error_log, select

  def filter(self, record: logging.LogRecord) -> bool:
    try:
      if not self.select(record):
        return True
      text = record.getMessage()
      if record.exc_info:
        text += "\n" + "".join(traceback.format_exception(*record.exc_info))
      self.error_log.write(f"{record.name} {record.levelname} ({record.pathname}:{record.lineno})",
                           text=text)
      return False
    except Exception:  # noqa: BLE001  (a log filter must never raise)
      return True


def read_scalars(path: str):
  """[(step, tag, value)] from one TensorBoard event file (for tests and quick checks).  The records'
  framing (length, CRC, payload, CRC) is read here; the payloads are parsed by tensorboardX's Event
  protocol buffer (TensorFlow's and tensorboard's readers are the alternatives, both heavy)."""
  from tensorboardX.proto import event_pb2
  out = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos + 12 <= len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
    pos += 12 + n + 4
    for v in event.summary.value:
      out.append((int(event.step), v.tag, float(v.simple_value)))
  return out

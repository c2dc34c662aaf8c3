"""Scalar metrics to TensorBoard event files (and a JSON-lines copy), without TensorFlow.

`clu.metric_writers` needs TensorFlow for its TensorBoard writer; this module writes the event-file format
directly: TFRecord framing (length, masked CRC-32C of the length, payload, masked CRC-32C of the payload)
around `Event` protocol buffers holding `Summary.Value(tag, simple_value)`.  TensorBoard reads the files
as it would TensorFlow's.  When clu's writer is importable (TensorFlow installed) it is used instead.
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

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field(num: int, wire: int) -> bytes:
  return _varint((num << 3) | wire)


def _bytes_field(num: int, payload: bytes) -> bytes:
  return _field(num, 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: Optional[str] = None,
           scalars: Optional[Dict[str, float]] = None) -> bytes:
  msg = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(int(step))
  if file_version is not None:
    msg += _bytes_field(3, file_version.encode())
  if scalars:
    summary = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", float(v)))
        for tag, v in scalars.items())
    msg += _bytes_field(5, summary)
  return msg


class MetricWriter:
  """`write_scalars(step, {name: value})` to `<logdir>/events.out.tfevents.*` and
  `<logdir>/metrics.jsonl`.  Only create it on process 0 (or pass `enabled=False`)."""

  def __init__(self, logdir: str, enabled: bool = True):
    self.logdir = logdir
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self._f = open(os.path.join(logdir, name), "ab")
    self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")
    self._write_record(_event(time.time(), 0, file_version="brain.Event:2"))

  def _write_record(self, data: bytes) -> None:
    header = struct.pack("<Q", len(data))
    self._f.write(header + struct.pack("<I", _masked_crc(header)) + data +
                  struct.pack("<I", _masked_crc(data)))

  def write_scalars(self, step: int, scalars: Dict[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._write_record(_event(time.time(), step, scalars=scalars))
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")

  def flush(self) -> None:
    if self.enabled:
      self._f.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._f.close()
      self._jsonl.close()
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
  """[(step, tag, value)] from one event file written by MetricWriter (for tests and quick checks)."""
  out = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos + 12 <= len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    rec = data[pos + 12:pos + 12 + n]
    pos += 12 + n + 4
    step, i, tags = 0, 0, []

    def varint(buf, j):
      shift = val = 0
      while True:
        b = buf[j]
        j += 1
        val |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
          return val, j

    while i < len(rec):
      key, i = varint(rec, i)
      num, wire = key >> 3, key & 7
      if wire == 1:
        i += 8
      elif wire == 0:
        val, i = varint(rec, i)
        if num == 2:
          step = val
      elif wire == 2:
        ln, i = varint(rec, i)
        payload = rec[i:i + ln]
        i += ln
        if num == 5:
          j = 0
          while j < len(payload):
            _, j = varint(payload, j)
            vl, j = varint(payload, j)
            value = payload[j:j + vl]
            j += vl
            k, tag, v = 0, None, None
            while k < len(value):
              kk, k = varint(value, k)
              if kk >> 3 == 1:
                tl, k = varint(value, k)
                tag = value[k:k + tl].decode()
                k += tl
              elif (kk & 7) == 5:
                (v,) = struct.unpack("<f", value[k:k + 4])
                k += 4
            tags.append((tag, v))
      elif wire == 5:
        i += 4
    out.extend((step, t, v) for t, v in tags)
  return out

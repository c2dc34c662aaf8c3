"""Read PyTorch's *legacy* (torch < 1.6, non-zip) `.pth` files without torch, through `torch_pickle`'s
allow-list.

`torch_pickle` reads the zip format that `torch.save` has written since torch 1.6 and refuses the older one.
Files from before mid-2020 are in the older format, among them pytorch-fid's FID Inception weights
`pt_inception-2015-12-05-6726825d.pth` (released in May 2019), so this module adds it, with the same
safety rules: only the globals of `torch_pickle`'s allow-list are resolved, tensors are built by its
bounds-checked `_rebuild_tensor_v2`, and nothing from the file runs.

Format (`torch.serialization._legacy_save`), one file of consecutive pickles and raw data:

1. pickle: the magic number 0x1950a86a20f9469cfc6c;
2. pickle: the protocol version 1001;
3. pickle: sys_info, a dict {'protocol_version', 'little_endian', 'type_sizes'};
4. pickle: the saved object; a storage is the persistent id
   ``('storage', torch.<Type>Storage, key, location, numel, view_metadata)`` (view_metadata is None except
   for the storage views of torch < 0.4, refused here);
5. pickle: the list of storage keys, in the order their data follows;
6. per key: numel as an 8-byte integer (byte order per sys_info), then numel elements of raw data.

The storages' element types are known only from pickle 4 and their data comes after it, so pickle 4 is read
twice: once to learn each storage's type and size (tensors built on zero storages and dropped), once more
with the data.  The torch < 0.4 tar format is refused.
"""
from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np

from score_sde_jax import torch_pickle as _tp

__all__ = ["MAGIC_NUMBER", "PROTOCOL_VERSION", "is_legacy", "load", "load_bytes", "load_any"]

MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
PROTOCOL_VERSION = 1001


class _PlainUnpickler(pickle.Unpickler):
  """For the header and key-list pickles: plain values only, no globals, no persistent ids."""

  def __init__(self, file, source: str):
    super().__init__(file)
    self._source = source

  def find_class(self, module, name):
    raise _tp.UnsafePickleError(self._source, f"{module}.{name}")

  def persistent_load(self, pid):
    raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} outside the main pickle")


class _LegacyUnpickler(_tp._Unpickler):  # pylint: disable=protected-access
  """`torch_pickle`'s unpickler (same allow-list and tensor rebuilding) with the legacy persistent ids."""

  def __init__(self, file, source: str, storages=None):
    super().__init__(file, source, archive=None, stem="", big_endian=False)
    self._data = storages   # key -> 1-D array, or None on the first pass
    self.seen = {}          # key -> (storage type, numel)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
            and isinstance(pid[1], _tp._StorageType) and isinstance(pid[2], str)):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel, view_metadata = pid
    if view_metadata is not None:
      raise pickle.UnpicklingError("storage views (torch < 0.4 files) are not supported")
    numel = _tp._index(numel, "storage numel")
    previous = self.seen.setdefault(key, (storage_type, numel))
    if (previous[0].name, previous[1]) != (storage_type.name, numel):
      raise pickle.UnpicklingError(f"storage {key!r} appears as {previous[0].name}[{previous[1]}] and as "
                                   f"{storage_type.name}[{numel}]")
    if self._data is None:
      return np.zeros(numel, storage_type.dtype)
    return self._data[key]


def _read_exact(f, n: int, source: str, what: str) -> bytes:
  raw = f.read(n)
  if len(raw) != n:
    raise ValueError(f"{source}: truncated file: {what} needs {n} bytes, {len(raw)} left")
  return raw


def is_legacy(head: bytes) -> bool:
  """Whether the first bytes of a file look like the legacy format (a protocol-2 pickle of the magic
  number: PROTO 2, LONG1 of 10 bytes)."""
  return head[:4] == b"\x80\x02\x8a\x0a"


def _load(f, source: str):
  plain = lambda: _PlainUnpickler(f, source).load()  # noqa: E731
  try:
    magic = plain()
  except _tp.UnsafePickleError:
    raise
  except Exception as e:
    raise ValueError(f"{source}: not a legacy torch file (no readable magic number): {e}") from e
  if magic != MAGIC_NUMBER:
    raise ValueError(f"{source}: not a legacy torch file (magic number {magic!r})")
  try:
    version, sys_info = plain(), plain()
    if version != PROTOCOL_VERSION:
      raise ValueError(f"unknown protocol version {version!r}")
    if not isinstance(sys_info, dict) or not isinstance(sys_info.get("little_endian", True), bool):
      raise ValueError(f"bad sys_info {sys_info!r}")
    order = "<" if sys_info.get("little_endian", True) else ">"
    main = f.tell()
    first = _LegacyUnpickler(f, source)
    first.load()
    keys = plain()
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
      raise ValueError(f"the storage key list is not a list of strings: {keys!r}")
    if set(keys) != set(first.seen):
      raise ValueError(f"the storage key list {sorted(keys)} differs from the storages the object uses "
                       f"{sorted(first.seen)}")
  except _tp.UnsafePickleError:
    raise
  except ValueError as e:
    if str(e).startswith(source):
      raise
    raise ValueError(f"{source}: {e}") from e
  except Exception as e:  # a malformed pickle fails in many ways
    raise ValueError(f"{source}: cannot unpickle: {type(e).__name__}: {e}") from e
  storages = {}
  for key in keys:
    storage_type, numel = first.seen[key]
    (stored,) = struct.unpack(order + "q", _read_exact(f, 8, source, f"the size of storage {key!r}"))
    if stored != numel:
      raise ValueError(f"{source}: storage {key!r} holds {stored} elements, the object says {numel}")
    dtype = storage_type.dtype.newbyteorder(order)
    data = np.frombuffer(_read_exact(f, numel * dtype.itemsize, source, f"storage {key!r}"), dtype)
    data = data.astype(dtype.newbyteorder("="))
    if storage_type.name == "BFloat16Storage":  # bfloat16 is the top half of a float32
      data = (data.astype(np.uint32) << 16).view(np.float32)
    data.flags.writeable = False
    storages[key] = data
  f.seek(main)
  try:
    return _LegacyUnpickler(f, source, storages).load()
  except Exception as e:  # same bytes as the first pass; only storage bounds can fail now
    raise ValueError(f"{source}: cannot unpickle: {type(e).__name__}: {e}") from e


def load(path):
  """The object in a legacy-format torch file; tensors come back as numpy arrays (as `torch_pickle.load`)."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    return _load(f, path)


def load_bytes(data: bytes, name: str = "<bytes>"):
  return _load(io.BytesIO(data), name)


def load_any(path):
  """`torch_pickle.load` for zip-format files (torch >= 1.6), `load` for legacy ones."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    head = f.read(4)
  if is_legacy(head):
    return load(path)
  return _tp.load(path)

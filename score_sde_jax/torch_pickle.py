"""Read PyTorch ``.pth`` checkpoints without PyTorch and without running any code from the file.

Format (what ``torch.save`` has written by default since torch 1.6): a zip archive (members stored
uncompressed) holding

- ``<stem>/data.pkl``: a pickle (protocol 2) of the saved object. ``<stem>`` depends on the torch version
  and the file name, so the member is found as the single ``*/data.pkl``.
- ``<stem>/data/<key>``: the raw bytes of one storage. The pickle refers to it by the persistent id
  ``('storage', torch.<Type>Storage, key, location, numel)``; ``numel`` counts elements of the storage type
  (bytes for ``torch.UntypedStorage``).
- ``<stem>/byteorder``: ``little`` or ``big`` (absent in older files: little).

A tensor is pickled as ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
requires_grad, backward_hooks[, metadata])``, with offset and strides in elements. Several tensors may be
views of one storage. An ``nn.Parameter`` adds ``torch._utils._rebuild_parameter(tensor, requires_grad,
backward_hooks)`` around it.

Here each tensor becomes a C-contiguous numpy array that owns a copy of its data (bfloat16 becomes
float32, exactly), parameters become plain arrays, and every other value comes back as the pickle built
it (dicts, ``OrderedDict``, lists, numbers, numpy scalars).

Why it is hand-written:

- ``torch.load(weights_only=False)`` executes whatever the pickle names: a checkpoint is then a program.
- ``torch.load(weights_only=True)`` (the default since torch 2.6) refuses the released score-SDE
  checkpoints, because their optimizer state holds a ``numpy.float64`` learning rate.
- torch is a multi-GB dependency that nothing else in this package needs.

Safety: the unpickler resolves only the globals in ``_GLOBALS`` (anything else raises
``UnsafePickleError`` before it is called), each of which is a small function here that checks its
arguments. Tensor views are bounds-checked against their storage before ``as_strided``. numpy dtypes and
scalars are built only for plain numeric dtypes. Legacy (torch < 1.6, non-zip) files are refused rather than
unpickled.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import re
import zipfile
import zlib

import numpy as np

__all__ = ["UnsafePickleError", "load", "load_bytes"]


class UnsafePickleError(ValueError):
  """The pickle names a global outside the allow-list (it could run code), so nothing was loaded."""

  def __init__(self, source: str, global_name: str):
    self.source = source
    self.global_name = global_name
    super().__init__(
        f"{source}: refusing to load the global {global_name!r}: it is not in torch_pickle's allow-list of "
        "torch checkpoint types (a pickle can run code through any global it names).")


# Storage class name -> little-endian numpy dtype of its raw bytes.
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "BFloat16Storage": "<u2",  # converted to float32 on load
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "ComplexFloatStorage": "<c8",
    "ComplexDoubleStorage": "<c16",
    "UntypedStorage": "u1",
}


class _StorageType:
  """What the pickle gets for a global ``torch.<Type>Storage``: only a name and a dtype."""
  __slots__ = ("name", "dtype")

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])

  def __setstate__(self, state):
    raise pickle.UnpicklingError(f"unexpected BUILD on storage type {self.name}")

  def __call__(self, *args, **kwargs):
    raise pickle.UnpicklingError(f"torch.{self.name} may only appear in a storage persistent id")


def _index(value, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise pickle.UnpicklingError(f"{what} must be a non-negative int, got {value!r}")
  return value


def _shape(value, what: str) -> tuple:
  if not isinstance(value, (tuple, list)):
    raise pickle.UnpicklingError(f"{what} must be a tuple of ints, got {value!r}")
  return tuple(_index(v, what) for v in value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  """``torch._utils._rebuild_tensor_v2``: a strided view of ``storage``, copied to a C-order array."""
  del requires_grad, backward_hooks, metadata
  if not (isinstance(storage, np.ndarray) and storage.ndim == 1 and storage.flags.c_contiguous):
    raise pickle.UnpicklingError(f"_rebuild_tensor_v2 expects a storage, got {type(storage).__name__}")
  offset = _index(storage_offset, "storage_offset")
  size, stride = _shape(size, "size"), _shape(stride, "stride")
  if len(size) != len(stride):
    raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in length")
  data = storage
  if 0 in size:
    return np.zeros(size, data.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= data.size:
    raise pickle.UnpicklingError(
        f"tensor (offset {offset}, size {size}, stride {stride}) reaches element {last} of a storage of "
        f"{data.size} elements")
  view = np.lib.stride_tricks.as_strided(
      data[offset:], shape=size, strides=tuple(s * data.itemsize for s in stride), writeable=False)
  return np.array(view, order="C", copy=True)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
  """``torch._utils._rebuild_parameter[_with_state]``: an ``nn.Parameter`` is just its array here."""
  del requires_grad, backward_hooks, state
  if not isinstance(data, np.ndarray):
    raise pickle.UnpicklingError(f"_rebuild_parameter expects a tensor, got {type(data).__name__}")
  return data


def _torch_size(dims=()):
  """``torch.Size(dims)``: a tuple of ints."""
  return _shape(dims, "torch.Size")


_NUMERIC_DTYPE = re.compile(r"[<>|=]?(?:[biuf]\d{1,2}|c\d{1,2}|\?)")


class _DtypeSpec:
  """What ``numpy.dtype(...)`` gives inside the pickle: a plain numeric dtype, not an arbitrary one."""
  __slots__ = ("dtype",)

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype

  def __setstate__(self, state):
    # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata]).
    if (not isinstance(state, tuple) or len(state) not in (8, 9) or state[1] not in ("<", ">", "|", "=")
        or any(s is not None for s in state[2:5])):
      raise pickle.UnpicklingError(f"unsupported numpy dtype state {state!r}")
    if state[1] != "|":
      self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_dtype(obj, align=False, copy=False):
  del align, copy
  if not isinstance(obj, str) or not _NUMERIC_DTYPE.fullmatch(obj):
    raise pickle.UnpicklingError(f"only plain numeric numpy dtypes are allowed, got {obj!r}")
  try:
    dtype = np.dtype(obj)
  except TypeError as e:
    raise pickle.UnpicklingError(f"bad numpy dtype {obj!r}") from e
  if dtype.kind not in "biufc":
    raise pickle.UnpicklingError(f"only plain numeric numpy dtypes are allowed, got {obj!r}")
  return _DtypeSpec(dtype)


def _numpy_scalar(dtype, data=None):
  """``numpy.core.multiarray.scalar(dtype, raw_bytes)``: a numpy scalar such as the float64 lr."""
  if not isinstance(dtype, _DtypeSpec) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
    raise pickle.UnpicklingError(f"unsupported numpy scalar arguments ({dtype!r}, {data!r})")
  return np.frombuffer(data, dtype.dtype)[0]


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
  """``_codecs.encode(str, 'latin1')``: how protocol 2 writes bytes (here, a numpy scalar's raw bytes)."""
  if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
    raise pickle.UnpicklingError(f"only _codecs.encode(str, 'latin1') is allowed, got encoding {encoding!r}")
  return obj.encode("latin-1")


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _torch_size,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("_codecs", "encode"): _codecs_encode,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage"),
}


class _Unpickler(pickle.Unpickler):
  """Resolves only allow-listed globals; reads storages from the archive on demand.

  A storage is a read-only 1-D numpy array of its elements (which is also what a storage saved on its own,
  outside any tensor, comes back as).
  """

  def __init__(self, file, source: str, archive: zipfile.ZipFile, stem: str, big_endian: bool):
    super().__init__(file)
    self._source = source
    self._archive = archive
    self._stem = stem
    self._big_endian = big_endian
    self._storages = {}

  def find_class(self, module, name):
    try:
      return _GLOBALS[(module, name)]
    except (KeyError, TypeError):
      raise UnsafePickleError(self._source, f"{module}.{name}") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    numel = _index(numel, "storage numel")
    cache_key = (key, storage_type.name, numel)
    if cache_key not in self._storages:
      self._storages[cache_key] = self._read_storage(storage_type, key, numel)
    return self._storages[cache_key]

  def _read_storage(self, storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
    name = f"{self._stem}/data/{key}"
    dtype = storage_type.dtype.newbyteorder(">") if self._big_endian else storage_type.dtype
    nbytes = numel * dtype.itemsize
    try:
      info = self._archive.getinfo(name)
    except KeyError:
      raise ValueError(f"{self._source}: the storage member {name!r} is missing from the archive") from None
    if info.file_size < nbytes:
      raise ValueError(f"{self._source}: the storage member {name!r} has {info.file_size} bytes, but its "
                       f"{numel} elements of {storage_type.name} need {nbytes}")
    raw = _read_member(self._archive, name, self._source)
    data = np.frombuffer(raw, dtype, count=numel)
    if self._big_endian:
      data = data.astype(dtype.newbyteorder("="))
    if storage_type.name == "BFloat16Storage":  # bfloat16 is the top half of a float32
      data = (data.astype(np.uint32) << 16).view(np.float32)
    data.flags.writeable = False
    return data


def _read_member(archive: zipfile.ZipFile, name: str, source: str) -> bytes:
  try:
    return archive.read(name)
  except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as e:
    raise ValueError(f"{source}: cannot read {name!r} from the archive (corrupt or truncated): {e}") from e


def _load(f, source: str):
  if not zipfile.is_zipfile(f):
    f.seek(0)
    head = f.read(4)
    if not head:
      raise ValueError(f"{source}: the file is empty, not a torch checkpoint")
    if head.startswith(b"PK"):
      raise ValueError(f"{source}: truncated or corrupt zip archive (no readable central directory)")
    if head[:1] == b"\x80":
      raise ValueError(
          f"{source}: this is a bare pickle, not a zip archive: the legacy serialization of torch < 1.6 (or "
          "not a torch file at all). torch_pickle reads only the zip format; re-save the checkpoint with "
          "torch >= 1.6 (torch.save(torch.load(old, weights_only=False), new)) on a machine you trust.")
    raise ValueError(f"{source}: not a zip archive, so not a torch (>= 1.6) checkpoint")
  f.seek(0)
  try:
    archive = zipfile.ZipFile(f)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise ValueError(f"{source}: corrupt zip archive: {e}") from e
  with archive:
    pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(pickles) != 1:
      raise ValueError(f"{source}: expected one '<stem>/data.pkl' member in the archive, found "
                       f"{pickles or 'none'}; not a torch checkpoint")
    stem = pickles[0][:-len("/data.pkl")]
    big_endian = False
    if f"{stem}/byteorder" in archive.namelist():
      order = _read_member(archive, f"{stem}/byteorder", source).strip()
      if order not in (b"little", b"big"):
        raise ValueError(f"{source}: unknown byteorder {order!r}")
      big_endian = order == b"big"
    data_pkl = _read_member(archive, pickles[0], source)
    unpickler = _Unpickler(io.BytesIO(data_pkl), source, archive, stem, big_endian)
    try:
      return unpickler.load()
    except UnsafePickleError:
      raise
    except ValueError as e:
      if str(e).startswith(source):
        raise
      raise ValueError(f"{source}: cannot unpickle {pickles[0]!r}: {e}") from e
    except Exception as e:  # a malformed pickle fails in many ways (EOFError, TypeError, ...)
      raise ValueError(f"{source}: cannot unpickle {pickles[0]!r}: {type(e).__name__}: {e}") from e


def load(path):
  """Loads the torch checkpoint at ``path``; tensors come back as numpy arrays.

  Raises ``UnsafePickleError`` (a ValueError) if the pickle names a global outside the allow-list, and
  ValueError, naming the path, for a legacy, truncated or corrupt file.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    return _load(f, path)


def load_bytes(data: bytes, name: str = "<bytes>"):
  """``load`` for the bytes of a checkpoint; ``name`` stands for the path in error messages."""
  return _load(io.BytesIO(data), name)

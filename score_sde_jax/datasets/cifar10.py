"""CIFAR-10 from the official archive, without TensorFlow.

`LocalCifar10` is likewise the standard tfds `cifar10` dataset (version 3.0.2; features `id` Text,
`image` (32, 32, 3) uint8, `label` ClassLabel of the ten class names; keys = example index within the
split, ids `train_00000`.., `test_00000`..; the five training batches in order) built from the official
archive a user already has, `cifar-10-python.tar.gz` (pickled batches, unpickled here with a loader that
accepts only numpy arrays and plain data) or `cifar-10-binary.tar.gz` (the one tfds itself downloads). The
archive's MD5 and its whole contents are checked before anything is written; it goes to
`<data_dir>/cifar10/3.0.2/` and is read back by the stock `tfds.data_source('cifar10', data_dir=...)`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import os
import pickle
import tarfile
import tempfile
import zlib
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds

from score_sde_jax.datasets.builders import _this_file, default_data_dir, png_bytes

CIFAR10_NUM_EXAMPLES = {"train": 50000, "test": 10000}
CIFAR10_LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CIFAR_PIXELS = 32 * 32 * 3
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCHES = ("test_batch",)
_CIFAR_MAX_MEMBER_BYTES = 256 << 20  # the official members are ~31 MB; anything far larger is not CIFAR-10


@dataclasses.dataclass(frozen=True)
class _CifarArchiveKind:
  kind: str  # "python" or "binary"
  filename: str  # the official archive's name
  folder: str  # the one folder inside it
  batch_suffix: str  # appended to data_batch_N / test_batch
  meta: str  # the label-names member
  md5: str
  size: int  # bytes of the official archive


CIFAR10_ARCHIVES = {
    "python": _CifarArchiveKind("python", "cifar-10-python.tar.gz", "cifar-10-batches-py", "", "batches.meta",
                                "c58f30108f718f92721af3b95e74349a", 170498071),
    "binary": _CifarArchiveKind("binary", "cifar-10-binary.tar.gz", "cifar-10-batches-bin", ".bin",
                                "batches.meta.txt", "c32a1d4ab5d03f1284b67883e8d87530", 170052171),
}

CIFAR10_HINT = (
    f"Download cifar-10-python.tar.gz or cifar-10-binary.tar.gz from {CIFAR10_URL} and run "
    "`python scripts/prepare_data.py --dataset CIFAR10 --source FILE [--data_dir DATA_DIR]`.")


class Cifar10DataError(RuntimeError):
  """A missing, corrupt or unexpected CIFAR-10 archive."""


@dataclasses.dataclass(frozen=True)
class Cifar10Arrays:
  """The verified contents of a CIFAR-10 archive, in the archive's (and tfds') example order."""

  images: Mapping[str, np.ndarray]  # split -> uint8 [N, 32, 32, 3]
  labels: Mapping[str, np.ndarray]  # split -> uint8 [N], in 0..9
  label_names: tuple[str, ...]
  kind: str  # "python" or "binary"
  path: str


def _file_md5(path: str) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _cifar_error(path: str, what: str) -> Cifar10DataError:
  return Cifar10DataError(f"CIFAR-10 archive {path!r}: {what}")


def _read_cifar_members(path: str) -> tuple[_CifarArchiveKind, dict[str, bytes]]:
  """(kind, {member name inside the folder: bytes}) of the members CIFAR-10 needs, read in one pass."""
  wanted = {}
  for kind in CIFAR10_ARCHIVES.values():
    for name in (*_CIFAR_TRAIN_BATCHES, *_CIFAR_TEST_BATCHES):
      wanted[f"{kind.folder}/{name}{kind.batch_suffix}"] = kind
    wanted[f"{kind.folder}/{kind.meta}"] = kind
  found: dict[str, bytes] = {}
  folders = set()
  try:
    tar = tarfile.open(path, "r:*")  # pylint: disable=consider-using-with
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    with open(path, "rb") as f:
      gzipped = f.read(2) == b"\x1f\x8b"
    what = ("a gzip file but not a readable tar archive: it is truncated or corrupt" if gzipped
            else "not a (gzipped) tar archive")
    raise _cifar_error(path, f"{what} ({e}); expected the official cifar-10-python.tar.gz or "
                             f"cifar-10-binary.tar.gz. {CIFAR10_HINT}") from e
  try:
    with tar:
      for member in tar:
        name = member.name[2:] if member.name.startswith("./") else member.name
        top = name.split("/", 1)[0]
        if top in {k.folder for k in CIFAR10_ARCHIVES.values()}:
          folders.add(top)
        if name not in wanted or not member.isfile():
          continue
        if member.size > _CIFAR_MAX_MEMBER_BYTES:
          raise _cifar_error(path, f"member {name} is {member.size} bytes, far more than a CIFAR-10 batch; "
                                   f"this is not the official archive. {CIFAR10_HINT}")
        found[name] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    raise _cifar_error(path, f"the archive is truncated or corrupt ({type(e).__name__}: {e}); download it "
                             f"again. {CIFAR10_HINT}") from e
  if len(folders) != 1:
    what = ("holds no cifar-10-batches-py/ or cifar-10-batches-bin/ folder" if not folders
            else f"holds both {sorted(folders)}")
    raise _cifar_error(path, f"{what}; expected the official cifar-10-python.tar.gz or cifar-10-binary.tar.gz "
                             f"(CIFAR-100 and other archives are not CIFAR-10). {CIFAR10_HINT}")
  kind = next(k for k in CIFAR10_ARCHIVES.values() if k.folder in folders)
  members = {n.split("/", 1)[1]: data for n, data in found.items() if n.startswith(kind.folder + "/")}
  needed = [f"{b}{kind.batch_suffix}" for b in (*_CIFAR_TRAIN_BATCHES, *_CIFAR_TEST_BATCHES)] + [kind.meta]
  missing = [n for n in needed if n not in members]
  if missing:
    raise _cifar_error(path, f"{kind.folder}/ lacks {', '.join(missing)}; the archive is incomplete or not "
                             f"the official {kind.filename}. {CIFAR10_HINT}")
  return kind, members


_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
  """Unpickles only plain data and numpy arrays (what the CIFAR-10 batches hold), never arbitrary code."""

  def find_class(self, module, name):
    if (module, name) not in _PICKLE_GLOBALS:
      raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}, which no CIFAR-10 batch has")
    if module.startswith("numpy.") and not module.startswith("numpy._core"):
      module = "numpy._core" + module[len("numpy.core"):]  # the Python 2 pickles name numpy.core
      try:
        importlib.import_module(module)
      except ImportError:  # numpy < 2
        module = module.replace("numpy._core", "numpy.core")
    return super().find_class(module, name)


def _unpickle(path: str, member: str, data: bytes) -> dict:
  try:
    obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
  except Exception as e:  # pylint: disable=broad-except
    raise _cifar_error(path, f"member {member} is not a valid pickled CIFAR-10 batch ({type(e).__name__}: "
                             f"{e}). {CIFAR10_HINT}") from e
  if not isinstance(obj, dict):
    raise _cifar_error(path, f"member {member} holds a {type(obj).__name__}, not a dict. {CIFAR10_HINT}")
  return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _decode_cifar_batch(path: str, kind: _CifarArchiveKind, member: str, data: bytes,
                        n: int) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [n, 32, 32, 3], labels uint8 [n]) of one batch member, checked to hold n examples."""
  if kind.kind == "binary":
    record = 1 + _CIFAR_PIXELS
    if len(data) != n * record:
      raise _cifar_error(path, f"member {member} has {len(data)} bytes, expected {n} records of {record} bytes "
                               f"({n * record} bytes); it is truncated or not a CIFAR-10 batch. {CIFAR10_HINT}")
    rows = np.frombuffer(data, np.uint8).reshape(n, record)
    labels, pixels = rows[:, 0], rows[:, 1:]
  else:
    batch = _unpickle(path, member, data)
    if "data" not in batch or "labels" not in batch:
      raise _cifar_error(path, f"member {member} lacks the 'data'/'labels' entries of a CIFAR-10 batch (it has "
                               f"{sorted(map(str, batch))}). {CIFAR10_HINT}")
    pixels = batch["data"]
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.shape != (n, _CIFAR_PIXELS):
      got = (f"{pixels.dtype} array of shape {pixels.shape}" if isinstance(pixels, np.ndarray)
             else type(pixels).__name__)
      raise _cifar_error(path, f"member {member}: 'data' is a {got}, expected uint8 of shape "
                               f"({n}, {_CIFAR_PIXELS}). {CIFAR10_HINT}")
    try:
      labels = np.asarray(batch["labels"], dtype=np.int64)
    except (TypeError, ValueError) as e:
      raise _cifar_error(path, f"member {member}: 'labels' is not a list of integers. {CIFAR10_HINT}") from e
    if labels.shape != (n,):
      raise _cifar_error(path, f"member {member}: {labels.size} labels for {n} images. {CIFAR10_HINT}")
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    raise _cifar_error(path, f"member {member}: label {int(labels.max())} is outside 0..9. {CIFAR10_HINT}")
  # Each row holds the R, G and B planes of 32x32 pixels, one after another.
  images = np.asarray(pixels).reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.uint8)


def _cifar_label_names(path: str, kind: _CifarArchiveKind, data: bytes) -> tuple[str, ...]:
  member = f"{kind.folder}/{kind.meta}"
  if kind.kind == "binary":
    try:
      names = tuple(line.strip() for line in data.decode("ascii").splitlines() if line.strip())
    except UnicodeDecodeError as e:
      raise _cifar_error(path, f"member {member} is not a text file of label names. {CIFAR10_HINT}") from e
  else:
    meta = _unpickle(path, member, data)
    raw = meta.get("label_names")
    if not isinstance(raw, (list, tuple)):
      raise _cifar_error(path, f"member {member} lacks the list 'label_names'. {CIFAR10_HINT}")
    names = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in raw)
  if names != CIFAR10_LABEL_NAMES:
    raise _cifar_error(path, f"member {member} names the classes {list(names)}, expected the CIFAR-10 classes "
                             f"{list(CIFAR10_LABEL_NAMES)}; this is not the CIFAR-10 archive. {CIFAR10_HINT}")
  return names


def load_cifar10_archive(path: str, *, verify_md5: bool = True,
                         num_examples: Mapping[str, int] | None = None) -> Cifar10Arrays:
  """Reads and verifies an official CIFAR-10 archive (python or binary version); raises Cifar10DataError.

  `verify_md5`: the file must be one of the two official archives, byte for byte (its well-known MD5).
  Without it (a repacked archive, or a test's small synthetic one) the contents are still checked: every
  member present, every batch with its exact number of examples, labels in 0..9, the ten class names.
  `num_examples` ({'train': N, 'test': M}, default `CIFAR10_NUM_EXAMPLES`) is for tests with small
  archives: each of the five training batches must then hold N / 5 examples and the test batch M.
  """
  path = os.fspath(path)
  num_examples = dict(CIFAR10_NUM_EXAMPLES if num_examples is None else num_examples)
  if set(num_examples) != {"train", "test"} or num_examples["train"] % len(_CIFAR_TRAIN_BATCHES):
    raise ValueError(f"num_examples must be {{'train': 5 * k, 'test': m}}, got {num_examples}")
  if not os.path.exists(path):
    raise _cifar_error(path, f"no such file. {CIFAR10_HINT}")
  if not os.path.isfile(path):
    raise _cifar_error(path, f"not a file; give the archive itself (not its extracted folder). {CIFAR10_HINT}")
  if verify_md5:
    try:
      digest = _file_md5(path)
    except OSError as e:
      raise _cifar_error(path, f"cannot be read ({e}). {CIFAR10_HINT}") from e
    if digest not in {k.md5 for k in CIFAR10_ARCHIVES.values()}:
      official = " or ".join(f"{k.filename} (MD5 {k.md5}, {k.size} bytes)" for k in CIFAR10_ARCHIVES.values())
      raise _cifar_error(path, f"MD5 {digest} ({os.path.getsize(path)} bytes) is not that of the official "
                               f"{official}: the file is truncated, corrupt or not an official archive; "
                               f"download it again from {CIFAR10_URL} (for an intact repacked archive, pass "
                               f"--no-verify to skip this check).")
  kind, members = _read_cifar_members(path)
  names = _cifar_label_names(path, kind, members[kind.meta])
  images, labels = {}, {}
  for split, batches in (("train", _CIFAR_TRAIN_BATCHES), ("test", _CIFAR_TEST_BATCHES)):
    per_batch = num_examples[split] // len(batches)
    decoded = [_decode_cifar_batch(path, kind, f"{kind.folder}/{b}{kind.batch_suffix}",
                                   members.pop(b + kind.batch_suffix), per_batch) for b in batches]
    images[split] = np.concatenate([d[0] for d in decoded])
    labels[split] = np.concatenate([d[1] for d in decoded])
  return Cifar10Arrays(images=images, labels=labels, label_names=names, kind=kind.kind, path=path)


class LocalCifar10(tfds.builder_cls("cifar10"), skip_registration=True):
  """tfds `cifar10` (version 3.0.2, same features, keys and ids) built from an official archive, without TF.

  `LocalCifar10(data_dir=..., archive=PATH or Cifar10Arrays)`. tfds' own builder reads the binary archive:
  the five training batches in order, then the test batch, each example keyed by its index within its
  split (0..49999, 0..9999) with the id `train_%05d` / `test_%05d`, and the label names from the archive.
  This builder yields exactly those keys, ids, labels and pixels (as lossless PNG), from either archive
  version, so the prepared records and their order are the same as tfds' own preparation.
  """

  name = "cifar10"
  code_path = tfds.core.utils.classproperty(classmethod(_this_file))

  def __init__(self, *, archive, verify_md5: bool = True, num_examples: Mapping[str, int] | None = None,
               **kwargs):
    self._archive = archive
    self._verify_md5 = verify_md5
    self._num_examples = num_examples
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    arrays = self._archive
    if not isinstance(arrays, Cifar10Arrays):  # read and verify everything before writing anything
      arrays = load_cifar10_archive(arrays, verify_md5=self._verify_md5, num_examples=self._num_examples)
    self.info.features["label"].names = list(arrays.label_names)
    return {split: self._generate_examples(arrays, split) for split in ("train", "test")}

  def _generate_examples(self, arrays: Cifar10Arrays, split: str):  # pytype: disable=signature-mismatch
    images, labels = arrays.images[split], arrays.labels[split]
    for index in range(images.shape[0]):
      yield index, {"id": "%s_%05d" % (split, index), "image": png_bytes(images[index]),
                    "label": int(labels[index])}


def prepare_cifar10(source: str, data_dir: str | None = None, *, verify_md5: bool = True,
                    num_examples: Mapping[str, int] | None = None) -> str:
  """Builds tfds `cifar10` (array_record) in `data_dir` from an official CIFAR-10 archive; idempotent.

  `source` is `cifar-10-python.tar.gz` or `cifar-10-binary.tar.gz`. The archive is read and verified
  (see `load_cifar10_archive`) before anything is written, also when the dataset is already prepared (it is
  then left as it is, its split sizes checked). tfds writes into a temporary `incomplete.*` folder that it
  renames on success and deletes on failure, so a failed build leaves nothing behind (an empty
  `<data_dir>/cifar10` created here is removed too). Returns `<data_dir>/cifar10/3.0.2`. Needs no TensorFlow.
  """
  data_dir = default_data_dir(data_dir)
  num_examples = dict(CIFAR10_NUM_EXAMPLES if num_examples is None else num_examples)
  arrays = load_cifar10_archive(source, verify_md5=verify_md5, num_examples=num_examples)
  try:
    builder = LocalCifar10(data_dir=data_dir, archive=arrays)
    prepared = builder.is_prepared()
  except ValueError as e:  # an existing cifar10 there in another file format ("File format is already set")
    raise Cifar10DataError(
        f"The tfds data dir {data_dir!r} already holds a cifar10 dataset this cannot use ({e}); a TFRecord one "
        f"cannot be read without TensorFlow: delete {os.path.join(data_dir, 'cifar10')!r} or choose another "
        f"data dir, and prepare it again.") from e
  if not prepared:
    created = [d for d in (data_dir, os.path.join(data_dir, LocalCifar10.name)) if not os.path.exists(d)]
    try:
      # Nothing is downloaded: point tfds' download folder (which it creates) at a temporary one, not at
      # `<data_dir>/downloads`.
      with tempfile.TemporaryDirectory(prefix="cifar10_downloads_") as download_dir:
        builder.download_and_prepare(
            download_dir=download_dir,
            download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
    except BaseException:
      for d in reversed(created):  # folders made for this build, if tfds left them empty
        if os.path.isdir(d) and not os.listdir(d):
          os.rmdir(d)
      raise
    builder = LocalCifar10(data_dir=data_dir, archive=arrays)
  got = {s: builder.info.splits[s].num_examples for s in ("train", "test")}
  if got != num_examples:
    raise Cifar10DataError(
        f"The CIFAR-10 dataset in {os.fspath(builder.data_dir)!r} has split sizes {got}, expected "
        f"{num_examples}; delete that directory and prepare it again. {CIFAR10_HINT}")
  return os.fspath(builder.data_dir)

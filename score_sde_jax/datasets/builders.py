"""TensorFlow-free tfds builders: MNIST from local IDX files, CIFAR-10 from its official archive, and FFHQ
from a folder of images.

`LocalMNIST` is the standard tfds `mnist` dataset (same name, version, features and example keys, hence
the same record order) built from the four IDX files of a local directory instead of the download. The
result sits in `<data_dir>/mnist/3.0.1/` in the `array_record` format and is read back by the stock
`tfds.data_source('mnist', data_dir=...)`, the same code path as a standard download.

tfds 4.9.10 prepares a `GeneratorBasedBuilder` with `file_format='array_record'` without TensorFlow as long
as no feature has to be encoded by TensorFlow: `tfds.features.Image` encodes numpy arrays with
`tf.image.encode_png`, but takes already-encoded PNG bytes as they are. The builders here therefore hand
it PNG bytes made here (lossless, so the decoded pixels are exactly the IDX pixels).

The SHA-256 digests of the MNIST files (of the *decompressed* IDX bytes, as in the `SHA256SUMS` file that
accompanies the local copy) are checked before anything is written.

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
import gzip
import hashlib
import importlib
import io
import os
import pickle
import struct
import tarfile
import tempfile
import zlib
from typing import Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# SHA-256 of the decompressed IDX files (the standard MNIST contents).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_NUM_EXAMPLES = {"train": 60000, "test": 10000}
# Mirror used by tfds' own `mnist` builder; used only when no local copy is given.
MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"

PREPARE_HINT = (
    "Prepare it with `python scripts/prepare_data.py --dataset MNIST --mnist_dir DIR [--data_dir DATA_DIR]` "
    "(DIR holds train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz and optionally SHA256SUMS), or set SCORE_SDE_MNIST_DIR=DIR."
)


class MnistDataError(RuntimeError):
  """A missing or corrupt MNIST source file."""


def _read_sha256sums(source_dir: str) -> dict[str, str]:
  path = os.path.join(source_dir, "SHA256SUMS")
  if not os.path.exists(path):
    return {}
  sums = {}
  with open(path) as f:
    for line in f:
      parts = line.split()
      if len(parts) == 2:
        sums[parts[1].lstrip("*")] = parts[0].lower()
  return sums


def _find_file(source_dir: str, stem: str) -> str:
  for name in (stem + ".gz", stem):
    path = os.path.join(source_dir, name)
    if os.path.exists(path):
      return path
  raise MnistDataError(
      f"MNIST file {stem}.gz (or uncompressed {stem}) is missing from {source_dir!r}. {PREPARE_HINT}")


def read_idx(path: str, expected_sha256: str | None = None, extra_sha256: str | None = None) -> np.ndarray:
  """Reads an IDX file (gzipped or not), checking the SHA-256 of its decompressed bytes."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise MnistDataError(
        f"MNIST file {path!r} is unreadable or not valid gzip ({e}); it is corrupt: replace it with a "
        f"good copy. {PREPARE_HINT}") from e
  digest = hashlib.sha256(data).hexdigest()
  for want, what in ((extra_sha256, "its SHA256SUMS entry"), (expected_sha256, "the standard MNIST digest")):
    if want is not None and digest != want:
      raise MnistDataError(
          f"Checksum mismatch for MNIST file {path!r}: SHA-256 of the decompressed bytes is {digest}, "
          f"{what} is {want}. The file is corrupt or not the standard MNIST file: replace it with a good "
          f"copy (and remove any partly built dataset). {PREPARE_HINT}")
  if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise MnistDataError(f"{path!r} is not an unsigned-byte IDX file. {PREPARE_HINT}")
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  offset = 4 + 4 * ndim
  if len(data) != offset + int(np.prod(shape)):
    raise MnistDataError(f"{path!r}: IDX header says shape {shape} but the file has {len(data) - offset} "
                         f"bytes of data; the file is truncated or corrupt. {PREPARE_HINT}")
  return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_mnist_arrays(source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Verified (images uint8 [N, 28, 28], labels uint8 [N]) of split 'train' or 'test' from local files."""
  if not os.path.isdir(source_dir):
    raise MnistDataError(f"MNIST source directory {source_dir!r} does not exist. {PREPARE_HINT}")
  sums = _read_sha256sums(source_dir)
  out = []
  for kind in ("images", "labels"):
    stem = MNIST_FILES[f"{split}_{kind}"]
    path = _find_file(source_dir, stem)
    out.append(read_idx(path, MNIST_SHA256[stem], sums.get(stem)))
  images, labels = out
  n = MNIST_NUM_EXAMPLES[split]
  if images.shape != (n, 28, 28) or labels.shape != (n,):
    raise MnistDataError(f"MNIST {split}: unexpected shapes {images.shape}, {labels.shape} in {source_dir!r}")
  return images, labels


def verify_mnist_source(source_dir: str) -> None:
  """Checks that all four MNIST files are present and match their checksums (raises MnistDataError)."""
  for split in ("train", "test"):
    load_mnist_arrays(source_dir, split)


_PNG_COLOR_TYPE = {1: 0, 3: 2, 4: 6}  # grey, RGB, RGBA


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(image: np.ndarray, level: int = 6) -> bytes:
  """Lossless PNG of a uint8 [H, W] or [H, W, C] image (C in 1, 3, 4): 8-bit, no interlace, filter 0.

  A direct encoder (zlib + CRC, ~10x faster than going through Pillow for small images); any PNG
  decoder (Pillow in tfds, TensorFlow) reads the exact pixels back.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"png_bytes needs uint8 pixels, got {image.dtype}")
  if image.ndim == 2:
    image = image[..., None]
  h, w, c = image.shape
  if c not in _PNG_COLOR_TYPE:
    raise ValueError(f"png_bytes needs 1, 3 or 4 channels, got {c}")
  rows = np.zeros((h, 1 + w * c), np.uint8)  # a leading filter-type byte 0 ("None") per row
  rows[:, 1:] = image.reshape(h, w * c)
  header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOR_TYPE[c], 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
          + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) + _png_chunk(b"IEND", b""))


def _mnist_base_class():
  return tfds.builder_cls("mnist")


def _this_file(cls):  # pylint: disable=unused-argument
  # tfds derives `code_path` through `importlib_resources` for builders defined in a package, an
  # undeclared dependency of tfds that may be absent; the path is only used to look for a checksums file.
  from etils import epath  # pylint: disable=import-outside-toplevel
  return epath.Path(os.path.abspath(__file__))


class LocalMNIST(_mnist_base_class(), skip_registration=True):
  """tfds `mnist` (version 3.0.1, same features/keys) prepared from local IDX files without TensorFlow.

  Use `LocalMNIST(data_dir=..., source_dir=...)`; with `source_dir=None` the four files are fetched from
  tfds' mirror by the tfds download manager (needs network) and verified the same way.
  """

  name = "mnist"
  code_path = tfds.core.utils.classproperty(classmethod(_this_file))

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    self._source_dir = source_dir
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    if self._source_dir is not None:
      source_dir = self._source_dir
    else:
      paths = dl_manager.download({s: MNIST_URL + s + ".gz" for s in MNIST_FILES.values()})
      # The download manager names files by URL hash; link them under their usual names.
      staged = os.path.join(os.fspath(dl_manager.download_dir), "mnist_idx")
      os.makedirs(staged, exist_ok=True)
      for stem, path in paths.items():
        target = os.path.join(staged, stem + ".gz")
        if not os.path.exists(target):
          os.symlink(os.fspath(path), target)
      source_dir = staged
    # Verify everything before writing anything.
    verify_mnist_source(source_dir)
    return {split: self._generate_examples(source_dir=source_dir, split=split) for split in ("train", "test")}

  def _generate_examples(self, source_dir: str, split: str) -> Iterator[tuple[int, Mapping]]:
    images, labels = load_mnist_arrays(source_dir, split)
    # Same keys as tfds' own builder (the example index), hence the same shuffled record order.
    for index in range(images.shape[0]):
      yield index, {"image": png_bytes(images[index]), "label": int(labels[index])}


def _tfds_has(name: str) -> bool:
  try:
    tfds.builder_cls(name)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


# Registered as tfds 'ffhq' unless a tfds version brings its own (then that one is used).
class Ffhq(tfds.core.GeneratorBasedBuilder, skip_registration=_tfds_has("ffhq")):
  """FFHQ (Karras et al. 2019) at one resolution per config, from a manually downloaded folder of images.

  Not in the tfds catalogue. Put the 70,000 PNG images (any sub-folder layout; e.g. the official
  `images1024x1024/`) in `<manual_dir>/ffhq/` and run
  `python scripts/prepare_data.py --dataset FFHQ --image_size 256 --manual_dir DIR`. Images are resized with
  Pillow's antialiased box filter, encoded as PNG (no TensorFlow needed) and stored as `array_record`.
  """

  VERSION = tfds.core.Version("1.0.0")
  code_path = tfds.core.utils.classproperty(classmethod(_this_file))
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=str(r), description=f"{r}x{r}") for r in (64, 128, 256, 1024)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Download the FFHQ images (https://github.com/NVlabs/ffhq-dataset) and put "
                                  "the PNG files under `<manual_dir>/ffhq/`.")

  def _info(self):
    r = int(self.builder_config.name)
    return tfds.core.DatasetInfo(
        builder=self,
        description="Flickr-Faces-HQ, resized to %dx%d." % (r, r),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(r, r, 3)),
            "image/filename": tfds.features.Text(),
        }),
        homepage="https://github.com/NVlabs/ffhq-dataset",
    )

  def _split_generators(self, dl_manager):
    root = os.path.join(os.fspath(dl_manager.manual_dir), "ffhq")
    if not os.path.isdir(root):
      root = os.fspath(dl_manager.manual_dir)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                   if f.lower().endswith((".png", ".jpg", ".jpeg")))
    if not files:
      raise FileNotFoundError(f"No FFHQ images found under {root!r}. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {"train": self._generate_examples(root, files)}

  def _generate_examples(self, root, files):  # pytype: disable=signature-mismatch
    from PIL import Image  # pylint: disable=import-outside-toplevel
    r = int(self.builder_config.name)
    for path in files:
      with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (r, r):
          im = im.resize((r, r), Image.BOX)
        key = os.path.relpath(path, root)
        yield key, {"image": png_bytes(np.asarray(im)), "image/filename": key}


def default_mnist_source_dir() -> str | None:
  """`$SCORE_SDE_MNIST_DIR` if set, else `<repo>/../shared/data/mnist` if it exists, else None."""
  env = os.environ.get("SCORE_SDE_MNIST_DIR")
  if env:
    return env
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  candidate = os.path.join(os.path.dirname(repo), "shared", "data", "mnist")
  return candidate if os.path.isdir(candidate) else None


def default_data_dir(data_dir: str | None = None) -> str:
  """The tfds data dir: the given one, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  if data_dir:
    return os.path.expanduser(os.fspath(data_dir))
  return os.fspath(tfds.core.constants.DATA_DIR) if hasattr(tfds.core, "constants") else os.path.expanduser(
      os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def mnist_is_prepared(data_dir: str | None = None) -> bool:
  path = os.path.join(default_data_dir(data_dir), "mnist", str(LocalMNIST.VERSION), "dataset_info.json")
  return os.path.exists(path)


def prepare_mnist(source_dir: str | None = None, data_dir: str | None = None, *, download: bool = False) -> str:
  """Builds tfds `mnist` (array_record) in `data_dir` from the IDX files in `source_dir`; idempotent.

  `source_dir=None` uses `default_mnist_source_dir()`; if that finds nothing and `download` is True the
  files are fetched from tfds' mirror instead. Checksums are verified before anything is written (and an
  explicitly given `source_dir` is verified even when the dataset is already there); an already prepared
  dataset is left as it is (its split sizes are checked). Returns the dataset directory
  (`<data_dir>/mnist/3.0.1`). Needs no TensorFlow.
  """
  data_dir = default_data_dir(data_dir)
  explicit = source_dir is not None
  if source_dir is None:
    source_dir = default_mnist_source_dir()
    if source_dir is None and not download:
      raise MnistDataError(f"No local MNIST files found and downloading is off. {PREPARE_HINT}")
  builder = LocalMNIST(data_dir=data_dir, source_dir=source_dir)
  if builder.is_prepared():
    if explicit:
      verify_mnist_source(source_dir)  # an explicitly named source must be intact even if not needed
  else:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
    builder = LocalMNIST(data_dir=data_dir, source_dir=source_dir)
  got = {s: builder.info.splits[s].num_examples for s in ("train", "test")}
  if got != MNIST_NUM_EXAMPLES:
    raise MnistDataError(
        f"The MNIST dataset in {builder.data_dir!r} has split sizes {got}, expected {MNIST_NUM_EXAMPLES}; "
        f"delete that directory and prepare it again. {PREPARE_HINT}")
  return os.fspath(builder.data_dir)


# ------------------------------------------------------------------------------------------------ CIFAR-10

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

"""TensorFlow-free tfds builders: MNIST from local IDX files and FFHQ from a folder of images (CIFAR-10
from its official archive: `cifar10.py`).

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

CIFAR-10 from its official archive: `cifar10.py`.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
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

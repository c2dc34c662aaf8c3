"""Image (and toy) data pipelines: tfds `array_record` files read through `tfds.data_source` and Grain.

No TensorFlow is needed to read: `tfds.data_source` decodes records with numpy/Pillow, Grain runs the
per-batch work in threads and prefetches. Datasets must be prepared in the `array_record` file format
(`scripts/prepare_data.py`; MNIST is also built automatically on first use from local IDX files).

The iterators (determinism, exact resumption, the same global batch on any host count): `iterators.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import io
from typing import Any, Callable

import numpy as np

from score_sde_jax import config_defaults
from score_sde_jax.config_defaults import TOY_DATASETS
from score_sde_jax.datasets import builders
from score_sde_jax.datasets.iterators import DataError, EvalIterator, TrainIterator, _host_layout
from score_sde_jax.datasets.builders import (MnistDataError, default_mnist_source_dir, prepare_mnist)  # noqa: F401

IMAGE_DATASETS = ("CIFAR10", "SVHN", "CELEBA", "LSUN", "FFHQ", "CelebAHQ", "MNIST")
_CACHE_LIMIT_BYTES = 2 << 30  # decoded examples of smaller datasets are kept in memory after first use


# ---------------------------------------------------------------------------------------------------------
# Scalers


_is_toy = config_defaults.is_toy


def get_data_scaler(config) -> Callable:
  """Data in [0, 1] -> model input: [-1, 1] if `config.data.centered`, else unchanged (toy: identity)."""
  if not _is_toy(config) and config.data.centered:
    return lambda x: x * 2.0 - 1.0
  return lambda x: x


def get_data_inverse_scaler(config) -> Callable:
  """Inverse of `get_data_scaler`."""
  if not _is_toy(config) and config.data.centered:
    return lambda x: (x + 1.0) / 2.0
  return lambda x: x


# ---------------------------------------------------------------------------------------------------------
# Dataset catalogue


@dataclasses.dataclass(frozen=True)
class _Spec:
  tfds_name: str
  train_split: str
  eval_split: str
  num_channels: int
  preprocess: Callable[[np.ndarray, int], np.ndarray]


def _pil(img: np.ndarray):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def _from_pil(im, channels: int) -> np.ndarray:
  a = np.asarray(im, dtype=np.uint8)
  return a[..., None] if a.ndim == 2 else a[..., :channels]


def _resize(img: np.ndarray, h: int, w: int, method: str = "bilinear") -> np.ndarray:
  """Antialiased resize of a uint8 HWC image (Pillow; like tf.image.resize(antialias=True))."""
  if img.shape[0] == h and img.shape[1] == w:
    return img
  from PIL import Image  # pylint: disable=import-outside-toplevel
  resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[method]
  return _from_pil(_pil(img).resize((w, h), resample), img.shape[-1])


def _central_crop(img: np.ndarray, size_h: int, size_w: int | None = None) -> np.ndarray:
  size_w = size_h if size_w is None else size_w
  h, w = img.shape[:2]
  top, left = (h - size_h) // 2, (w - size_w) // 2
  return img[top:top + size_h, left:left + size_w]


def _resize_small(img: np.ndarray, size: int) -> np.ndarray:
  """Resizes the smaller side to `size` keeping the aspect ratio (official `resize_small`)."""
  h, w = img.shape[:2]
  ratio = size / min(h, w)
  return _resize(img, int(round(h * ratio)), int(round(w * ratio)))


def _pp_resize(img, size):
  return _resize(img, size, size)


def _pp_celeba(img, size):
  return _resize_small(_central_crop(img, 140), size)


def _pp_lsun(img, size):
  if size == 128:  # official: resize the small side, then central crop
    return _central_crop(_resize_small(img, size), size)
  crop = min(img.shape[:2])  # official `crop_resize`: square central crop, then bicubic resize
  return _resize(_central_crop(img, crop), size, size, "bicubic")


def _hq_name(base: str, size: int, available: tuple[int, ...]) -> str:
  res = min((r for r in available if r >= size), default=max(available))
  return f"{base}/{res}"


def _spec(config) -> _Spec:
  name = config.data.dataset
  size = int(config.data.image_size)
  if name == "CIFAR10":
    return _Spec("cifar10", "train", "test", 3, _pp_resize)
  if name == "SVHN":
    return _Spec("svhn_cropped", "train", "test", 3, _pp_resize)
  if name == "CELEBA":
    return _Spec("celeb_a", "train", "validation", 3, _pp_celeba)
  if name == "LSUN":
    category = config.data.category if "category" in config.data else None   # LSUN configs set it
    if not category:
      raise ValueError("LSUN needs config.data.category (e.g. 'bedroom', 'church_outdoor').")
    return _Spec(f"lsun/{category}", "train", "validation", 3, _pp_lsun)
  if name == "FFHQ":
    return _Spec(_hq_name("ffhq", size, (64, 128, 256, 1024)), "train", "train", 3, _pp_resize)
  if name == "CelebAHQ":
    return _Spec(_hq_name("celeb_a_hq", size, tuple(2**i for i in range(11))), "train", "train", 3, _pp_resize)
  if name == "MNIST":
    return _Spec("mnist", "train", "test", 1, _pp_resize)
  raise ValueError(f"Unknown dataset {name!r}: config.data.dataset must be one of {IMAGE_DATASETS} "
                   f"(images) or {TOY_DATASETS} (toy data).")


def _data_dir(config) -> str:
  return builders.default_data_dir(config.data.tfds_data_dir or None)


def _prepare_hint(config, data_dir: str) -> str:
  name = config.data.dataset
  cmd = f"python scripts/prepare_data.py --dataset {name} --data_dir {data_dir}"
  if name == "LSUN":
    cmd += f" --category {config.data.category}"
  if name == "MNIST":
    return (f"Prepare it with `{cmd} [--mnist_dir DIR]` (builds it from the local IDX files of DIR, default "
            f"$SCORE_SDE_MNIST_DIR or ../shared/data/mnist, without TensorFlow; with no local files it "
            f"downloads them from tfds' mirror).")
  return (f"Prepare it with `{cmd}` (the standard tfds download and preparation, written as array_record; "
          f"tfds needs TensorFlow for that step only: `pip install 'score_sde_jax[prepare]'`), or "
          f"`tfds build {_spec(config).tfds_name} --data_dir {data_dir} --file_format=array_record`.")


def _open_source(config, split: str):
  """`tfds.data_source` of the split, building MNIST on first use; clear errors otherwise."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  spec = _spec(config)
  data_dir = _data_dir(config)

  def open_():
    return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)

  try:
    return open_()
  except Exception as first_error:  # pylint: disable=broad-except
    error = first_error
  if config.data.dataset == "MNIST" and not builders.mnist_is_prepared(data_dir):
    source_dir = default_mnist_source_dir()
    if source_dir is not None:
      prepare_mnist(source_dir, data_dir)  # raises MnistDataError with instructions on bad files
      return open_()
    # No local copy: fetch the standard files (tfds' mirror, as tfds' own `mnist` does) and build the
    # same dataset, verified against the standard digests.
    try:
      prepare_mnist(None, data_dir, download=True)
    except MnistDataError:
      raise
    except Exception as download_error:  # pylint: disable=broad-except
      raise DataError(f"MNIST is not prepared in the tfds data dir {data_dir!r}, no local MNIST files were "
                      f"found and downloading them failed ({type(download_error).__name__}: "
                      f"{download_error}). {_prepare_hint(config, data_dir)}") from download_error
    return open_()
  try:
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    prepared = builder.is_prepared()
    fmt = str(builder.info.file_format) if prepared else ""
    splits = list(builder.info.splits.keys()) if prepared else []
  except Exception:  # pylint: disable=broad-except
    prepared, fmt, splits = False, "", []
  if not prepared:
    raise DataError(f"{config.data.dataset} (tfds '{spec.tfds_name}') is not prepared in the tfds data dir "
                    f"{data_dir!r}. {_prepare_hint(config, data_dir)}") from error
  if splits and split.split("[")[0] not in splits:
    raise DataError(f"{config.data.dataset} (tfds '{spec.tfds_name}') has no split {split!r}; it has "
                    f"{splits}.") from error
  if "array_record" not in fmt.lower():
    raise DataError(f"{config.data.dataset} (tfds '{spec.tfds_name}') in {data_dir!r} is stored as {fmt}, "
                    f"which cannot be read without TensorFlow; prepare it again in the array_record format "
                    f"into another data dir. {_prepare_hint(config, data_dir)}") from error
  raise DataError(f"Could not open {config.data.dataset} (tfds '{spec.tfds_name}', split {split!r}) in "
                  f"{data_dir!r}: {error}") from error


def _resolve_split(config, split: str, spec: _Spec) -> str:
  if split in ("test", "eval") and spec.eval_split != "test":
    return spec.eval_split
  return split


# ---------------------------------------------------------------------------------------------------------
# Sources: random access to preprocessed uint8 examples


def decode_image(data: bytes) -> np.ndarray:
  """uint8 [H, W, C] pixels of encoded image bytes, decoded by Pillow (~27k CIFAR-10 images/s on one CPU
  core, far above what training consumes)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im)


def _is_mock(source) -> bool:
  from unittest import mock  # pylint: disable=import-outside-toplevel
  return isinstance(getattr(source, "data_source", None), mock.NonCallableMock)


class _ImageSource:
  """Random access to preprocessed uint8 [H, W, C] images (+ int labels) of one tfds split."""
  is_toy = False

  def __init__(self, config, split: str):
    self.spec = _spec(config)
    self.size = int(config.data.image_size)
    if int(config.data.num_channels) != self.spec.num_channels:
      raise ValueError(f"config.data.num_channels={config.data.num_channels} but {config.data.dataset} images "
                       f"have {self.spec.num_channels} channel(s).")
    if self.size <= 0:
      raise ValueError(f"config.data.image_size must be positive, got {config.data.image_size}")
    self.split = _resolve_split(config, split, self.spec)
    self.source = _open_source(config, self.split)
    if not _is_mock(self.source):
      # Decode the images here (Pillow, in Grain's threads) rather than through tfds' generic decoder:
      # ~2.5x faster. (tfds.testing.mock_data serves decoded arrays only, so mocks keep the default.)
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
      self.source = tfds.data_source(self.spec.tfds_name, split=self.split, data_dir=_data_dir(config),
                                     download=False, decoders={"image": tfds.decode.SkipDecoding()})
    self.num_examples = len(self.source)
    self.shape = (self.size, self.size, self.spec.num_channels)
    nbytes = self.num_examples * int(np.prod(self.shape))
    self._cache: dict[int, tuple[np.ndarray, int]] | None = {} if nbytes <= _CACHE_LIMIT_BYTES else None
    self._batched_reads = True

  def _read(self, indices: list[int]) -> list[dict]:
    if self._batched_reads:
      try:
        return list(self.source.__getitems__(indices))
      except TypeError:  # tfds.testing.mock_data patches __getitem__ but breaks __getitems__
        self._batched_reads = False
    return [self.source[i] for i in indices]

  def _process(self, example: dict) -> tuple[np.ndarray, int]:
    img = example["image"]
    if isinstance(img, (bytes, np.bytes_)):
      img = decode_image(bytes(img))
    img = np.asarray(img, dtype=np.uint8)
    if img.ndim == 2:
      img = img[..., None]
    img = self.spec.preprocess(img, self.size)
    if img.shape != self.shape:
      raise DataError(f"{self.spec.tfds_name}: preprocessed image has shape {img.shape}, expected {self.shape}")
    label = int(np.asarray(example.get("label", 0)))
    return np.ascontiguousarray(img), label

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    indices = [int(i) for i in indices]
    cache = self._cache
    missing = sorted({i for i in indices if cache is None or i not in cache})
    fetched = {}
    if missing:
      for i, ex in zip(missing, self._read(missing)):
        fetched[i] = self._process(ex)
        if cache is not None:
          cache[i] = fetched[i]
    items = [fetched[i] if i in fetched else cache[i] for i in indices]
    images = np.stack([x[0] for x in items]) if items else np.zeros((0,) + self.shape, np.uint8)
    labels = np.asarray([x[1] for x in items], dtype=np.int32)
    return images, labels


class _ToySource:
  """A fixed sample of a toy distribution held in memory.  When the config asks for labels
  (`config_defaults.uses_labels`: a classifier or a class-conditional model), the Gaussian mixtures label
  each point with its component (`labels`, int32); otherwise, and for the sampled toys, `labels` is None
  and the batches hold 'image' only."""
  is_toy = True

  def __init__(self, config, train: bool, seed: int):
    from score_sde_jax import config_defaults  # pylint: disable=import-outside-toplevel
    if train:
      self.data, self.labels = _toy_sample(config.data.dataset, int(config.data.num_train), int(seed), 0)
    else:
      self.data, self.labels = _toy_sample(config.data.dataset, int(config.data.num_test), TOY_TEST_SEED, 1)
    if not config_defaults.uses_labels(config):
      self.labels = None
    self.num_examples = self.data.shape[0]
    self.shape = self.data.shape[1:]

  def get(self, indices: np.ndarray):
    indices = np.asarray(indices, dtype=np.int64)
    return self.data[indices], None if self.labels is None else self.labels[indices]


TOY_TEST_SEED = 20210101  # fixed seed of the held-out toy sample (independent of config.seed)


@functools.lru_cache(maxsize=8)
def _toy_sample(name: str, n: int, seed: int, tag: int):
  """(`n` points of toy distribution `name` from key fold_in(PRNGKey(seed), tag), their mixture components
  or None); read-only, memoised.  The points are the same with or without components (same draws)."""
  import jax  # pylint: disable=import-outside-toplevel
  from score_sde_jax.datasets import toy  # pylint: disable=import-outside-toplevel
  key = jax.random.fold_in(jax.random.PRNGKey(seed), tag)
  dist = toy.get_toy_dataset(name)
  labels = None
  if isinstance(dist, toy.GaussianMixture):
    data, comp = dist.sample_with_components(key, n)
    labels = np.array(comp, dtype=np.int32)
    labels.setflags(write=False)
  else:
    data = dist.sample(key, n)
  data = np.array(data, dtype=np.float32)
  if data.ndim == 1:
    data = data[:, None]
  data.setflags(write=False)
  return data, labels


def toy_has_labels(name: str) -> bool:
  """Whether toy dataset `name` labels its points (the Gaussian mixtures: the component)."""
  from score_sde_jax.datasets import toy  # pylint: disable=import-outside-toplevel
  return isinstance(toy.get_toy_dataset(name), toy.GaussianMixture)


def get_train_iterator(config, *, batch_size: int | None = None, seed: int | None = None,
                       process_index: int | None = None, process_count: int | None = None,
                       num_threads: int | None = None, prefetch: int = 4) -> TrainIterator:
  """Infinite iterator of this host's training batches.

  Images: `{'image': float32 [B_host, H, W, C] in [0, 1] (random flip and optional uniform dequantisation
  (x + U[0, 1)) / 256 applied), 'label': int32 [B_host]}` (label 0 for datasets without labels). Toy data:
  `{'image': float32 [B_host, D]}` (+ 'label': the mixture component, for the Gaussian mixtures when the
  config uses labels) from a fixed sample of `config.data.num_train` points. `batch_size` is
  the global batch (default `config.training.batch_size`), B_host = batch_size / process_count; `seed`
  defaults to `config.seed`; process index/count default to JAX's.
  """
  global_batch = config.training.batch_size if batch_size is None else batch_size
  global_batch, host_batch, pi, pc = _host_layout(global_batch, process_index, process_count)
  seed = config.seed if seed is None else seed
  if _is_toy(config):
    source = _ToySource(config, train=True, seed=seed)
    flip = dequant = False
  else:
    spec = _spec(config)
    source = _ImageSource(config, spec.train_split)
    flip, dequant = bool(config.data.random_flip), bool(config.data.uniform_dequantization)
  return TrainIterator(source, dataset=config.data.dataset, seed=seed, global_batch=global_batch,
                       host_batch=host_batch, process_index=pi, process_count=pc, random_flip=flip,
                       dequantize=dequant, num_threads=num_threads, prefetch=prefetch)


def get_eval_iterator(config, split: str = "test", *, batch_size: int | None = None,
                      process_index: int | None = None, process_count: int | None = None,
                      num_threads: int | None = None, prefetch: int = 4) -> EvalIterator:
  """Finite iterator over `split` (each example exactly once over all hosts, in record order).

  Images: `{'image': float32 [B, H, W, C] in [0, 1] (no flip, no dequantisation), 'image_int': uint8,
  'label': int32, 'mask': bool [B]}`; padded entries are zeros with mask False. Toy: `{'image': float32
  [B, D], 'mask'}` over the held-out sample of `config.data.num_test` points ('test') or the training
  sample ('train'). `split='test'` means the dataset's evaluation split (CelebA/LSUN: 'validation',
  FFHQ/CelebA-HQ: 'train', as in the official code); other tfds split names pass through. `batch_size` is
  global (default `config.eval.batch_size`); each host gets batch_size / process_count and all hosts run
  the same `len()` batches.
  """
  global_batch = config.eval.batch_size if batch_size is None else batch_size
  global_batch, host_batch, pi, pc = _host_layout(global_batch, process_index, process_count)
  if _is_toy(config):
    if split not in ("test", "eval", "train"):
      raise ValueError(f"Toy datasets have splits 'train' and 'test', not {split!r}")
    source = _ToySource(config, train=(split == "train"), seed=config.seed)
  else:
    source = _ImageSource(config, split)
  return EvalIterator(source, global_batch=global_batch, host_batch=host_batch, process_index=pi,
                      process_count=pc, num_threads=num_threads, prefetch=prefetch)


def get_dataset_info(config, split: str = "train") -> dict[str, Any]:
  """tfds name, resolved split and number of examples (opens the data source)."""
  if _is_toy(config):
    return {"name": config.data.dataset, "split": split, "num_examples":
            int(config.data.num_train if split == "train" else config.data.num_test)}
  src = _ImageSource(config, split)
  return {"name": src.spec.tfds_name, "split": src.split, "num_examples": src.num_examples}


"""Data: tfds image pipelines (`images`), local tfds builders (`builders`) and toy distributions (`toy`).

`toy` is imported lazily (on first attribute access), so the image pipeline does not depend on it.
"""
from score_sde_jax.datasets.builders import default_mnist_source_dir, prepare_mnist, MnistDataError
from score_sde_jax.datasets.images import (
    IMAGE_DATASETS,
    DataError,
    EvalIterator,
    TrainIterator,
    get_data_inverse_scaler,
    get_data_scaler,
    get_dataset_info,
    get_eval_iterator,
    get_train_iterator,
)


def data_shape(config):
  """Shape of one example in model space: (D,) for toy data, (H, W, C) for images."""
  from score_sde_jax import config_defaults  # pylint: disable=import-outside-toplevel
  if config_defaults.is_toy(config):
    from score_sde_jax.datasets import toy  # pylint: disable=import-outside-toplevel
    return (int(toy.get_toy_dataset(config.data.dataset).dim),)
  size = int(config.data.image_size)
  return (size, size, int(config.data.num_channels))


def test_points(config, max_points=None):
  """The (first `max_points`) points of the test split of a toy dataset, float32 [N, D], on this host."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  it = get_eval_iterator(config, "test", batch_size=int(config.eval.batch_size),
                         process_index=jax.process_index(), process_count=jax.process_count())
  xs = []
  for b in it:
    xs.append(np.asarray(b["image"], np.float32)[np.asarray(b["mask"], bool)])
    if max_points and sum(len(x) for x in xs) >= max_points:
      break
  x = np.concatenate(xs)
  return x[:max_points] if max_points else x


def __getattr__(name):
  if name == "toy":
    import importlib  # pylint: disable=import-outside-toplevel
    return importlib.import_module("score_sde_jax.datasets.toy")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IMAGE_DATASETS", "DataError", "data_shape", "test_points", "EvalIterator", "MnistDataError", "TrainIterator", "default_mnist_source_dir",
    "get_data_inverse_scaler", "get_data_scaler", "get_dataset_info", "get_eval_iterator", "get_train_iterator",
    "prepare_mnist", "toy",
]

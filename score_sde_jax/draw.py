"""Drawing samples from a model's weights: the one "params → score_fn → sampler → data space" program.

    draw(params, key) = inverse_scaler(sampler(key, score_fn_params))   with
    score_fn_params(x, t) = s_θ(x, t) built from the network and the SDE (`models.get_score_fn`),

compiled once per (config, batch shape) and shared by the training snapshots, `scripts/sample.py` and
the toy report; `score_program` is the matching jitted (params, x, t) ↦ s_θ(x, t) for score-field plots.
The batch axis of the samples is sharded over `out_sharding` (every device draws its share; params and
key replicated), so the same key gives the same samples on any device count for samplers without batch
coupling.
"""
from __future__ import annotations

from typing import Callable, Tuple

import jax

from score_sde_jax import models, sampling
from score_sde_jax.datasets import get_data_inverse_scaler

Array = jax.Array


def draw_program(config, sde, model, shape: Tuple[int, ...], *, replicated=None,
                 out_sharding=None) -> Callable[[object, Array], Tuple[Array, Array]]:
  """The jitted (params, key) ↦ (samples in data space [B, *D], nfe) of `config.sampling` for batch
  shape `shape`.  replicated / out_sharding: the shardings of (params, key) and of the samples (None:
  let jit decide, e.g. one device)."""
  sample_fn = sampling.get_sampler(config, sde, shape)
  inverse_scaler = get_data_inverse_scaler(config)
  continuous = bool(config.training.continuous)

  def draw(params, key):
    score_fn = models.get_score_fn(sde, model, params, continuous=continuous, train=False)
    x, nfe = sample_fn(key, score_fn)
    return inverse_scaler(x), nfe

  if replicated is None:
    return jax.jit(draw)
  return jax.jit(draw, in_shardings=(replicated, replicated),
                 out_shardings=(out_sharding if out_sharding is not None else replicated, replicated))


def score_program(config, sde, model) -> Callable[[object, Array, Array], Array]:
  """The jitted (params, x, t) ↦ s_θ(x, t) (x in model space)."""
  continuous = bool(config.training.continuous)
  return jax.jit(lambda params, x, t: models.get_score_fn(sde, model, params, continuous=continuous,
                                                          train=False)(x, t))


def batch_key(seed: int, index: int) -> Array:
  """The key of batch `index` of a sampling run with `seed` (scripts/sample.py's batches)."""
  return jax.random.fold_in(jax.random.PRNGKey(int(seed)), int(index))


def snapshot_key(seed: int, step: int) -> Array:
  """The key of the training snapshot at `step` (config.seed + 1, folded with the step)."""
  return jax.random.fold_in(jax.random.PRNGKey(int(seed) + 1), int(step))


def draw_batches(draw, params, *, seed: int, total: int, batch_size: int, replicated, progress: bool = False,
                 desc: str = "sampling", inputs=(), input_sharding=None):
  """`total` samples from `draw` (a `draw_program`) in batches of `batch_size`, batch i drawn with
  `batch_key(seed, i)`; every host gets all of them (gathered).  Returns (samples [total, *D] numpy,
  the NFE of each batch, seconds).  A tqdm bar with the NFE when `progress`.

  `inputs`: per-sample arrays [total, ...] (class labels, images, masks) passed to `draw` after the key,
  cut into the same batches (the last one padded by repeating its last row), placed with
  `input_sharding` (e.g. `conditional_draw`'s programs)."""
  import time

  import numpy as np
  from tqdm.auto import tqdm

  from score_sde_jax.run import parallel
  out, nfes = [], []
  t0 = time.time()
  with tqdm(total=total, unit="sample", desc=desc, disable=not progress) as bar:
    for i in range(-(-total // batch_size)):
      args = [jax.device_put(_rows(a, i * batch_size, batch_size), input_sharding) for a in inputs]
      x, nfe = draw(params, jax.device_put(batch_key(seed, i), replicated), *args)
      x = parallel.to_host(x)      # gathered from every host
      out.append(x)
      nfes.append(int(parallel.to_host(nfe)))
      bar.update(min(len(x), total - bar.n))
      bar.set_postfix(nfe=nfes[-1])
  return np.concatenate(out)[:total], nfes, time.time() - t0


def _rows(a, start: int, n: int):
  """Rows [start, start + n) of `a`, padded to n rows by repeating the last one."""
  import numpy as np
  a = np.asarray(a)
  idx = np.minimum(np.arange(start, start + n), len(a) - 1)
  return a[idx]


def save_samples(config, samples, path: str, *, nfes, step: int, **provenance) -> str:
  """Writes samples (data space) to `path` (.npz: `samples`, `nfe`, `step` and `provenance`) and a PNG beside
  it (an image grid of up to 256, or a scatter over the test data for toy data); returns the PNG's path."""
  import os

  import numpy as np

  from score_sde_jax import config_defaults, plotting
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, samples=samples, nfe=np.asarray(nfes), step=step, **provenance)
  png = os.path.splitext(path)[0] + ".png"
  if config_defaults.is_toy(config):
    from score_sde_jax import datasets
    plotting.save_toy_samples(samples, datasets.test_points(config), png,
                              title=f"step {step}: {config.sampling.method} samples vs test data")
  else:
    plotting.save_image_grid(samples[:min(len(samples), 256)], png)
  return png


__all__ = ["draw_program", "draw_batches", "save_samples", "score_program", "batch_key", "snapshot_key"]

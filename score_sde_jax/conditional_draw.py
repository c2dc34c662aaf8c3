"""Controllable drawing from a model's weights: the programs behind `scripts/sample.py`'s --class_label,
--cfg_weight, --inpaint and --colorize, and their inputs (images, masks, the classifier).

Each is `draw.draw_program`'s "params → score_fn → sampler → data space" with the score transformed
(`controllable.py`), so guidance composes with every `sampling.method`:

* classifier guidance:  s(x, t, y) = s_θ(x, t) + scale · ∇ₓ log p_φ(y | x, t), with p_φ a noise-conditional
  classifier (`training.task='noise_classifier'`) of the same SDE;
* classifier-free guidance of a class-conditional model (model.num_classes > 0):
  s(x, t, y) = (1 + w) s_θ(x, t, y) − w s_θ(x, t, ∅), ∅ = num_classes;
* inpainting / colourisation: the official PC inpainter and colouriser (`controllable.inpaint`/`colorize`)
  with the config's predictor, corrector, snr and steps (PC only: they project onto the known part after
  every PC update, which other samplers do not have).

Images in and out are in data space ([0, 1]); the score model sees them through the data scaler.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from score_sde_jax import controllable, models, sampling
from score_sde_jax.datasets import get_data_inverse_scaler, get_data_scaler

Array = jax.Array

MASK_PRESETS = ("half", "center", "left", "random")


# ---------------------------------------------------------------------------------------------------------
# programs


def guided_draw_program(config, sde, model, shape, *, classifier=None, guidance_scale: float = 1.0,
                        cfg_weight: Optional[float] = None, replicated=None, out_sharding=None) -> Callable:
  """The jitted (params, key, y) ↦ (samples in data space, nfe) drawing class y [B] with the config's
  sampler: classifier guidance when `classifier` = (classifier config, model, variables) is given,
  classifier-free guidance of a class-conditional model with weight `cfg_weight` (0: the plain
  conditional s_θ(x, t, y)).  Exactly one of the two."""
  from score_sde_jax import classifier as classifier_lib
  from score_sde_jax import sde as sde_lib
  if (classifier is None) == (cfg_weight is None):
    raise ValueError("pass a noise-conditional classifier (classifier guidance) or cfg_weight "
                     "(classifier-free guidance of a class-conditional model), not both or neither.")
  sample_fn = sampling.get_sampler(config, sde, shape)
  inverse_scaler = get_data_inverse_scaler(config)
  continuous = bool(config.training.continuous)
  num_classes = int(config.model.num_classes)
  if classifier is not None:
    c_config, c_model, c_vars = classifier
    c_sde = sde_lib.sde_from_config(c_config)
    log_prob = classifier_lib.log_prob_fn(c_sde, c_model, c_vars, c_config)

  def draw(params, key, y):
    if classifier is not None:
      score_fn = models.get_score_fn(sde, model, params, continuous=continuous, train=False)
      score_fn = controllable.classifier_guided_score_fn(score_fn, log_prob, y, scale=guidance_scale)
    else:
      def cond_score_fn(x, t, labels):
        return models.get_score_fn(sde, model, params, continuous=continuous, train=False,
                                   class_labels=labels)(x, t)
      score_fn = controllable.classifier_free_score_fn(cond_score_fn, y, cfg_weight, null_label=num_classes)
    x, nfe = sample_fn(key, score_fn)
    return inverse_scaler(x), nfe

  return _jit(draw, 3, replicated, out_sharding)


def inpaint_program(config, sde, model, *, colorize: bool = False, replicated=None,
                    out_sharding=None) -> Callable:
  """The jitted (params, key, images, mask) ↦ (inpainted images, nfe) in data space (mask: 1 = known),
  or with `colorize` (params, key, grey images [B, H, W, C]) ↦ (coloured images, nfe)."""
  s = config.sampling
  if str(s.method) != "pc":
    raise ValueError(f"inpainting and colourisation use the PC sampler (sampling.method='pc'); the config "
                     f"has {s.method!r}. Pass --set sampling.method=pc.")
  scaler, inverse_scaler = get_data_scaler(config), get_data_inverse_scaler(config)
  continuous = bool(config.training.continuous)
  kw = dict(predictor=str(s.predictor), corrector=str(s.corrector), snr=float(s.snr),
            n_steps=int(s.n_steps_each), probability_flow=bool(s.probability_flow), eps=float(s.eps),
            denoise=bool(s.noise_removal))

  def score_fn_of(params):
    return models.get_score_fn(sde, model, params, continuous=continuous, train=False)

  if colorize:
    def draw(params, key, grey):
      x, nfe = controllable.colorize(key, sde, score_fn_of(params), scaler(grey), **kw)
      return inverse_scaler(x), nfe
    return _jit(draw, 3, replicated, out_sharding)

  def draw(params, key, images, mask):
    x, nfe = controllable.inpaint(key, sde, score_fn_of(params), scaler(images), mask, **kw)
    # The known part is the input itself, bit for bit (not its round trip through the data scaler).
    return jnp.where(mask == 1, images, inverse_scaler(x)), nfe

  return _jit(draw, 4, replicated, out_sharding)


def _jit(fn, n_args: int, replicated, out_sharding):
  if replicated is None:
    return jax.jit(fn)
  batch = out_sharding if out_sharding is not None else replicated
  return jax.jit(fn, in_shardings=(replicated, replicated) + (batch,) * (n_args - 2),
                 out_shardings=(batch, replicated))


# ---------------------------------------------------------------------------------------------------------
# inputs


def class_labels(spec: str, num_classes: int, total: int) -> np.ndarray:
  """int32 [total]: `spec` = 'K' (every sample class K) or 'all' (classes 0 … C−1 in turn, total/C
  each, sorted so that a grid with total/C columns shows one row per class)."""
  spec = str(spec).strip().lower()
  if num_classes < 2:
    raise ValueError(f"class-conditional sampling needs a classifier or model with classes; it has "
                     f"{num_classes}.")
  if spec == "all":
    if total % num_classes:
      raise ValueError(f"--class_label all draws the same number per class: --num_samples {total} is not a "
                       f"multiple of the {num_classes} classes.")
    return np.repeat(np.arange(num_classes, dtype=np.int32), total // num_classes)
  try:
    k = int(spec)
  except ValueError:
    raise ValueError(f"--class_label must be a class index or 'all'; got {spec!r}.") from None
  if not 0 <= k < num_classes:
    raise ValueError(f"--class_label {k} is not a class: use 0 … {num_classes - 1} or 'all'.")
  return np.full((total,), k, np.int32)


def load_images(path: str, image_shape: Tuple[int, int, int]) -> np.ndarray:
  """float32 [N, H, W, C] in [0, 1] from an .npz (its 'images' or 'samples' array, or its only one;
  uint8 or float in [0, 1]) or a .png (one image, or a grid of tiles of the image size without padding,
  row-major)."""
  h, w, c = image_shape
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file; pass an .npz with an 'images' array [N, {h}, {w}, {c}] or a "
                     f".png of {h}x{w} images.")
  if path.lower().endswith(".npz"):
    with np.load(path) as f:
      names = [n for n in ("images", "samples", "image") if n in f.files] or list(f.files)
      if not names:
        raise ValueError(f"{path}: the .npz holds no array.")
      x = np.asarray(f[names[0]])
  elif path.lower().endswith(".png"):
    from PIL import Image
    with Image.open(path) as im:
      x = np.asarray(im.convert("L" if c == 1 else "RGB"))
    x = x[..., None] if x.ndim == 2 else x
    if x.shape[0] % h or x.shape[1] % w:
      raise ValueError(f"{path}: a {x.shape[1]}x{x.shape[0]} PNG is not a grid of {w}x{h} images.")
    x = x.reshape(x.shape[0] // h, h, x.shape[1] // w, w, -1).transpose(0, 2, 1, 3, 4).reshape(-1, h, w, x.shape[-1])
  else:
    raise ValueError(f"{path}: images must be .npz or .png.")
  if x.ndim == 3:
    x = x[..., None] if c == 1 and x.shape[1:] == (h, w) else x[None]
  if x.ndim != 4 or x.shape[1:3] != (h, w):
    raise ValueError(f"{path}: images of shape {x.shape}; this model takes [N, {h}, {w}, {c}].")
  x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
  if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
    raise ValueError(f"{path}: image values must lie in [0, 1] (or be uint8).")
  return x


def make_mask(spec: str, images_shape, key: Array) -> np.ndarray:
  """float32 mask of `images_shape` [N, H, W, C], 1 = known: a preset ('half': the upper half known, the
  lower half filled in; 'center': the central square of half the side filled in; 'left': the left half
  known; 'random': each pixel known with probability 1/2, drawn from `key`) or a file (.npz/.png, values
  in {0, 1}, one mask for all images or one per image)."""
  n, h, w, c = images_shape
  name = str(spec).strip().lower()
  mask = np.ones((n, h, w, c), np.float32)
  if name == "half":
    mask[:, h // 2:] = 0
  elif name == "left":
    mask[:, :, w // 2:] = 0
  elif name == "center":
    mask[:, h // 4:h // 4 + h // 2, w // 4:w // 4 + w // 2] = 0
  elif name == "random":
    mask = np.broadcast_to(np.asarray(jax.random.bernoulli(key, 0.5, (n, h, w, 1)), np.float32),
                           (n, h, w, c)).copy()
  else:
    if not os.path.isfile(str(spec)):
      raise ValueError(f"--mask {spec!r} is neither a preset ({', '.join(MASK_PRESETS)}) nor a file.")
    m = load_images(str(spec), (h, w, 1 if c == 1 else c))
    if not np.all((m == 0) | (m == 1)):
      raise ValueError(f"{spec}: a mask holds 0 (fill in) and 1 (known) only.")
    if m.shape[0] not in (1, n):
      raise ValueError(f"{spec}: {m.shape[0]} masks for {n} images; give one, or one per image.")
    mask = np.broadcast_to(m if m.shape[-1] == c else m[..., :1], (n, h, w, c)).astype(np.float32)
  return mask


def side_by_side(*rows: np.ndarray) -> np.ndarray:
  """The images of each row set [N, H, W, C] interleaved into one [len(rows)·N, H, W, C] batch whose grid
  with len(rows) columns shows each example's input, mask and result next to each other."""
  return np.stack(rows, axis=1).reshape((-1,) + rows[0].shape[1:])


def grey_of(images: np.ndarray) -> np.ndarray:
  """The grey images the colouriser takes (`controllable.grey`, the channel mean), repeated over the
  channels so that they sit beside the coloured results in a grid."""
  return np.repeat(np.asarray(controllable.grey(jnp.asarray(images))), images.shape[-1], axis=-1)

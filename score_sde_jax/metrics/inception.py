"""The FID Inception-v3 of `pytorch-fid` in Flax: pool_3 features (2048) and logits (1008).

This is the network that `pytorch-fid` (and, through its ported weights, TensorFlow's original FID code
and tfgan's Inception) uses, not torchvision's Inception-v3.  It differs from torchvision's in:

- `Mixed_5b/5c/5d` (FIDInceptionA), `Mixed_6b..6e` (FIDInceptionC), `Mixed_7b` (FIDInceptionE_1): the
  branch-pool 3x3/stride-1/pad-1 average pool does not count the zero padding (TensorFlow's
  `avg_pool` with SAME padding: `count_include_pad=False`);
- `Mixed_7c` (FIDInceptionE_2): that branch-pool is a 3x3/stride-1/pad-1 *max* pool;
- the classifier `fc` has 1008 outputs (TensorFlow's 2015 Inception graph: 1000 ImageNet classes plus 8
  unused ones), and there is no auxiliary classifier.

Every convolution is torchvision's `BasicConv2d`: conv without bias, BatchNorm (eps=1e-3) in inference
mode with the checkpoint's running statistics, ReLU.

Public interface:

- `load_fid_inception(path=None)`: the Flax variables from pytorch-fid's weight file
  `pt_inception-2015-12-05-6726825d.pth`, read without torch and without running code from the file by
  `score_sde_jax.torch_pickle` (zip format, torch >= 1.6) or `score_sde_jax.torch_pickle_legacy` (the older
  format, which that file, released in 2019, is expected to be in; both share one allow-list).  Without
  `path`: `$SCORE_SDE_INCEPTION` (the file, or a directory holding it), else
  `~/.cache/score_sde_jax/<file>`.  A missing file raises `InceptionWeightsNotFound` (a FileNotFoundError)
  whose one-line message says where to download it and where to put it.
- `fid_inception_variables(state_dict)`: the same conversion for an in-memory state dict (names as in
  the .pth, values numpy arrays): conv kernels OIHW -> HWIO, `fc.weight` transposed, BatchNorm
  weight/bias -> params scale/bias, running_mean/var -> batch_stats mean/var.
- `inception_features(variables, images)`: NHWC float images in [0, 1] of any size (1 or 3 channels) ->
  {"pool_3": (B, 2048), "logits": (B, 1008)}, float32.  As pytorch-fid's `InceptionV3`: bilinear resize to
  299x299 (`F.interpolate(mode='bilinear', align_corners=False)`, no antialiasing), then `2x - 1`.

Equality with pytorch-fid is tested on random weights (tests/test_inception.py, fixture written by
tests/data/make_inception_fixture.py with torch and pytorch-fid): relative error <= 1e-4.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FID_WEIGHTS_URL", "FID_WEIGHTS_FILE", "INCEPTION_ENV", "InceptionWeightsNotFound", "FIDInceptionV3",
    "fid_inception_variables", "load_fid_inception", "default_weights_path", "inception_features",
    "resize_for_inception",
]

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "SCORE_SDE_INCEPTION"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "score_sde_jax")
INPUT_SIZE = 299
BN_EPS = 1e-3  # torchvision's BasicConv2d: nn.BatchNorm2d(out_channels, eps=0.001)


class InceptionWeightsNotFound(FileNotFoundError):
  """pytorch-fid's Inception weight file is not where it was looked for (the message says where to get it)."""


# ---------------------------------------------------------------------------------------------------
# The network (module and parameter names are those of the torch state dict)
# ---------------------------------------------------------------------------------------------------
def _pair(v) -> Tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: conv (no bias) -> BatchNorm(eps=1e-3, running statistics) -> ReLU."""
  features: int
  kernel_size: Any
  stride: Any = 1
  padding: Any = 0
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x):
  # FID blocks: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x):
  # FIDInceptionE_2: F.max_pool2d(x, 3, stride=1, padding=1) (padding is -inf, as in torch).
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")  # torch MaxPool2d(3, 2), ceil_mode=False


class FIDInceptionA(nn.Module):
  pool_features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    C = functools.partial(BasicConv2d, precision=self.precision)
    b1 = C(64, 1, name="branch1x1")(x)
    b5 = C(48, 1, name="branch5x5_1")(x)
    b5 = C(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = C(64, 1, name="branch3x3dbl_1")(x)
    b3 = C(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = C(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = C(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    C = functools.partial(BasicConv2d, precision=self.precision)
    b3 = C(384, 3, stride=2, name="branch3x3")(x)
    bd = C(64, 1, name="branch3x3dbl_1")(x)
    bd = C(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = C(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
  channels_7x7: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    C = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    b1 = C(192, 1, name="branch1x1")(x)
    b7 = C(c7, 1, name="branch7x7_1")(x)
    b7 = C(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = C(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = C(c7, 1, name="branch7x7dbl_1")(x)
    bd = C(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = C(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = C(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = C(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = C(192, 1, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    C = functools.partial(BasicConv2d, precision=self.precision)
    b3 = C(192, 1, name="branch3x3_1")(x)
    b3 = C(320, 3, stride=2, name="branch3x3_2")(b3)
    b7 = C(192, 1, name="branch7x7x3_1")(x)
    b7 = C(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = C(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = C(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """FIDInceptionE_1 (`max_pool=False`: average pool without padding) or FIDInceptionE_2 (max pool)."""
  max_pool: bool
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    C = functools.partial(BasicConv2d, precision=self.precision)
    b1 = C(320, 1, name="branch1x1")(x)
    b3 = C(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([C(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          C(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = C(448, 1, name="branch3x3dbl_1")(x)
    bd = C(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([C(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          C(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _max_pool_3x3_same(x) if self.max_pool else _avg_pool_3x3_same(x)
    bp = C(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's `fid_inception_v3()` on NHWC inputs already resized to 299x299 and scaled to [-1, 1].

  Returns {"pool_3": (B, 2048), "logits": (B, 1008)}: the final global average pool (pytorch-fid's
  `InceptionV3` block 3) and `fc` of it (torchvision's `Inception3.forward` in eval mode: dropout is the
  identity).  `precision` is passed to every conv and the fc (`inception_features` uses HIGHEST).
  """
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    p = self.precision
    C = functools.partial(BasicConv2d, precision=p)
    x = C(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = C(32, 3, name="Conv2d_2a_3x3")(x)
    x = C(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = C(80, 1, name="Conv2d_3b_1x1")(x)
    x = C(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = FIDInceptionA(32, p, name="Mixed_5b")(x)
    x = FIDInceptionA(64, p, name="Mixed_5c")(x)
    x = FIDInceptionA(64, p, name="Mixed_5d")(x)
    x = InceptionB(p, name="Mixed_6a")(x)
    x = FIDInceptionC(128, p, name="Mixed_6b")(x)
    x = FIDInceptionC(160, p, name="Mixed_6c")(x)
    x = FIDInceptionC(160, p, name="Mixed_6d")(x)
    x = FIDInceptionC(192, p, name="Mixed_6e")(x)
    x = InceptionD(p, name="Mixed_7a")(x)
    x = FIDInceptionE(False, p, name="Mixed_7b")(x)
    x = FIDInceptionE(True, p, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1))
    logits = nn.Dense(1008, precision=p, name="fc")(pool)
    return {"pool_3": pool, "logits": logits}


# ---------------------------------------------------------------------------------------------------
# torch state dict -> Flax variables
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _expected_shapes() -> Dict[str, Dict[Tuple[str, ...], Tuple[int, ...]]]:
  """{collection: {path: shape}} of the Flax variables, from an abstract init (no compute)."""
  shapes = jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.PRNGKey(0),
                                                         jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))))
  out = {}
  for col, tree in shapes.items():
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    out[col] = {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}
  return out


# torch leaf name -> (Flax collection, Flax leaf name, conversion)
_LEAVES = {
    ("conv", "weight"): ("params", "kernel", lambda w: np.transpose(w, (2, 3, 1, 0))),  # OIHW -> HWIO
    ("bn", "weight"): ("params", "scale", None),
    ("bn", "bias"): ("params", "bias", None),
    ("bn", "running_mean"): ("batch_stats", "mean", None),
    ("bn", "running_var"): ("batch_stats", "var", None),
    ("fc", "weight"): ("params", "kernel", lambda w: np.transpose(w)),  # (out, in) -> (in, out)
    ("fc", "bias"): ("params", "bias", None),
}


def fid_inception_variables(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """Flax variables of `FIDInceptionV3` from pytorch-fid's state dict (name -> array).

  Conv kernels OIHW -> HWIO, `fc.weight` (1008, 2048) -> kernel (2048, 1008), BatchNorm `weight`/`bias`
  -> params `scale`/`bias`, `running_mean`/`running_var` -> batch_stats `mean`/`var` (used with eps=1e-3).
  `num_batches_tracked` entries are ignored.  Every other name must map to a variable of the network with
  the right shape, and every variable must be given: otherwise ValueError naming the first offender.
  Values are float32 numpy arrays.
  """
  expected = _expected_shapes()
  out: Dict[str, Dict[Tuple[str, ...], np.ndarray]] = {col: {} for col in expected}
  for name in sorted(state_dict):
    parts = tuple(name.split("."))
    if parts[-1] == "num_batches_tracked":
      continue
    leaf = (parts[-2], parts[-1]) if len(parts) >= 2 else None
    if leaf not in _LEAVES or (leaf[0] == "fc") != (len(parts) == 2):
      raise ValueError(f"fid_inception_variables: unexpected entry {name!r} in the state dict (not a "
                       "parameter of pytorch-fid's FID Inception-v3)")
    col, flax_leaf, convert = _LEAVES[leaf]
    path = parts[:-1] + (flax_leaf,)
    value = np.asarray(state_dict[name])
    if not np.issubdtype(value.dtype, np.floating):
      raise ValueError(f"fid_inception_variables: {name!r} has dtype {value.dtype}, expected floating point")
    value = value.astype(np.float32)
    if convert is not None:
      value = np.ascontiguousarray(convert(value))
    if path not in expected[col]:
      raise ValueError(f"fid_inception_variables: unexpected entry {name!r} in the state dict (not a "
                       "parameter of pytorch-fid's FID Inception-v3)")
    if value.shape != expected[col][path]:
      raise ValueError(f"fid_inception_variables: {name!r} has shape {np.asarray(state_dict[name]).shape}; "
                       f"the FID Inception-v3 needs {expected[col][path]} after conversion, got {value.shape}")
    out[col][path] = value
  for col, shapes in expected.items():
    missing = sorted(set(shapes) - set(out[col]))
    if missing:
      raise ValueError(f"fid_inception_variables: the state dict lacks {len(missing)} entries of the FID "
                       f"Inception-v3, e.g. {'.'.join(missing[0][:-1])} ({col} {missing[0][-1]})")
  return {col: _unflatten(flat) for col, flat in out.items()}


def _unflatten(flat: Mapping[Tuple[str, ...], Any]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


def default_weights_path() -> str:
  """Where `load_fid_inception()` looks: $SCORE_SDE_INCEPTION (a file, or a directory holding
  `pt_inception-2015-12-05-6726825d.pth`), else ~/.cache/score_sde_jax/pt_inception-2015-12-05-6726825d.pth."""
  env = os.environ.get(INCEPTION_ENV, "").strip()
  if env:
    env = os.path.expanduser(env)
    return os.path.join(env, FID_WEIGHTS_FILE) if os.path.isdir(env) else env
  return os.path.join(os.path.expanduser(DEFAULT_CACHE_DIR), FID_WEIGHTS_FILE)


def load_fid_inception(path: Optional[str] = None) -> Dict[str, Any]:
  """Flax variables of `FIDInceptionV3` from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`.

  `path`: the file (or a directory holding it); default `default_weights_path()`.  The file is read by
  `torch_pickle_legacy.load_any`: `torch_pickle` for the zip format, the legacy (torch < 1.6) reader
  otherwise, both through `torch_pickle`'s allow-list (no torch, no code from the file runs).  Raises
  `InceptionWeightsNotFound` (FileNotFoundError) when it is missing, ValueError (naming the path) when it is
  not a readable torch checkpoint of this network.
  """
  from score_sde_jax import torch_pickle_legacy

  if path is None:
    path = default_weights_path()
  else:
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
      path = os.path.join(path, FID_WEIGHTS_FILE)
  if not os.path.isfile(path):
    raise InceptionWeightsNotFound(
        f"FID Inception weights not found at {path}: download {FID_WEIGHTS_URL} and put it there, or in "
        f"{os.path.join(DEFAULT_CACHE_DIR, FID_WEIGHTS_FILE)}, or point ${INCEPTION_ENV} at the file.")
  state_dict = torch_pickle_legacy.load_any(path)
  if isinstance(state_dict, Mapping) and "state_dict" in state_dict and isinstance(state_dict["state_dict"],
                                                                                   Mapping):
    state_dict = state_dict["state_dict"]
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state_dict).__name__}")
  try:
    return fid_inception_variables(state_dict)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("size",))
def resize_for_inception(images, size: int = INPUT_SIZE):
  """pytorch-fid's input transform: bilinear resize to size x size, then 2x - 1 (NHWC float32).

  pytorch-fid resizes with `F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)`: half-
  pixel centres, source coordinates clamped at the border, no antialiasing when downsampling.
  `jax.image.resize(..., method='linear', antialias=False)` is the same map: half-pixel centres, a triangle
  kernel of radius one input pixel, and weights renormalised over in-range pixels at the border, which
  equals torch's clamping (only one in-range neighbour has non-zero weight there).  Checked against torch
  on up-, down- and mixed resizes (32x32, 64x48, 341x320, 500x200, 7x1000 -> 299x299): equal to 2e-7,
  float32 rounding.  `antialias=True` (jax's default) differs when downsampling (by up to 0.5), so it
  must stay False; no hand-written resize is needed.
  """
  images = jnp.asarray(images, jnp.float32)
  b, h, w, c = images.shape
  if (h, w) != (size, size):
    images = jax.image.resize(images, (b, size, size, c), method="linear", antialias=False,
                              precision=jax.lax.Precision.HIGHEST)
  return 2.0 * images - 1.0


@functools.partial(jax.jit, static_argnames=("precision",))
def _network(variables, x, precision=jax.lax.Precision.HIGHEST):
  return FIDInceptionV3(precision=precision).apply(variables, x)


def inception_features(variables, images, *, precision=jax.lax.Precision.HIGHEST) -> Dict[str, jax.Array]:
  """{"pool_3": (B, 2048), "logits": (B, 1008)} of NHWC float images in [0, 1] (any H, W; 1 or 3 channels,
  one channel repeated to RGB as pytorch-fid's loader converts grey images), as pytorch-fid computes them.

  `precision` (default HIGHEST: full float32 convs even where the backend would use TF32/bf16 passes)
  goes to every conv and the fc.  One compiled program per input shape; feed fixed-size batches.
  """
  images = jnp.asarray(images)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"inception_features expects float images in [0, 1], got dtype {images.dtype} "
                     "(divide uint8 images by 255)")
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"inception_features expects NHWC images with 1 or 3 channels, got shape {images.shape}")
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  return _network(variables, resize_for_inception(images), precision=precision)

"""The RefineNet blocks of NCSN / NCSNv2 (NHWC, Flax linen).  Sub-module names mirror the PyTorch port's
attribute names, so that its state dicts map onto them name by name (see `convert.py`)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde_jax.models.layers import Dtype, ncsn_conv

class ConvMeanPool(nn.Module):
  """Convolution ('SAME'), then 2x2 mean pooling."""

  output_dim: int
  kernel_size: int = 3
  biases: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = ncsn_conv(x, self.output_dim, kernel=self.kernel_size, bias=self.biases, dtype=self.dtype,
                  name="conv")
    return (h[:, ::2, ::2] + h[:, 1::2, ::2] + h[:, ::2, 1::2] + h[:, 1::2, 1::2]) / 4.0


class CRPBlock(nn.Module):
  """Chained residual pooling (max pool 5x5)."""

  features: int
  n_stages: int
  act: Callable = nn.relu
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = self.act(x)
    path = x
    for i in range(self.n_stages):
      path = nn.max_pool(path, (5, 5), strides=(1, 1), padding="SAME")
      path = ncsn_conv(path, self.features, bias=False, dtype=self.dtype, name=f"convs_{i}")
      x = path + x
    return x


class CondCRPBlock(nn.Module):
  """Noise-conditional chained residual pooling (average pool 5x5)."""

  features: int
  n_stages: int
  normalizer: Callable
  act: Callable = nn.relu
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, y):
    x = self.act(x)
    path = x
    for i in range(self.n_stages):
      path = self.normalizer(name=f"norms_{i}")(path, y)
      path = nn.avg_pool(path, (5, 5), strides=(1, 1), padding="SAME")
      path = ncsn_conv(path, self.features, bias=False, dtype=self.dtype, name=f"convs_{i}")
      x = path + x
    return x


class RCUBlock(nn.Module):
  """Residual convolution units."""

  features: int
  n_blocks: int
  n_stages: int
  act: Callable = nn.relu
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.n_blocks):
      residual = x
      for j in range(self.n_stages):
        x = self.act(x)
        x = ncsn_conv(x, self.features, bias=False, dtype=self.dtype, name=f"{i + 1}_{j + 1}_conv")
      x = x + residual
    return x


class CondRCUBlock(nn.Module):
  features: int
  n_blocks: int
  n_stages: int
  normalizer: Callable
  act: Callable = nn.relu
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, y):
    for i in range(self.n_blocks):
      residual = x
      for j in range(self.n_stages):
        x = self.normalizer(name=f"{i + 1}_{j + 1}_norm")(x, y)
        x = self.act(x)
        x = ncsn_conv(x, self.features, bias=False, dtype=self.dtype, name=f"{i + 1}_{j + 1}_conv")
      x = x + residual
    return x


def _resize(h, shape, interpolation):
  if tuple(h.shape[1:3]) == tuple(shape):
    return h
  method = {"bilinear": "bilinear", "nearest_neighbor": "nearest"}.get(interpolation)
  if method is None:
    raise ValueError(f"Unknown model.interpolation {interpolation!r}; allowed: 'bilinear', "
                     f"'nearest_neighbor'.")
  return jax.image.resize(h, (h.shape[0], *shape, h.shape[-1]), method).astype(h.dtype)


class MSFBlock(nn.Module):
  """Multi-resolution fusion: convolve each input, resize to `shape`, sum."""

  shape: Sequence[int]
  features: int
  interpolation: str = "bilinear"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs):
    sums = 0.0
    for i, x in enumerate(xs):
      h = ncsn_conv(x, self.features, bias=True, dtype=self.dtype, name=f"convs_{i}")
      sums = sums + _resize(h, self.shape, self.interpolation)
    return sums


class CondMSFBlock(nn.Module):
  shape: Sequence[int]
  features: int
  normalizer: Callable
  interpolation: str = "bilinear"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs, y):
    sums = 0.0
    for i, x in enumerate(xs):
      h = self.normalizer(name=f"norms_{i}")(x, y)
      h = ncsn_conv(h, self.features, bias=True, dtype=self.dtype, name=f"convs_{i}")
      sums = sums + _resize(h, self.shape, self.interpolation)
    return sums


class RefineBlock(nn.Module):
  """RefineNet block of NCSNv2."""

  output_shape: Sequence[int]
  features: int
  act: Callable = nn.relu
  interpolation: str = "bilinear"
  start: bool = False
  end: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs):
    hs = [RCUBlock(x.shape[-1], 2, 2, self.act, dtype=self.dtype, name=f"adapt_convs_{i}")(x)
          for i, x in enumerate(xs)]
    if not self.start:
      h = MSFBlock(self.output_shape, self.features, self.interpolation, dtype=self.dtype,
                   name="msf")(hs)
    else:
      h = hs[0]
    h = CRPBlock(self.features, 2, self.act, dtype=self.dtype, name="crp")(h)
    h = RCUBlock(self.features, 3 if self.end else 1, 2, self.act, dtype=self.dtype,
                 name="output_convs")(h)
    return h


class CondRefineBlock(nn.Module):
  """Noise-conditional RefineNet block of NCSN (v1)."""

  output_shape: Sequence[int]
  features: int
  normalizer: Callable
  act: Callable = nn.relu
  interpolation: str = "bilinear"
  start: bool = False
  end: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs, y):
    hs = [CondRCUBlock(x.shape[-1], 2, 2, self.normalizer, self.act, dtype=self.dtype,
                       name=f"adapt_convs_{i}")(x, y) for i, x in enumerate(xs)]
    if not self.start:
      h = CondMSFBlock(self.output_shape, self.features, self.normalizer, self.interpolation,
                       dtype=self.dtype, name="msf")(hs, y)
    else:
      h = hs[0]
    h = CondCRPBlock(self.features, 2, self.normalizer, self.act, dtype=self.dtype, name="crp")(h, y)
    h = CondRCUBlock(self.features, 3 if self.end else 1, 2, self.normalizer, self.act,
                     dtype=self.dtype, name="output_convs")(h, y)
    return h


class ResidualBlock(nn.Module):
  """Pre-activation residual block of the NCSNv2 ResNet backbone.  With `conditional`, the
  normalisations take the noise-level index `y` (NCSN v1)."""

  output_dim: int
  normalization: Callable
  resample: Optional[str] = None
  act: Callable = nn.elu
  dilation: int = 1
  conditional: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, y=None):
    def norm(name, h):
      m = self.normalization(name=name)
      return m(h, y) if self.conditional else m(h)

    in_dim = x.shape[-1]
    d = self.dilation
    h = self.act(norm("normalize1", x))
    if self.resample == "down":
      h = ncsn_conv(h, in_dim, dilation=d, dtype=self.dtype, name="conv1")
      h = self.act(norm("normalize2", h))
      if d > 1:
        h = ncsn_conv(h, self.output_dim, dilation=d, dtype=self.dtype, name="conv2")
        shortcut = ncsn_conv(x, self.output_dim, dilation=d, dtype=self.dtype, name="shortcut")
      else:
        h = ConvMeanPool(self.output_dim, dtype=self.dtype, name="conv2")(h)
        shortcut = ConvMeanPool(self.output_dim, kernel_size=1, dtype=self.dtype, name="shortcut")(x)
    elif self.resample is None:
      if self.output_dim == in_dim:
        shortcut = x
      elif d > 1:
        shortcut = ncsn_conv(x, self.output_dim, dilation=d, dtype=self.dtype, name="shortcut")
      else:
        shortcut = ncsn_conv(x, self.output_dim, kernel=1, dtype=self.dtype, name="shortcut")
      h = ncsn_conv(h, self.output_dim, dilation=d, dtype=self.dtype, name="conv1")
      h = self.act(norm("normalize2", h))
      h = ncsn_conv(h, self.output_dim, dilation=d, dtype=self.dtype, name="conv2")
    else:
      raise ValueError(f"ResidualBlock: resample must be None or 'down'; got {self.resample!r}.")
    return h + shortcut

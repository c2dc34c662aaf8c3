"""Layers of NCSN++ / DDPM++ (NHWC, Flax linen): skip combination, attention with skip rescaling,
FIR or nearest/average re-sampling, and the DDPM++ / BigGAN residual blocks.

Sub-module names are those of the official implementation (GroupNorm_0, Conv_0, Dense_0, Conv2d_0, NIN_0,
…), so PyTorch state dicts convert name by name (see `convert.py`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from score_sde_jax.models import up_or_down_sampling as uds
from score_sde_jax.models.layers import (NIN, ddpm_conv1x1, ddpm_conv3x3, default_init, group_norm,
                                         spatial_attention)

Dtype = Any
_SQRT2 = float(np.sqrt(2.0))


class Combine(nn.Module):
  """Combines a pyramid input x with features y: 1x1 conv of x to y's channels, then 'cat' or 'sum'."""

  method: str = "cat"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, y):
    h = ddpm_conv1x1(x, y.shape[-1], dtype=self.dtype)
    if self.method == "cat":
      return jnp.concatenate([h, y], axis=-1)
    if self.method == "sum":
      return h + y
    raise ValueError(f"Unknown model.progressive_combine {self.method!r}; allowed: 'cat', 'sum'.")


class AttnBlockpp(nn.Module):
  """Channel-wise self-attention over all positions, with optional 1/√2 skip rescaling."""

  skip_rescale: bool = False
  init_scale: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = group_norm(x, dtype=self.dtype)
    q = NIN(c, dtype=self.dtype)(h)
    k = NIN(c, dtype=self.dtype)(h)
    v = NIN(c, dtype=self.dtype)(h)
    h = spatial_attention(q, k, v, self.dtype)
    h = NIN(c, init_scale=self.init_scale, dtype=self.dtype)(h)
    if not self.skip_rescale:
      return x + h
    return (x + h) / _SQRT2


class Upsample(nn.Module):
  """×2 up-sampling: nearest (+ 3x3 conv) without FIR; FIR filter (or fused FIR up-conv) with FIR."""

  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out_ch = self.out_ch if self.out_ch else x.shape[-1]
    if not self.fir:
      h = uds.naive_upsample_2d(x, 2)
      if self.with_conv:
        h = ddpm_conv3x3(h, out_ch, dtype=self.dtype)
    else:
      if not self.with_conv:
        h = uds.upsample_2d(x, self.fir_kernel, factor=2)
      else:
        h = uds.Conv2d(out_ch, kernel=3, up=True, resample_kernel=tuple(self.fir_kernel),
                       use_bias=True, kernel_init=default_init(), dtype=self.dtype)(x)
    return h


class Downsample(nn.Module):
  """/2 down-sampling: stride-2 3x3 conv or 2x2 average without FIR; FIR filter (or fused FIR conv)
  with FIR."""

  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out_ch = self.out_ch if self.out_ch else x.shape[-1]
    if not self.fir:
      if self.with_conv:
        x = ddpm_conv3x3(x, out_ch, stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype)
      else:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    else:
      if not self.with_conv:
        x = uds.downsample_2d(x, self.fir_kernel, factor=2)
      else:
        x = uds.Conv2d(out_ch, kernel=3, down=True, resample_kernel=tuple(self.fir_kernel),
                       use_bias=True, kernel_init=default_init(), dtype=self.dtype)(x)
    return x


class PyramidUpsample(Upsample):
  """The parameter-free ×2 resampler of the output pyramid (`progressive='output_skip'`).  The official
  JAX network names it `Upsample_k` and counts it like any other; the PyTorch port holds it outside its
  `all_modules` list (`pyramid_upsample`), so the converter leaves it out of the module index."""


class PyramidDownsample(Downsample):
  """The parameter-free /2 resampler of the input pyramid (`progressive_input='input_skip'`): named
  `Downsample_k` as in the official JAX network, outside the PyTorch port's `all_modules`."""


class ResnetBlockDDPMpp(nn.Module):
  """DDPM residual block with min(C/4, 32)-group GroupNorm and optional skip rescaling."""

  act: Callable
  out_ch: Optional[int] = None
  conv_shortcut: bool = False
  dropout: float = 0.1
  skip_rescale: bool = False
  init_scale: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None, train: bool = True):
    c = x.shape[-1]
    out_ch = self.out_ch if self.out_ch else c
    h = self.act(group_norm(x, dtype=self.dtype))
    h = ddpm_conv3x3(h, out_ch, dtype=self.dtype)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=self.dtype,
                       param_dtype=jnp.float32)(self.act(temb))[:, None, None, :]
    h = self.act(group_norm(h, dtype=self.dtype))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = ddpm_conv3x3(h, out_ch, init_scale=self.init_scale, dtype=self.dtype)
    if c != out_ch:
      if self.conv_shortcut:
        x = ddpm_conv3x3(x, out_ch, dtype=self.dtype)
      else:
        x = NIN(out_ch, dtype=self.dtype)(x)
    if not self.skip_rescale:
      return x + h
    return (x + h) / _SQRT2


class ResnetBlockBigGANpp(nn.Module):
  """BigGAN-style residual block with optional up/down-sampling inside (FIR or naive)."""

  act: Callable
  up: bool = False
  down: bool = False
  out_ch: Optional[int] = None
  dropout: float = 0.1
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  skip_rescale: bool = True
  init_scale: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None, train: bool = True):
    c = x.shape[-1]
    out_ch = self.out_ch if self.out_ch else c
    h = self.act(group_norm(x, dtype=self.dtype))
    if self.up:
      if self.fir:
        h = uds.upsample_2d(h, self.fir_kernel, factor=2)
        x = uds.upsample_2d(x, self.fir_kernel, factor=2)
      else:
        h = uds.naive_upsample_2d(h, factor=2)
        x = uds.naive_upsample_2d(x, factor=2)
    elif self.down:
      if self.fir:
        h = uds.downsample_2d(h, self.fir_kernel, factor=2)
        x = uds.downsample_2d(x, self.fir_kernel, factor=2)
      else:
        h = uds.naive_downsample_2d(h, factor=2)
        x = uds.naive_downsample_2d(x, factor=2)
    h = ddpm_conv3x3(h, out_ch, dtype=self.dtype)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=self.dtype,
                       param_dtype=jnp.float32)(self.act(temb))[:, None, None, :]
    h = self.act(group_norm(h, dtype=self.dtype))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = ddpm_conv3x3(h, out_ch, init_scale=self.init_scale, dtype=self.dtype)
    if c != out_ch or self.up or self.down:
      x = ddpm_conv1x1(x, out_ch, dtype=self.dtype)
    if not self.skip_rescale:
      return x + h
    return (x + h) / _SQRT2

"""Common layers of the score networks (NHWC, Flax linen): initialisers, convolution helpers, DDPM
blocks (residual block, channel self-attention, re-sampling).  The RefineNet blocks of NCSN/NCSNv2 are in
`refinenet.py`.

Module and parameter names follow the official code (Conv_0, GroupNorm_0, Dense_0, NIN_0 …) so that a
PyTorch state dict maps onto them name by name (see `convert.py`).  Every module takes a `dtype` for
computation; parameters stay float32.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde_jax.models.embeddings import get_timestep_embedding  # noqa: F401  (re-export)
from score_sde_jax.models.up_or_down_sampling import naive_upsample_2d

Dtype = Any


# --------------------------------------------------------------------------------------------------
# activations, initialisers, sigmas
# --------------------------------------------------------------------------------------------------
def get_act(config) -> Callable:
  """The nonlinearity named by `config.model.nonlinearity`."""
  name = str(config.model.nonlinearity).lower()
  acts = {"elu": nn.elu, "relu": nn.relu, "lrelu": functools.partial(nn.leaky_relu, negative_slope=0.2),
          "swish": nn.swish, "silu": nn.swish}
  if name not in acts:
    raise ValueError(f"Unknown model.nonlinearity {name!r}; allowed: {sorted(acts)}.")
  return acts[name]


def default_init(scale: float = 1.0):
  """DDPM initialisation: variance scaling (fan_avg, uniform); a requested scale of 0 becomes 1e-10."""
  scale = 1e-10 if scale == 0 else scale
  return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def get_sigmas(config) -> np.ndarray:
  """The geometric noise ladder σ_max … σ_min (num_scales values, float32), as the official code."""
  m = config.model
  return np.exp(np.linspace(np.log(float(m.sigma_max)), np.log(float(m.sigma_min)),
                            int(m.num_scales))).astype(np.float32)


def get_dtype(config) -> Dtype:
  name = str(config.model.dtype).lower()
  table = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}
  if name not in table:
    raise ValueError(f"Unknown model.dtype {name!r}; allowed: 'float32', 'bfloat16', 'float16'.")
  return table[name]


def check_image_input(config, x, num_downsamples: int):
  """Clear errors for inputs the network cannot take."""
  if x.ndim != 4:
    raise ValueError(f"image models take NHWC input of rank 4; got shape {x.shape}.")
  channels = int(config.data.num_channels)
  if x.shape[-1] != channels:
    raise ValueError(f"input has {x.shape[-1]} channels but config.data.num_channels = {channels} "
                     f"(inputs are NHWC).")
  factor = 2 ** num_downsamples
  size = int(config.data.image_size)
  if x.shape[1] != size or x.shape[2] != size:
    raise ValueError(f"input is {x.shape[1]}x{x.shape[2]} but config.data.image_size = {size}.")
  if size % factor != 0:
    raise ValueError(f"config.data.image_size = {size} is not divisible by {factor} = 2^{num_downsamples}"
                     f" (the network down-samples {num_downsamples} times); change the image size or "
                     f"model.ch_mult.")


# --------------------------------------------------------------------------------------------------
# convolution helpers (each creates one nn.Conv, auto-named Conv_k by Flax)
# --------------------------------------------------------------------------------------------------
def ddpm_conv1x1(x, out_planes, stride=1, bias=True, init_scale=1.0, dtype=jnp.float32, name=None):
  return nn.Conv(out_planes, (1, 1), strides=(stride, stride), padding="SAME", use_bias=bias,
                 kernel_init=default_init(init_scale), bias_init=nn.initializers.zeros,
                 dtype=dtype, param_dtype=jnp.float32, name=name)(x)


def ddpm_conv3x3(x, out_planes, stride=1, bias=True, dilation=1, init_scale=1.0, padding="SAME",
                 dtype=jnp.float32, name=None):
  return nn.Conv(out_planes, (3, 3), strides=(stride, stride), padding=padding, use_bias=bias,
                 kernel_dilation=(dilation, dilation), kernel_init=default_init(init_scale),
                 bias_init=nn.initializers.zeros, dtype=dtype, param_dtype=jnp.float32, name=name)(x)


def _ncsn_kernel_init(init_scale):
  init_scale = 1e-10 if init_scale == 0 else init_scale
  return nn.initializers.variance_scaling(init_scale / 3.0, "fan_in", "uniform")


def ncsn_conv(x, out_planes, kernel=3, stride=1, bias=True, dilation=1, init_scale=1.0,
              dtype=jnp.float32, name=None):
  """Convolution with PyTorch's default initialisation (NCSN/NCSNv2), 'SAME' padding."""
  kinit = _ncsn_kernel_init(init_scale)
  kshape = (kernel, kernel, x.shape[-1], out_planes)

  def bias_init(key, shape, dtype=jnp.float32):
    return kinit(key, kshape, dtype)[0, 0, 0, :]

  return nn.Conv(out_planes, (kernel, kernel), strides=(stride, stride), padding="SAME",
                 use_bias=bias, kernel_dilation=(dilation, dilation), kernel_init=kinit,
                 bias_init=bias_init, dtype=dtype, param_dtype=jnp.float32, name=name)(x)


def group_norm(x, num_groups=None, dtype=jnp.float32, name=None):
  """GroupNorm with min(C // 4, 32) groups (NCSN++) unless given, eps 1e-6."""
  c = x.shape[-1]
  g = min(c // 4, 32) if num_groups is None else num_groups
  if g < 1 or c % g != 0:
    raise ValueError(f"GroupNorm: {c} channels cannot be split into {g} groups; use a width (model.nf "
                     f"× ch_mult) that is a multiple of {g if g >= 1 else 4}.")
  return nn.GroupNorm(num_groups=g, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                      name=name)(x)


class NIN(nn.Module):
  """Per-pixel linear map ('network in network'): y = x W + b, W of shape (in, out)."""

  num_units: int
  init_scale: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_dim = x.shape[-1]
    W = self.param("W", default_init(scale=self.init_scale), (in_dim, self.num_units), jnp.float32)
    b = self.param("b", nn.initializers.zeros, (self.num_units,), jnp.float32)
    y = jnp.einsum("...c,cd->...d", x.astype(self.dtype), W.astype(self.dtype))
    return y + b.astype(self.dtype)


def spatial_attention(q, k, v, dtype):
  """softmax(q·k / √C) v over all H·W positions; q, k, v: [B, H, W, C]; softmax in float32."""
  b, h, w, c = q.shape
  q = q.reshape(b, h * w, c)
  k = k.reshape(b, h * w, c)
  v = v.reshape(b, h * w, c)
  logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  out = jnp.einsum("bij,bjc->bic", weights, v.astype(dtype))
  return out.reshape(b, h, w, c)


class AttnBlock(nn.Module):
  """DDPM channel self-attention block (GroupNorm with 32 groups, no skip rescale)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = group_norm(x, num_groups=32, dtype=self.dtype)
    q = NIN(c, dtype=self.dtype)(h)
    k = NIN(c, dtype=self.dtype)(h)
    v = NIN(c, dtype=self.dtype)(h)
    h = spatial_attention(q, k, v, self.dtype)
    h = NIN(c, init_scale=0.0, dtype=self.dtype)(h)
    return x + h


class Upsample(nn.Module):
  """DDPM up-sampling: nearest neighbour ×2, then an optional 3x3 convolution."""

  with_conv: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = naive_upsample_2d(x, 2)
    if self.with_conv:
      h = ddpm_conv3x3(h, x.shape[-1], dtype=self.dtype)
    return h


class Downsample(nn.Module):
  """DDPM down-sampling: stride-2 3x3 convolution (pad bottom/right by 1), or 2x2 average pooling."""

  with_conv: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.with_conv:
      return ddpm_conv3x3(x, x.shape[-1], stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype)
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class ResnetBlockDDPM(nn.Module):
  """The residual block of DDPM (GroupNorm with 32 groups)."""

  act: Callable
  out_ch: Optional[int] = None
  conv_shortcut: bool = False
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None, train=True):
    c = x.shape[-1]
    out_ch = self.out_ch if self.out_ch else c
    h = self.act(group_norm(x, num_groups=32, dtype=self.dtype))
    h = ddpm_conv3x3(h, out_ch, dtype=self.dtype)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=self.dtype,
                       param_dtype=jnp.float32)(self.act(temb))[:, None, None, :]
    h = self.act(group_norm(h, num_groups=32, dtype=self.dtype))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = ddpm_conv3x3(h, out_ch, init_scale=0.0, dtype=self.dtype)
    if c != out_ch:
      if self.conv_shortcut:
        x = ddpm_conv3x3(x, out_ch, dtype=self.dtype)
      else:
        x = NIN(out_ch, dtype=self.dtype)(x)
    return x + h

"""FIR up/down-sampling (StyleGAN2's `upfirdn2d`) for NHWC tensors, as used by NCSN++.

Semantics follow the reference implementation: a 1-D kernel `k` is made separable (outer product),
normalised to sum 1, and

* `upsample_2d`: zero-insertion up-sampling by `factor`, then convolution with `k * factor**2`;
* `downsample_2d`: convolution with `k`, then keeping every `factor`-th sample;
* `upsample_conv_2d`: the fused "up-sample, then 3x3 convolution" (a strided transposed convolution
  followed by the FIR filter);
* `conv_downsample_2d`: the fused "3x3 convolution, then down-sample" (FIR filter, then a strided
  convolution).

Everything is expressed with `lax.conv_general_dilated` (zero insertion through `lhs_dilation`,
decimation through `window_strides`), so XLA fuses padding, dilation and striding into one convolution.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def setup_kernel(k: Sequence[float]) -> np.ndarray:
  """The 2-D FIR kernel: outer(k, k) for a 1-D `k`, normalised to sum 1."""
  k = np.asarray(k, dtype=np.float64)
  if k.ndim == 1:
    k = np.outer(k, k)
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f"FIR kernel must be 1-D or square 2-D; got shape {k.shape}.")
  return k / np.sum(k)


def upfirdn2d(x: jax.Array, k: np.ndarray, up: int = 1, down: int = 1, pad=(0, 0)) -> jax.Array:
  """Up-sample by zero insertion (`up`), pad by `pad=(before, after)` on H and W, convolve with the
  2-D kernel `k` (true convolution: the kernel is flipped) and keep every `down`-th sample.

  x: [N, H, W, C]; the filter is applied depthwise.
  """
  n, h, w, c = x.shape
  kh, kw = k.shape
  p0, p1 = pad
  kern = np.asarray(k[::-1, ::-1], dtype=np.float32)
  kern = jnp.asarray(np.tile(kern[:, :, None, None], (1, 1, 1, c)), dtype=x.dtype)
  # Zero insertion by lhs_dilation leaves (H-1)*up+1 samples; the reference's reshape-based insertion
  # leaves H*up (up-1 trailing zeros), so the trailing pad grows by up-1.
  padding = [(p0, p1 + up - 1), (p0, p1 + up - 1)]
  return lax.conv_general_dilated(
      x, kern, window_strides=(down, down), padding=padding, lhs_dilation=(up, up),
      dimension_numbers=_DN, feature_group_count=c)


def upsample_2d(x, k=(1, 3, 3, 1), factor: int = 2, gain: float = 1.0):
  """[N, H, W, C] → [N, H·factor, W·factor, C] with the FIR filter `k`."""
  kk = setup_kernel(k) * (gain * factor ** 2)
  p = kk.shape[0] - factor
  return upfirdn2d(x, kk, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x, k=(1, 3, 3, 1), factor: int = 2, gain: float = 1.0):
  """[N, H, W, C] → [N, H/factor, W/factor, C] with the FIR filter `k`."""
  kk = setup_kernel(k) * gain
  p = kk.shape[0] - factor
  return upfirdn2d(x, kk, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x, w, k=(1, 3, 3, 1), factor: int = 2, gain: float = 1.0):
  """Fused up-sampling and convolution with `w` [kh, kw, in, out] (HWIO).

  The strided transposed convolution of the reference equals zero insertion (lhs_dilation) with a
  (kh-1) border and a plain cross-correlation with `w`; the FIR filter then smooths the result.
  """
  conv_h, conv_w = w.shape[0], w.shape[1]
  if conv_h != conv_w:
    raise ValueError(f"square convolution kernels only; got {w.shape}.")
  kk = setup_kernel(k) * (gain * factor ** 2)
  p = (kk.shape[0] - factor) - (conv_w - 1)
  y = lax.conv_general_dilated(
      x, w, window_strides=(1, 1), padding=[(conv_h - 1, conv_h - 1)] * 2,
      lhs_dilation=(factor, factor), dimension_numbers=_DN)
  return upfirdn2d(y, kk, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x, w, k=(1, 3, 3, 1), factor: int = 2, gain: float = 1.0):
  """Fused convolution with `w` [kh, kw, in, out] and down-sampling: FIR filter, then a strided
  valid convolution."""
  conv_h, conv_w = w.shape[0], w.shape[1]
  if conv_h != conv_w:
    raise ValueError(f"square convolution kernels only; got {w.shape}.")
  kk = setup_kernel(k) * gain
  p = (kk.shape[0] - factor) + (conv_w - 1)
  x = upfirdn2d(x, kk, pad=((p + 1) // 2, p // 2))
  return lax.conv_general_dilated(x, w, window_strides=(factor, factor), padding="VALID",
                                  dimension_numbers=_DN)


def naive_upsample_2d(x, factor: int = 2):
  """Nearest-neighbour up-sampling (each pixel repeated factor×factor times)."""
  n, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, factor, w, factor, c))
  return x.reshape(n, h * factor, w * factor, c)


def naive_downsample_2d(x, factor: int = 2):
  """Average pooling over factor×factor blocks."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // factor, factor, w // factor, factor, c)
  return jnp.mean(x, axis=(2, 4))


class Conv2d(nn.Module):
  """Convolution with optional fused FIR up- or down-sampling (StyleGAN2), params 'kernel' (HWIO)
  and 'bias'."""

  fmaps: int
  kernel: int
  up: bool = False
  down: bool = False
  resample_kernel: Sequence[int] = (1, 3, 3, 1)
  use_bias: bool = True
  kernel_init: Callable | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.up and self.down:
      raise ValueError("Conv2d: up and down are exclusive.")
    if self.kernel < 1 or self.kernel % 2 != 1:
      raise ValueError(f"Conv2d: kernel must be odd and >= 1; got {self.kernel}.")
    init = self.kernel_init or nn.initializers.lecun_normal()
    w = self.param("kernel", init, (self.kernel, self.kernel, x.shape[-1], self.fmaps), jnp.float32)
    x = x.astype(self.dtype)
    w = w.astype(self.dtype)
    if self.up:
      x = upsample_conv_2d(x, w, k=self.resample_kernel)
    elif self.down:
      x = conv_downsample_2d(x, w, k=self.resample_kernel)
    else:
      pad = self.kernel // 2
      x = lax.conv_general_dilated(x, w, (1, 1), [(pad, pad), (pad, pad)], dimension_numbers=_DN)
    if self.use_bias:
      b = self.param("bias", nn.initializers.zeros, (self.fmaps,), jnp.float32)
      x = x + b.astype(self.dtype)
    return x

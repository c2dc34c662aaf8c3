"""Normalisation layers of NCSN / NCSNv2 (NHWC).  Statistics are taken in float32.

Parameter names follow the PyTorch port (alpha, gamma, beta; `embed` for the conditional ones), shapes
are per channel (C,).  Variances are the biased (population) ones, as in the official JAX code.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def _scale_init(key, shape, dtype=jnp.float32):
  return nn.initializers.normal(0.02)(key, shape, dtype) + 1.0


def _moments(x):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)
  return x32, mean, var


class InstanceNorm2d(nn.Module):
  bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x32, mean, var = _moments(x)
    h = (x32 - mean) / jnp.sqrt(var + 1e-5)
    h = h * self.param("weight", nn.initializers.ones, (c,), jnp.float32)
    if self.bias:
      h = h + self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return h.astype(self.dtype)


class VarianceNorm2d(nn.Module):
  bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x32, _, var = _moments(x)
    h = x32 / jnp.sqrt(var + 1e-5)
    h = h * self.param("alpha", _scale_init, (c,), jnp.float32)
    if self.bias:
      h = h + self.param("beta", nn.initializers.zeros, (c,), jnp.float32)
    return h.astype(self.dtype)


class InstanceNorm2dPlus(nn.Module):
  """InstanceNorm++ (Song & Ermon, 2019): instance norm plus a learned correction by the normalised
  per-channel means."""

  bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x32, mean, var = _moments(x)
    means = mean[:, 0, 0, :]
    m = jnp.mean(means, axis=-1, keepdims=True)
    v = jnp.mean(jnp.square(means - m), axis=-1, keepdims=True)
    means_plus = (means - m) / jnp.sqrt(v + 1e-5)
    h = (x32 - mean) / jnp.sqrt(var + 1e-5)
    alpha = self.param("alpha", _scale_init, (c,), jnp.float32)
    gamma = self.param("gamma", _scale_init, (c,), jnp.float32)
    h = h + means_plus[:, None, None, :] * alpha
    h = h * gamma
    if self.bias:
      h = h + self.param("beta", nn.initializers.zeros, (c,), jnp.float32)
    return h.astype(self.dtype)


class ConditionalInstanceNorm2dPlus(nn.Module):
  """InstanceNorm++ whose gamma, alpha (and beta) are looked up by the integer label `y`."""

  num_classes: int = 10
  bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, y):
    c = x.shape[-1]
    x32, mean, var = _moments(x)
    means = mean[:, 0, 0, :]
    m = jnp.mean(means, axis=-1, keepdims=True)
    v = jnp.mean(jnp.square(means - m), axis=-1, keepdims=True)
    means_plus = (means - m) / jnp.sqrt(v + 1e-5)
    h = (x32 - mean) / jnp.sqrt(var + 1e-5)
    n = 3 if self.bias else 2

    def init_embed(key, shape, dtype=jnp.float32):
      scales = nn.initializers.normal(0.02)(key, (shape[0], 2 * c), dtype) + 1.0
      if self.bias:
        return jnp.concatenate([scales, jnp.zeros((shape[0], c), dtype)], axis=-1)
      return scales

    emb = nn.Embed(self.num_classes, n * c, embedding_init=init_embed, name="embed")(
        jnp.asarray(y).astype(jnp.int32))
    parts = jnp.split(emb, n, axis=-1)
    gamma, alpha = parts[0], parts[1]
    h = h + means_plus[:, None, None, :] * alpha[:, None, None, :]
    out = gamma[:, None, None, :] * h
    if self.bias:
      out = out + parts[2][:, None, None, :]
    return out.astype(self.dtype)


def get_normalization(config, conditional: bool = False, dtype=jnp.float32):
  """The normalisation module class named by `config.model.normalization` (partially applied)."""
  norm = str(config.model.normalization)
  if conditional:
    if norm == "InstanceNorm++":
      return functools.partial(ConditionalInstanceNorm2dPlus, num_classes=int(config.model.num_scales),
                               dtype=dtype)
    raise ValueError(f"conditional normalization {norm!r} is not implemented; use 'InstanceNorm++'.")
  table = {"InstanceNorm": InstanceNorm2d, "InstanceNorm++": InstanceNorm2dPlus,
           "VarianceNorm": VarianceNorm2d}
  if norm == "GroupNorm":
    return functools.partial(nn.GroupNorm, num_groups=32, dtype=dtype, param_dtype=jnp.float32)
  if norm not in table:
    raise ValueError(f"Unknown model.normalization {norm!r}; allowed: {sorted(table) + ['GroupNorm']}.")
  return functools.partial(table[norm], dtype=dtype)

"""Time / noise-level embeddings of the score networks."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int, max_positions: int = 10000):
  """Sinusoidal (Transformer / DDPM) embedding:
  emb_k = sin(t · 10000^{−k/(h−1)}), emb_{h+k} = cos(t · 10000^{−k/(h−1)}), h = dim/2, k < h."""
  assert timesteps.ndim == 1, timesteps.shape
  half_dim = embedding_dim // 2
  scale = math.log(max_positions) / (half_dim - 1)
  freqs = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -scale)
  emb = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, [[0, 0], [0, 1]])
  return emb


class GaussianFourierProjection(nn.Module):
  """Random Fourier features of the noise level (Tancik et al., 2020), as in NCSN++:
  [sin(2π W x), cos(2π W x)] with fixed W ~ N(0, scale²) (stop_gradient: not trained)."""

  embedding_size: int = 256
  scale: float = 1.0

  @nn.compact
  def __call__(self, x):
    W = self.param("W", jax.nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
    W = jax.lax.stop_gradient(W)
    x_proj = x[:, None] * W[None, :] * 2 * jnp.pi
    return jnp.concatenate([jnp.sin(x_proj), jnp.cos(x_proj)], axis=-1)

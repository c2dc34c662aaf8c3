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


def class_embedding(config, class_labels, temb, dim: int, dtype=jnp.float32):
  """temb + E[y]: adds a learned class-label embedding to the time embedding `temb` (or returns E[y]
  alone when `temb` is None, i.e. the network is not noise-conditional).

  E is a table of num_classes + 1 rows (`nn.Embed`, N(0, 1) init, module name 'class_embed'): rows
  0 … num_classes − 1 are the classes, row num_classes is the null class ∅ of classifier-free
  guidance (training with `training.label_dropout` replaces labels by num_classes, and the
  unconditional score is s(x, t, ∅)).  Labels outside [0, num_classes] cannot be checked under jit
  (nn.Embed clips them).  With model.num_classes = 0 nothing is created and `temb` is returned.
  """
  num_classes = int(config.model.num_classes)
  if num_classes <= 0:
    if class_labels is not None:
      raise ValueError("class_labels were given but config.model.num_classes is 0; set "
                       "model.num_classes to the number of classes for a class-conditional model.")
    return temb
  if class_labels is None:
    raise ValueError(f"this model is class-conditional (model.num_classes = {num_classes}); pass "
                     f"class_labels=<int array [B]> to apply() (the null class ∅ is {num_classes}).")
  cemb = nn.Embed(num_classes + 1, dim, embedding_init=nn.initializers.normal(1.0), dtype=dtype,
                  param_dtype=jnp.float32, name="class_embed")(jnp.asarray(class_labels, jnp.int32))
  return cemb if temb is None else temb + cemb

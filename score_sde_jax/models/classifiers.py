"""Noise-conditional classifiers p_φ(y | x(t), t) for classifier guidance, registered as 'classifier_mlp'
(low-dimensional toy data) and 'classifier_cnn' (small images, e.g. 28x28x1 MNIST).

Both are called like the score networks, `model.apply(variables, x, labels, train=False)`, with the time
labels of `score.time_labels` (continuous VE: σ(t); discrete VE: the ladder index i, 0 = σ_max;
VP / sub-VP: 999·t or the DDPM index), and return logits f_φ(x, t) [B, model.num_classes] in float32,
so that log p_φ(y | x, t) = log_softmax(f_φ(x, t))_y.  Every operation is per example (GroupNorm, no
batch statistics): ∇ₓ log p_φ(y_b | x_b, t_b) depends on x_b alone, as classifier guidance requires.

Time embedding (as `mlp.MLP`): 'fourier' = Gaussian Fourier features of log σ (a discrete VE label is
first turned into σ_i), 'positional' = sinusoidal embedding of the label; then two Dense layers,
temb = Dense(silu(Dense(emb))).

Config fields read: model.nf (width), model.num_classes (> 0), model.embedding_type, model.fourier_scale,
model.dropout, model.num_layers ('classifier_mlp' only), training.sde and training.continuous (which
labels arrive), and for a discrete VE model model.sigma_min / sigma_max / num_scales (the ladder).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from score_sde_jax import checks
from score_sde_jax.models import embeddings, layers
from score_sde_jax.models.registry import register_model


def num_classes_of(config, who: str) -> int:
  """model.num_classes as an int, which a classifier needs to be > 0."""
  n = int(config.model.num_classes)
  if n <= 0:
    raise ValueError(f"{who} is a classifier: set config.model.num_classes to the number of classes "
                     f"(> 0); got {n}.")
  return n


def noise_levels(config, labels):
  """What the log-σ (Fourier) embedding sees: σ_i of the ladder σ_max … σ_min for a discrete VE model
  (`training.continuous=False`: labels are indices, and log(0) would be −∞), else the labels themselves
  (σ(t) for continuous VE; 999·t or the DDPM index for VP / sub-VP)."""
  t = config.training
  if checks.normalize_name(t.sde) == "vesde" and not t.continuous:
    return jnp.asarray(layers.get_sigmas(config))[jnp.asarray(labels).astype(jnp.int32)]
  return jnp.asarray(labels, jnp.float32)


def time_embedding(config, labels, dim: int):
  """temb = Dense_dim(silu(Dense_dim(emb(labels)))), emb per model.embedding_type (module docstring).
  Creates GaussianFourierProjection_0 (if 'fourier') and the next two Dense modules of the caller."""
  m = config.model
  kind = checks.check_choice("model.embedding_type", m.embedding_type, ("fourier", "positional"))
  if kind == "fourier":
    emb = embeddings.GaussianFourierProjection(embedding_size=dim, scale=float(m.fourier_scale))(
        jnp.log(noise_levels(config, labels)))
  else:
    emb = embeddings.get_timestep_embedding(jnp.asarray(labels), dim)
  temb = nn.Dense(dim)(emb)
  return nn.Dense(dim)(nn.silu(temb))


def group_norm(channels: int, name=None) -> nn.GroupNorm:
  """GroupNorm with min(32, C/4) groups (rounded to a divisor of C), per example."""
  groups = math.gcd(int(channels), min(32, max(1, int(channels) // 4)))
  return nn.GroupNorm(num_groups=groups, epsilon=1e-5, name=name)


@register_model("classifier_mlp")
class ClassifierMLP(nn.Module):
  """Residual-MLP classifier for flattened low-dimensional x:

    h_0 = Dense_nf(x),
    h_{k+1} = h_k + Dense_nf(silu(Dropout(Dense_nf(silu(h_k + Dense_nf(silu(temb))))))),  k < num_layers,
    logits = Dense_C(silu(h_L)).

  `__call__(x [B, ...], labels [B], train=False) -> logits [B, C]` (float32); dropout (model.dropout)
  is active only with train=True (pass rngs={'dropout': key}).
  """

  config: object

  @nn.compact
  def __call__(self, x, labels, train: bool = False):
    m = self.config.model
    num_classes = num_classes_of(self.config, "classifier_mlp")
    nf = int(m.nf)
    rate = float(m.dropout)
    h = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
    temb = time_embedding(self.config, labels, nf)
    h = nn.Dense(nf)(h)
    for _ in range(int(m.num_layers)):
      r = nn.silu(h + nn.Dense(nf)(nn.silu(temb)))
      r = nn.Dense(nf)(r)
      r = nn.Dropout(rate, deterministic=not train)(nn.silu(r))
      h = h + nn.Dense(nf)(r)
    return nn.Dense(num_classes)(nn.silu(h)).astype(jnp.float32)


@register_model("classifier_cnn")
class ClassifierCNN(nn.Module):
  """Small convolutional classifier for images [B, H, W, C] (written for 28x28x1 MNIST):

    three conv blocks  h ← silu(GroupNorm(Conv3x3(h))) + Dense_c(silu(temb))   (per-channel time bias)
    with c = nf, 2nf (stride 2), 4nf (stride 2)  (28 → 28 → 14 → 7),
    logits = Dense_C(Dropout(mean over H, W of h)).

  `__call__(x, labels, train=False) -> logits [B, C]` (float32); dropout (model.dropout) before the
  last layer, only with train=True.
  """

  config: object

  @nn.compact
  def __call__(self, x, labels, train: bool = False):
    m = self.config.model
    num_classes = num_classes_of(self.config, "classifier_cnn")
    if x.ndim != 4:
      raise ValueError(f"classifier_cnn takes images [B, H, W, C]; got shape {tuple(x.shape)}. For "
                       f"flat toy data use model.name = 'classifier_mlp'.")
    nf = int(m.nf)
    temb = time_embedding(self.config, labels, 4 * nf)
    h = jnp.asarray(x, jnp.float32)
    for channels, stride in ((nf, 1), (2 * nf, 2), (4 * nf, 2)):
      h = nn.Conv(channels, (3, 3), strides=(stride, stride), padding="SAME")(h)
      h = nn.silu(group_norm(channels)(h))
      h = h + nn.Dense(channels)(nn.silu(temb))[:, None, None, :]
    h = jnp.mean(h, axis=(1, 2))
    h = nn.Dropout(float(m.dropout), deterministic=not train)(h)
    return nn.Dense(num_classes)(h).astype(jnp.float32)

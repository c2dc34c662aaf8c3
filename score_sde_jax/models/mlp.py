"""Residual MLP score network for low-dimensional (toy) data."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde_jax import checks
from score_sde_jax.models import embeddings, layers
from score_sde_jax.models.registry import register_model


@register_model("mlp")
class MLP(nn.Module):
  """s_θ(x, label): a residual MLP with the time embedding added to every block.

  Follows the official label conventions (`score.time_labels`): continuous VE models get σ(t), discrete
  VE models (SMLD, `training.continuous=False`) the index i of the ladder σ_max … σ_min (σ_i looked up in
  it, as NCSN++ does), VP/sub-VP models 999·t or the DDPM index.  'fourier' embeds log σ with Gaussian
  Fourier features, 'positional' embeds the label sinusoidally.  With `model.scale_by_sigma` the output
  is divided by σ, so that the network predicts σ·s, as NCSN++ does.  Config fields used: model.nf
  (width), model.num_layers, model.embedding_type, model.fourier_scale, model.scale_by_sigma,
  model.num_classes, training.sde and training.continuous (which labels arrive).

  Class conditioning (model.num_classes = K > 0): `class_labels` [B] ints in [0, K] select a learned
  embedding E[y] (K + 1 rows; row K is the null class ∅ of classifier-free guidance) that is added to
  the time embedding after its two Dense layers, temb = Dense(silu(Dense(emb(t)))) + E[y], so every
  block sees it.  With K = 0 the parameters are exactly those of the unconditional network.
  """

  config: object

  @nn.compact
  def __call__(self, x, labels, train: bool = False, class_labels=None):
    m = self.config.model
    nf = int(m.nf)
    batch = x.shape[0]
    h = x.reshape(batch, -1)
    dim = h.shape[-1]
    t = self.config.training
    if checks.normalize_name(t.sde) == "vesde" and not t.continuous:
      # Ladder indices (0 = σ_max): log(index) would be −inf at i = 0, so look σ_i up as NCSN++ does.
      sigmas = jnp.asarray(layers.get_sigmas(self.config))[labels.astype(jnp.int32)]
    else:
      sigmas = labels
    if m.embedding_type == "fourier":
      temb = embeddings.GaussianFourierProjection(embedding_size=nf, scale=float(m.fourier_scale))(
          jnp.log(sigmas))
    elif m.embedding_type == "positional":
      temb = embeddings.get_timestep_embedding(labels, nf)
    else:
      raise ValueError(f"Unknown model.embedding_type {m.embedding_type!r}; allowed values: "
                       f"'fourier', 'positional'.")
    temb = nn.Dense(nf)(temb)
    temb = nn.Dense(nf)(nn.silu(temb))
    temb = embeddings.class_embedding(self.config, class_labels, temb, nf)
    h = nn.Dense(nf)(h)
    for _ in range(int(m.num_layers)):
      r = nn.silu(h + nn.Dense(nf)(nn.silu(temb)))
      r = nn.Dense(nf)(r)
      h = h + nn.Dense(nf)(nn.silu(r))
    out = nn.Dense(dim)(nn.silu(h))
    if m.scale_by_sigma:
      out = out / sigmas[:, None]
    return out.reshape(x.shape)

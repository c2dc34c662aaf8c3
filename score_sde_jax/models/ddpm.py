"""The DDPM U-Net (Ho et al., 2020), registered as 'ddpm', as in the official score_sde code.

Fields: model.nf, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv, conditional,
scale_by_sigma, nonlinearity; plus num_classes / dtype / remat (additions, see `ncsnpp.py`).  Labels are
timestep indices (discrete DDPM) or 999·t (continuous VP), embedded sinusoidally.  GroupNorm uses 32
groups, so every width (nf × ch_mult) must be a multiple of 32.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from score_sde_jax.models import layers
from score_sde_jax.models.embeddings import get_timestep_embedding
from score_sde_jax.models.ncsnpp import _Namer, class_embedding
from score_sde_jax.models.registry import register_model


@register_model("ddpm")
class DDPM(nn.Module):
  """`__call__(x, labels, train=False, class_labels=None)`, x NHWC."""

  config: object

  @nn.compact
  def __call__(self, x, labels, train: bool = False, class_labels=None):
    config = self.config
    m = config.model
    dtype = layers.get_dtype(config)
    act = layers.get_act(config)
    nf = int(m.nf)
    ch_mult = tuple(int(c) for c in m.ch_mult)
    num_res_blocks = int(m.num_res_blocks)
    attn_resolutions = tuple(int(r) for r in m.attn_resolutions)
    dropout = float(m.dropout)
    resamp_with_conv = bool(m.resamp_with_conv)
    num_resolutions = len(ch_mult)
    conditional = bool(m.conditional)
    remat = bool(m.remat)
    layers.check_image_input(config, x, num_resolutions - 1)
    for c in (nf,) + tuple(nf * k for k in ch_mult):
      if c % 32:
        raise ValueError(f"DDPM uses GroupNorm with 32 groups: every width nf×ch_mult must be a multiple "
                         f"of 32; got nf={nf}, ch_mult={ch_mult}.")
    name = _Namer()

    if conditional:
      temb = get_timestep_embedding(labels, nf)
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dtype, param_dtype=jnp.float32,
                      name=name("Dense"))(temb)
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dtype, param_dtype=jnp.float32,
                      name=name("Dense"))(act(temb))
    else:
      temb = None
    temb = class_embedding(config, class_labels, temb, nf * 4, dtype)

    block_cls = layers.ResnetBlockDDPM
    if remat:
      block_cls = nn.remat(block_cls, static_argnums=(3,))

    def resblock(h, out_ch=None):
      return block_cls(act=act, out_ch=out_ch, dropout=dropout, dtype=dtype,
                       name=name("ResnetBlockDDPM"))(h, temb, train)

    def attn(h):
      return layers.AttnBlock(dtype=dtype, name=name("AttnBlock"))(h)

    h = x if config.data.centered else 2 * x - 1.0
    h = h.astype(dtype)
    hs = [layers.ddpm_conv3x3(h, nf, dtype=dtype, name=name("Conv"))]
    for i_level in range(num_resolutions):
      for _ in range(num_res_blocks):
        h = resblock(hs[-1], out_ch=nf * ch_mult[i_level])
        if h.shape[1] in attn_resolutions:
          h = attn(h)
        hs.append(h)
      if i_level != num_resolutions - 1:
        hs.append(layers.Downsample(with_conv=resamp_with_conv, dtype=dtype,
                                    name=name("Downsample"))(hs[-1]))

    h = hs[-1]
    h = resblock(h)
    h = attn(h)
    h = resblock(h)

    for i_level in reversed(range(num_resolutions)):
      for _ in range(num_res_blocks + 1):
        h = resblock(jnp.concatenate([h, hs.pop()], axis=-1), out_ch=nf * ch_mult[i_level])
      if h.shape[1] in attn_resolutions:
        h = attn(h)
      if i_level != 0:
        h = layers.Upsample(with_conv=resamp_with_conv, dtype=dtype, name=name("Upsample"))(h)

    assert not hs
    h = act(layers.group_norm(h, num_groups=32, dtype=dtype, name=name("GroupNorm")))
    h = layers.ddpm_conv3x3(h, x.shape[-1], init_scale=0.0, dtype=dtype, name=name("Conv"))
    h = h.astype(jnp.float32)
    if m.scale_by_sigma:
      used_sigmas = jnp.asarray(layers.get_sigmas(config))[labels.astype(jnp.int32)]
      h = h / used_sigmas.reshape((x.shape[0],) + (1,) * (h.ndim - 1))
    return h

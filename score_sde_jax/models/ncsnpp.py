"""NCSN++ and DDPM++ (Song et al., ICLR 2021): one configurable U-Net family, registered as 'ncsnpp'.

Switches (official field names under `config.model`): nf, ch_mult, num_res_blocks, attn_resolutions,
dropout, resamp_with_conv, conditional (noise-level conditioning), fir / fir_kernel, skip_rescale,
resblock_type ('ddpm' | 'biggan'), progressive ('none' | 'output_skip' | 'residual'), progressive_input
('none' | 'input_skip' | 'residual'), progressive_combine ('sum' | 'cat'), embedding_type ('fourier' |
'positional'), fourier_scale, scale_by_sigma, init_scale, nonlinearity.  The deep variants are the same
network with more residual blocks per resolution (num_res_blocks = 8).

Additions: `num_classes` > 0 adds a class-label embedding (`class_labels=` keyword; a table of
num_classes + 1 rows, the last the null class ∅ of classifier-free guidance, see
`embeddings.class_embedding`), `dtype` sets the compute dtype (parameters stay float32), `remat`
rematerialises the residual blocks.

The top-level sub-modules are created in exactly the order of the official network's module list, and
named as the official JAX code names them (Dense_0, Conv_0, ResnetBlockBigGANpp_3, …); `convert.py`
relies on that order.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from score_sde_jax.models import layers, layerspp
from score_sde_jax.models.embeddings import (GaussianFourierProjection, class_embedding,  # noqa: F401
                                             get_timestep_embedding)
from score_sde_jax.models.registry import register_model

_SQRT2 = float(np.sqrt(2.0))

PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
RESBLOCK_TYPES = ("ddpm", "biggan")
EMBEDDING_TYPES = ("fourier", "positional")


def _choice(name, value, allowed):
  value = str(value).lower()
  if value not in allowed:
    raise ValueError(f"Unknown model.{name} {value!r}; allowed values: {', '.join(map(repr, allowed))}.")
  return value


class _Namer:
  """Official-style names (Type_k) assigned explicitly, so they do not change with `remat`."""

  def __init__(self):
    self.counts = {}

  def __call__(self, kind):
    k = self.counts.get(kind, 0)
    self.counts[kind] = k + 1
    return f"{kind}_{k}"


@register_model("ncsnpp")
class NCSNpp(nn.Module):
  """NCSN++ / DDPM++ score network.  `__call__(x, labels, train=False, class_labels=None)`, x NHWC."""

  config: object

  @nn.compact
  def __call__(self, x, time_cond, train: bool = False, class_labels=None):
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
    fir = bool(m.fir)
    fir_kernel = tuple(int(k) for k in m.fir_kernel)
    skip_rescale = bool(m.skip_rescale)
    resblock_type = _choice("resblock_type", m.resblock_type, RESBLOCK_TYPES)
    progressive = _choice("progressive", m.progressive, PROGRESSIVE)
    progressive_input = _choice("progressive_input", m.progressive_input, PROGRESSIVE_INPUT)
    embedding_type = _choice("embedding_type", m.embedding_type, EMBEDDING_TYPES)
    combine_method = _choice("progressive_combine", m.progressive_combine, ("sum", "cat"))
    init_scale = float(m.init_scale)
    remat = bool(m.remat)
    layers.check_image_input(config, x, num_resolutions - 1)
    name = _Namer()

    # -- time / noise-level embedding --------------------------------------------------------------
    if embedding_type == "fourier":
      if not config.training.continuous:
        raise ValueError("embedding_type='fourier' needs continuous training (σ labels); use "
                         "'positional' for discrete labels.")
      temb = GaussianFourierProjection(embedding_size=nf, scale=float(m.fourier_scale),
                                       name=name("GaussianFourierProjection"))(
                                           jnp.log(time_cond.astype(jnp.float32)))
    else:
      temb = get_timestep_embedding(time_cond, nf)

    if conditional:
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dtype, param_dtype=jnp.float32,
                      name=name("Dense"))(temb)
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dtype, param_dtype=jnp.float32,
                      name=name("Dense"))(act(temb))
    else:
      temb = None
    temb = class_embedding(config, class_labels, temb, nf * 4, dtype)

    # -- building blocks ---------------------------------------------------------------------------
    def conv3x3(h, out, init_scale=1.0):
      return layers.ddpm_conv3x3(h, out, init_scale=init_scale, dtype=dtype, name=name("Conv"))

    def gnorm(h):
      return layers.group_norm(h, dtype=dtype, name=name("GroupNorm"))

    if resblock_type == "ddpm":
      block_cls = layerspp.ResnetBlockDDPMpp
      block_kw = dict(act=act, dropout=dropout, init_scale=init_scale, skip_rescale=skip_rescale,
                      dtype=dtype)
    else:
      block_cls = layerspp.ResnetBlockBigGANpp
      block_kw = dict(act=act, dropout=dropout, fir=fir, fir_kernel=fir_kernel, init_scale=init_scale,
                      skip_rescale=skip_rescale, dtype=dtype)
    block_name = block_cls.__name__
    if remat:
      block_cls = nn.remat(block_cls, static_argnums=(3,))

    def resblock(h, **kw):
      return block_cls(**block_kw, **kw, name=name(block_name))(h, temb, train)

    def attn(h):
      return layerspp.AttnBlockpp(init_scale=init_scale, skip_rescale=skip_rescale, dtype=dtype,
                                  name=name("AttnBlockpp"))(h)

    def upsample(h, with_conv, out_ch=None, cls=layerspp.Upsample):
      return cls(out_ch=out_ch, with_conv=with_conv, fir=fir, fir_kernel=fir_kernel, dtype=dtype,
                 name=name("Upsample"))(h)

    def downsample(h, with_conv, out_ch=None, cls=layerspp.Downsample):
      return cls(out_ch=out_ch, with_conv=with_conv, fir=fir, fir_kernel=fir_kernel, dtype=dtype,
                 name=name("Downsample"))(h)

    # -- down path ---------------------------------------------------------------------------------
    if not config.data.centered:
      x = 2 * x - 1.0
    x = x.astype(dtype)
    input_pyramid = x if progressive_input != "none" else None

    hs = [conv3x3(x, nf)]
    for i_level in range(num_resolutions):
      for _ in range(num_res_blocks):
        h = resblock(hs[-1], out_ch=nf * ch_mult[i_level])
        if h.shape[1] in attn_resolutions:
          h = attn(h)
        hs.append(h)

      if i_level != num_resolutions - 1:
        if resblock_type == "ddpm":
          h = downsample(hs[-1], with_conv=resamp_with_conv)
        else:
          h = resblock(hs[-1], down=True)

        if progressive_input == "input_skip":
          input_pyramid = downsample(input_pyramid, with_conv=False, cls=layerspp.PyramidDownsample)
          h = layerspp.Combine(method=combine_method, dtype=dtype, name=name("Combine"))(
              input_pyramid, h)
        elif progressive_input == "residual":
          input_pyramid = downsample(input_pyramid, with_conv=True, out_ch=h.shape[-1])
          if skip_rescale:
            input_pyramid = (input_pyramid + h) / _SQRT2
          else:
            input_pyramid = input_pyramid + h
          h = input_pyramid
        hs.append(h)

    h = hs[-1]
    h = resblock(h)
    h = attn(h)
    h = resblock(h)

    # -- up path -----------------------------------------------------------------------------------
    pyramid = None
    channels = x.shape[-1]
    for i_level in reversed(range(num_resolutions)):
      for _ in range(num_res_blocks + 1):
        h = resblock(jnp.concatenate([h, hs.pop()], axis=-1), out_ch=nf * ch_mult[i_level])
      if h.shape[1] in attn_resolutions:
        h = attn(h)

      if progressive != "none":
        if i_level == num_resolutions - 1:
          if progressive == "output_skip":
            pyramid = conv3x3(act(gnorm(h)), channels, init_scale=init_scale)
          else:
            pyramid = conv3x3(act(gnorm(h)), h.shape[-1])
        else:
          if progressive == "output_skip":
            pyramid = upsample(pyramid, with_conv=False, cls=layerspp.PyramidUpsample)
            pyramid = pyramid + conv3x3(act(gnorm(h)), channels, init_scale=init_scale)
          else:
            pyramid = upsample(pyramid, with_conv=True, out_ch=h.shape[-1])
            if skip_rescale:
              pyramid = (pyramid + h) / _SQRT2
            else:
              pyramid = pyramid + h
            h = pyramid

      if i_level != 0:
        if resblock_type == "ddpm":
          h = upsample(h, with_conv=resamp_with_conv)
        else:
          h = resblock(h, up=True)

    assert not hs
    if progressive == "output_skip":
      h = pyramid
    else:
      h = act(gnorm(h))
      h = conv3x3(h, channels, init_scale=init_scale)
    h = h.astype(jnp.float32)

    if m.scale_by_sigma:
      if embedding_type == "fourier":
        used_sigmas = time_cond.astype(jnp.float32)
      else:
        used_sigmas = jnp.asarray(layers.get_sigmas(config))[time_cond.astype(jnp.int32)]
      h = h / used_sigmas.reshape((x.shape[0],) + (1,) * (h.ndim - 1))
    return h

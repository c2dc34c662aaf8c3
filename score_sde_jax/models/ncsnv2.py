"""NCSN (v1, Song & Ermon 2019) and NCSNv2 (Song & Ermon 2020) RefineNet score networks, NHWC.

Registered names: 'ncsn' (noise-conditional normalisations: labels are noise-level indices into
`model.num_scales` embeddings), 'ncsnv2_64' (images < 96 px), 'ncsnv2_128' (96–128 px), 'ncsnv2_256'
(129–256 px).  NCSNv2 is not noise-conditional; with `model.scale_by_sigma` the output is divided by σ of
the label index (the official behaviour).

Computation follows the official JAX code (biased variances in InstanceNorm++, 'SAME' padding for
dilated convolutions, `jax.image.resize` bilinear fusion).  Sub-module names follow the attribute names of
the PyTorch port (begin_conv, res1_0, refine2/adapt_convs_1/1_2_conv, normalizer, end_conv) so that its
state dicts convert by name.  Fields: model.nf, normalization, nonlinearity, interpolation, num_scales,
sigma_min/max, scale_by_sigma, dtype.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from score_sde_jax.models import layers, normalization, refinenet
from score_sde_jax.models.registry import register_model


def _prepare(module, x, labels, class_labels, num_downsamples):
  config = module.config
  layers.check_image_input(config, x, num_downsamples)
  if int(config.model.num_classes) > 0 or class_labels is not None:
    raise ValueError(f"model.name={config.model.name!r} has no class-conditional variant; use 'ncsnpp' or "
                     f"'ddpm' with model.num_classes > 0.")
  dtype = layers.get_dtype(config)
  h = x if config.data.centered else 2 * x - 1.0
  return h.astype(dtype), dtype


def _finish(config, h, labels, x):
  h = h.astype(jnp.float32)
  if config.model.scale_by_sigma:
    used = jnp.asarray(layers.get_sigmas(config))[jnp.asarray(labels).astype(jnp.int32)]
    h = h / used.reshape((x.shape[0],) + (1,) * (h.ndim - 1))
  return h


class _RefineNetBase(nn.Module):
  """Backbone + RefineNet cascade described by `stages` (see subclasses)."""

  config: object
  # (name, width multiplier, resample, dilation) per residual stage; each stage has two blocks.
  stages = ()
  # (name, width multiplier) per refine block, from the coarsest; inputs follow the stages in reverse.
  refines = ()
  conditional = False

  @nn.compact
  def __call__(self, x, labels, train: bool = False, class_labels=None):
    config = self.config
    n_down = sum(1 for s in self.stages if s[2] == "down" and s[3] == 1)
    h, dtype = _prepare(self, x, labels, class_labels, n_down)
    nf = int(config.model.nf)
    act = layers.get_act(config)
    norm = normalization.get_normalization(config, conditional=self.conditional, dtype=dtype)
    interpolation = str(config.model.interpolation)
    y = jnp.asarray(labels).astype(jnp.int32) if self.conditional else None

    h = layers.ncsn_conv(h, nf, dtype=dtype, name="begin_conv")
    feats = []
    for name, mult, resample, dilation in self.stages:
      h = refinenet.ResidualBlock(mult * nf, norm, resample=resample, act=act, dilation=dilation,
                               conditional=self.conditional, dtype=dtype, name=f"{name}_0")(h, y)
      h = refinenet.ResidualBlock(mult * nf, norm, resample=None, act=act, dilation=dilation,
                               conditional=self.conditional, dtype=dtype, name=f"{name}_1")(h, y)
      feats.append(h)

    ref = None
    for i, (name, mult) in enumerate(self.refines):
      layer = feats[len(feats) - 1 - i]
      start, end = i == 0, i == len(self.refines) - 1
      xs = [layer] if start else [layer, ref]
      if self.conditional:
        ref = refinenet.CondRefineBlock(layer.shape[1:3], mult * nf, norm, act=act,
                                     interpolation=interpolation, start=start, end=end, dtype=dtype,
                                     name=name)(xs, y)
      else:
        ref = refinenet.RefineBlock(layer.shape[1:3], mult * nf, act=act, interpolation=interpolation,
                                 start=start, end=end, dtype=dtype, name=name)(xs)

    if self.conditional:
      h = norm(name="normalizer")(ref, y)
    else:
      h = norm(name="normalizer")(ref)
    h = act(h)
    h = layers.ncsn_conv(h, x.shape[-1], dtype=dtype, name="end_conv")
    return _finish(config, h, labels, x)


@register_model("ncsnv2_64")
class NCSNv2(_RefineNetBase):
  stages = (("res1", 1, None, 1), ("res2", 2, "down", 1), ("res3", 2, "down", 2),
            ("res4", 2, "down", 4))
  refines = (("refine1", 2), ("refine2", 2), ("refine3", 1), ("refine4", 1))


@register_model("ncsn")
class NCSN(_RefineNetBase):
  stages = NCSNv2.stages
  refines = (("refine1", 2), ("refine2", 2), ("refine3", 2), ("refine4", 1))
  conditional = True


@register_model("ncsnv2_128")
class NCSNv2_128(_RefineNetBase):  # noqa: N801
  stages = (("res1", 1, None, 1), ("res2", 2, "down", 1), ("res3", 2, "down", 1),
            ("res4", 4, "down", 2), ("res5", 4, "down", 4))
  refines = (("refine1", 4), ("refine2", 2), ("refine3", 2), ("refine4", 1), ("refine5", 1))


@register_model("ncsnv2_256")
class NCSNv2_256(_RefineNetBase):  # noqa: N801
  stages = (("res1", 1, None, 1), ("res2", 2, "down", 1), ("res3", 2, "down", 1),
            ("res31", 2, "down", 1), ("res4", 4, "down", 2), ("res5", 4, "down", 4))
  refines = (("refine1", 4), ("refine2", 2), ("refine31", 2), ("refine3", 2), ("refine4", 1),
             ("refine5", 1))


def get_ncsnv2_name(image_size: int) -> str:
  """The NCSNv2 variant the official code picks for an image size."""
  if image_size < 96:
    return "ncsnv2_64"
  if image_size <= 128:
    return "ncsnv2_128"
  if image_size <= 256:
    return "ncsnv2_256"
  raise ValueError(f"no NCSNv2 network for {image_size}px images (at most 256).")

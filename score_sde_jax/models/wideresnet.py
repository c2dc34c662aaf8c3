"""The noise-conditional Wide ResNet classifier p_φ(y | x(t), σ) of the official CIFAR-10 classifier
guidance (score_sde, models/wideresnet_noise_conditional.py), registered 'wideresnet_noise_conditional'.

Architecture (Zagoruyko & Komodakis 2016, with GroupNorm and a noise-level embedding):

  x ← CIFAR-10 channel standardisation (x − μ_c) / s_c   (the official `get_logit_fn` preprocessing,
      data in [0, 1]), then per-image standardisation (x − mean) / max(std, 1/√N), N = H·W·C;
  temb = Dense_512(silu(Dense_512(GaussianFourierProjection(128, scale 16)(log σ))));
  h = Conv3x3_16(x) ('init_conv', no bias);
  three groups of `blocks_per_group` WideResnetBlocks with 16k, 32k (stride 2), 64k (stride 2)
  channels, k = channel_multiplier; a block is
      a = GN-ReLU(h) ('init_bn'),  b = Conv3x3(a) ('conv1') + Dense_c(silu(temb)),
      b = Conv3x3(GN-ReLU(b) ('bn_2')) ('conv2'),  out = b + skip(h or a),
  where skip average-pools by the stride and zero-pads the channels when the width changes, and the
  first block of the first group takes the residual after its activation ('activate_before_residual');
  logits = Dense_C(mean_{H,W} GN-ReLU(h) ('pre-pool-bn')).
GroupNorm has min(C/4, 32) groups and ε = 1e-5; there is no batch statistic, so logits of one image do
not depend on the rest of the batch.  The official classifier is WRN-28-10: blocks_per_group = 4
(depth 6·4 + 4 = 28), channel_multiplier = 10, 10 classes.

Module and parameter names and nesting are the official ones (GaussianFourierProjection_0/W, Dense_0,
Dense_1, init_conv, WideResnetGroup_g/WideResnetBlock_b/{init_bn, conv1, Dense_0, bn_2, conv2},
pre-pool-bn, Dense_2), so the official variables load by name (`load_official_classifier`).

Time input: the official classifier takes the VE noise scale σ (the official sampler passes the
marginal std of the SDE).  Here the labels follow `score.time_labels`: continuous VE σ(t) is used as is,
a discrete VE index i becomes σ_i of the ladder; VP / sub-VP labels (999·t, not in the official code) go
through the same log + Fourier projection.

Config fields read: model.blocks_per_group, model.channel_multiplier, model.num_classes (official
constructor names; official values 4, 10, 10), training.sde and training.continuous (which labels
arrive) and, for a discrete VE model, model.sigma_min / sigma_max / num_scales.  The embedding size
(128) and Fourier scale (16) are fixed, as in the official code.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde_jax.models import classifiers
from score_sde_jax.models.embeddings import GaussianFourierProjection
from score_sde_jax.models.registry import register_model

OFFICIAL_HPARAMS = {"blocks_per_group": 4, "channel_multiplier": 10, "num_classes": 10}
EMBEDDING_SIZE = 128
FOURIER_SCALE = 16.0
TEMB_DIM = 4 * EMBEDDING_SIZE
# CIFAR-10 per-channel mean and standard deviation of the official `get_logit_fn` preprocessing.
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)

# He normal with fan_out (gain 2) for convolutions; U[−1, 1]/√C for the last Dense layer.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _last_dense_init(key, shape, dtype=jnp.float32):
  bound = 1.0 / float(np.sqrt(shape[1]))
  return jax.random.uniform(key, shape, dtype, -1.0, 1.0) * bound


def _gn_relu(h, name: str, relu: bool = True):
  h = nn.GroupNorm(num_groups=min(h.shape[-1] // 4, 32), epsilon=1e-5, name=name)(h)
  return jax.nn.relu(h) if relu else h


def _residual(block_out, skip):
  """block_out + skip, the skip average-pooled by the stride and zero-padded in channels if the width
  changed."""
  if block_out.shape[-1] != skip.shape[-1]:
    s = skip.shape[-2] // block_out.shape[-2]
    skip = nn.avg_pool(skip, (s, s), (s, s))
    skip = jnp.pad(skip, [(0, 0), (0, 0), (0, 0), (0, block_out.shape[-1] - skip.shape[-1])])
  return block_out + skip


class WideResnetBlock(nn.Module):
  """One pre-activation residual block with a per-channel time bias after the first convolution."""

  channels: int
  strides: Tuple[int, int] = (1, 1)
  activate_before_residual: bool = False

  @nn.compact
  def __call__(self, h, temb, train: bool = False):
    del train   # no dropout and no batch statistics
    if self.activate_before_residual:
      h = _gn_relu(h, "init_bn")
      a = h
    else:
      a = _gn_relu(h, "init_bn")
    b = nn.Conv(self.channels, (3, 3), self.strides, padding="SAME", use_bias=False,
                kernel_init=conv_init, name="conv1")(a)
    b = b + nn.Dense(self.channels, name="Dense_0")(nn.silu(temb))[:, None, None, :]
    b = nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False, kernel_init=conv_init,
                name="conv2")(_gn_relu(b, "bn_2"))
    return _residual(b, h)


class WideResnetGroup(nn.Module):
  """`blocks_per_group` blocks; the first one has the stride (and activates before the residual)."""

  blocks_per_group: int
  channels: int
  strides: Tuple[int, int] = (1, 1)
  activate_before_residual: bool = False

  @nn.compact
  def __call__(self, h, temb, train: bool = False):
    for i in range(self.blocks_per_group):
      h = WideResnetBlock(self.channels, self.strides if i == 0 else (1, 1),
                          activate_before_residual=self.activate_before_residual and i == 0,
                          name=f"WideResnetBlock_{i}")(h, temb, train)
    return h


def hparams(config) -> Dict[str, int]:
  """blocks_per_group, channel_multiplier, num_classes from config.model (clear error if missing)."""
  out = {}
  for field, official in OFFICIAL_HPARAMS.items():
    if field not in config.model:
      raise ValueError(f"wideresnet_noise_conditional needs config.model.{field} (the official "
                       f"classifier uses {official}); add it to the config.")
    out[field] = int(config.model[field])
    if out[field] <= 0:
      raise ValueError(f"config.model.{field} must be > 0 for wideresnet_noise_conditional; got "
                       f"{out[field]}.")
  return out


def cifar10_standardize(x):
  """(x − μ_c) / s_c with the CIFAR-10 channel statistics, as the official `get_logit_fn`."""
  return (x - jnp.asarray(CIFAR10_MEAN)) / jnp.asarray(CIFAR10_STD)


@register_model("wideresnet_noise_conditional")
class WideResnetNoiseConditional(nn.Module):
  """`__call__(x [B, H, W, 3] in [0, 1], labels [B], train=False) -> logits [B, num_classes]` (float32);
  see the module docstring."""

  config: object

  @nn.compact
  def __call__(self, x, labels, train: bool = False):
    hp = hparams(self.config)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] % 4 or x.shape[2] % 4:
      raise ValueError(f"wideresnet_noise_conditional is the CIFAR-10 classifier: it takes RGB images "
                       f"[B, H, W, 3] with H, W multiples of 4 (32x32 officially); got shape "
                       f"{tuple(x.shape)}. For MNIST use model.name = 'classifier_cnn'.")
    x = cifar10_standardize(jnp.asarray(x, jnp.float32))
    n = float(np.prod(x.shape[1:]))
    std = jnp.maximum(jnp.std(x, axis=(1, 2, 3), keepdims=True), 1.0 / np.sqrt(n))
    x = (x - jnp.mean(x, axis=(1, 2, 3), keepdims=True)) / std

    sigmas = classifiers.noise_levels(self.config, labels)
    temb = GaussianFourierProjection(embedding_size=EMBEDDING_SIZE, scale=FOURIER_SCALE,
                                     name="GaussianFourierProjection_0")(jnp.log(sigmas))
    temb = nn.Dense(TEMB_DIM, name="Dense_0")(temb)
    temb = nn.Dense(TEMB_DIM, name="Dense_1")(nn.silu(temb))

    k = hp["channel_multiplier"]
    h = nn.Conv(16, (3, 3), padding="SAME", use_bias=False, kernel_init=conv_init, name="init_conv")(x)
    for g, (channels, stride) in enumerate(((16 * k, 1), (32 * k, 2), (64 * k, 2))):
      h = WideResnetGroup(hp["blocks_per_group"], channels, (stride, stride),
                          activate_before_residual=(g == 0), name=f"WideResnetGroup_{g}")(h, temb, train)
    h = _gn_relu(h, "pre-pool-bn")
    h = jnp.mean(h, axis=(1, 2))
    return nn.Dense(hp["num_classes"], kernel_init=_last_dense_init, name="Dense_2")(h).astype(jnp.float32)


def expected_shapes(config) -> Dict[str, Any]:
  """The parameter shape tree ({'params': …} of jax.ShapeDtypeStruct) of this classifier for `config`
  (no shape depends on the image size; traced at 32x32, without computing anything)."""
  model = WideResnetNoiseConditional(config=config)
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, x, jnp.ones((1,)),
                                           train=False))


def _flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def load_official_classifier(path_or_bytes, config) -> Dict[str, Any]:
  """Variables {'params': …} of `WideResnetNoiseConditional(config)` from a Flax msgpack of the official
  classifier: a checkpoint file (path) or its bytes, holding either the bare parameter tree (as the
  official `checkpoints.restore_checkpoint(ckpt_path, init_params)` reads it) or {'params': tree}.

  Every parameter is checked against the shapes this module creates for `config` (model.blocks_per_group,
  model.channel_multiplier, model.num_classes); the first missing, unexpected or mis-shaped path is
  named in a ValueError."""
  if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
    data, where = bytes(path_or_bytes), "the given bytes"
  elif isinstance(path_or_bytes, (str, os.PathLike)):
    where = os.fspath(path_or_bytes)
    if not os.path.isfile(where):
      raise ValueError(f"load_official_classifier: no file at {where!r} (give the classifier checkpoint "
                       f"file, a Flax msgpack).")
    with open(where, "rb") as f:
      data = f.read()
  else:
    raise ValueError(f"load_official_classifier takes a path or bytes; got {type(path_or_bytes).__name__}.")
  try:
    tree = flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several exception types on foreign data
    raise ValueError(f"load_official_classifier: {where} is not a Flax msgpack ({e}).") from e
  if not isinstance(tree, dict):
    raise ValueError(f"load_official_classifier: {where} holds a {type(tree).__name__}, not a tree of "
                     f"parameters.")
  params = tree["params"] if set(tree) == {"params"} else tree
  want = _flat(flax.core.unfreeze(expected_shapes(config))["params"])
  got = _flat(params)
  hint = (f"(this module was built with {hparams(config)}; the official classifier is "
          f"{OFFICIAL_HPARAMS})")
  for path in sorted(set(want) | set(got)):
    name = "/".join(path)
    if path not in got:
      raise ValueError(f"load_official_classifier: parameter {name} is missing from {where} {hint}.")
    if path not in want:
      raise ValueError(f"load_official_classifier: {where} has parameter {name}, which this module "
                       f"does not create {hint}.")
    if tuple(np.shape(got[path])) != tuple(want[path].shape):
      raise ValueError(f"load_official_classifier: parameter {name} has shape "
                       f"{tuple(np.shape(got[path]))} in {where} but this module expects "
                       f"{tuple(want[path].shape)} {hint}.")
  nested: Dict[str, Any] = {}
  for path, v in got.items():
    node = nested
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(v, jnp.float32)
  return {"params": nested}

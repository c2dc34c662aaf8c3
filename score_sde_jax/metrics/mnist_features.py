"""A small CNN classifier for MNIST whose penultimate layer gives "FID-MNIST" features.

The Inception network is a poor judge of 28x28 digits; the usual substitute is a digit classifier trained on
MNIST, with FID/KID computed on its penultimate activations and IS on its 10-way softmax (`metrics.fid`
works on any (N, d) features and (N, C) logits).  Only the architecture and the feature function are here:
train it with `python scripts/train.py --config configs/mnist/feature_net.py --workdir runs/mnist_feature_net`
(the weights are not shipped), and compare numbers only between runs that use the same trained weights.

Architecture (NHWC input (B, 28, 28, 1) in [0, 1], scaled to [-1, 1] inside):
conv3x3(16) relu - conv3x3(32) relu - maxpool2 - conv3x3(64) relu - maxpool2 - flatten -
dense(`feature_dim`=128) relu = "features" - dropout (training only) - dense(10) = "logits".
"""
from __future__ import annotations

import functools
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde_jax.models.registry import register_model

__all__ = ["MNISTClassifier", "init_mnist_classifier", "mnist_features", "MNIST_SHAPE"]

MNIST_SHAPE = (28, 28, 1)


@register_model("mnist_feature_net")
class MNISTClassifier(nn.Module):
  """CNN digit classifier; `__call__(images, labels=None, train=False)` returns {"features": (B,
  feature_dim), "logits": (B, num_classes)}.  Registered as the model `mnist_feature_net`, so that the
  project's trainer trains it (`configs/mnist/feature_net.py`, `training.task='classifier'`); `labels`
  (the trainer's time input) is ignored, and `config` is accepted only for the registry."""
  feature_dim: int = 128
  num_classes: int = 10
  dropout_rate: float = 0.5
  config: Any = None

  @nn.compact
  def __call__(self, images, labels=None, train: bool = False) -> Dict[str, jax.Array]:  # noqa: ARG002
    if images.ndim != 4 or images.shape[1:] != MNIST_SHAPE:
      raise ValueError(f"MNISTClassifier expects (B, 28, 28, 1) images, got shape {images.shape}")
    x = 2.0 * images.astype(jnp.float32) - 1.0
    # Widths 16-32-64: ~7M multiply-adds per image, so that it trains to 99% in minutes on a CPU.
    x = nn.relu(nn.Conv(16, (3, 3), padding="SAME", name="conv1")(x))
    x = nn.relu(nn.Conv(32, (3, 3), padding="SAME", name="conv2")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))  # 14x14
    x = nn.relu(nn.Conv(64, (3, 3), padding="SAME", name="conv3")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))  # 7x7
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(self.feature_dim, name="fc1")(x))
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    logits = nn.Dense(self.num_classes, name="fc2")(h)
    return {"features": features, "logits": logits}


def init_mnist_classifier(rng, **kwargs):
  """Fresh (untrained) variables of `MNISTClassifier(**kwargs)`."""
  return MNISTClassifier(**kwargs).init(rng, jnp.zeros((1,) + MNIST_SHAPE, jnp.float32))


@functools.partial(jax.jit, static_argnames=("feature_dim", "num_classes"))
def mnist_features(variables, images, feature_dim: int = 128, num_classes: int = 10) -> Dict[str, jax.Array]:
  """{"features", "logits"} of (B, 28, 28, 1) float images in [0, 1] (inference: no dropout)."""
  return MNISTClassifier(feature_dim, num_classes).apply(variables, images, train=False)

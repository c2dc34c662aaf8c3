"""The MNIST digit classifier of the FID-MNIST features (`metrics.mnist_features` computes them).

Architecture (NHWC input (B, 28, 28, 1) in [0, 1], scaled to [-1, 1] inside):
conv3x3(16) relu - conv3x3(32) relu - maxpool2 - conv3x3(64) relu - maxpool2 - flatten -
dense(`feature_dim`=128) relu = "features" - dropout (training only) - dense(10) = "logits".
"""
from __future__ import annotations

from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde_jax.models.registry import register_model

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

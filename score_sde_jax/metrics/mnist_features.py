"""A small CNN classifier for MNIST whose penultimate layer gives "FID-MNIST" features.

The Inception network is a poor judge of 28x28 digits; the usual substitute is a digit classifier trained on
MNIST, with FID/KID computed on its penultimate activations and IS on its 10-way softmax (`metrics.fid`
works on any (N, d) features and (N, C) logits).  The feature function is here; the weights are trained
with `python scripts/train.py --config configs/mnist/feature_net.py --workdir runs/mnist_feature_net`
(they are not shipped); compare numbers only between runs that use the same trained weights.

The network, `MNISTClassifier`, lives with the other networks in `models/mnist_classifier.py` (registered
as the model `mnist_feature_net`) and is re-exported here.
"""
from __future__ import annotations

import functools
from typing import Dict

import jax
import jax.numpy as jnp

from score_sde_jax.models.mnist_classifier import MNIST_SHAPE, MNISTClassifier

__all__ = ["MNISTClassifier", "init_mnist_classifier", "mnist_features", "MNIST_SHAPE"]


def init_mnist_classifier(rng, **kwargs):
  """Fresh (untrained) variables of `MNISTClassifier(**kwargs)`."""
  return MNISTClassifier(**kwargs).init(rng, jnp.zeros((1,) + MNIST_SHAPE, jnp.float32))


@functools.partial(jax.jit, static_argnames=("feature_dim", "num_classes"))
def mnist_features(variables, images, feature_dim: int = 128, num_classes: int = 10) -> Dict[str, jax.Array]:
  """{"features", "logits"} of (B, 28, 28, 1) float images in [0, 1] (inference: no dropout)."""
  return MNISTClassifier(feature_dim, num_classes).apply(variables, images, train=False)

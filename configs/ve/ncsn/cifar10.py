"""NCSN (v1), CIFAR-10: 10 noise levels σ ∈ [0.01, 1], annealed Langevin dynamics."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ncsn(image_configs.cifar10_config())

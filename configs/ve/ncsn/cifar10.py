"""NCSN (v1), CIFAR-10: 10 noise levels, annealed Langevin dynamics."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ncsn(image_configs.cifar10_config())

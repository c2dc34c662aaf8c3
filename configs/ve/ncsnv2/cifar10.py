"""NCSNv2, CIFAR-10: 232 noise levels σ ∈ [0.01, 50]."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ncsnv2(image_configs.cifar10_config(), num_scales=232)

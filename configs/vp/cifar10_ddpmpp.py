"""DDPM++ trained with the discrete DDPM objective, CIFAR-10."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ddpmpp(image_configs.cifar10_config(), 'vpsde', continuous=False)

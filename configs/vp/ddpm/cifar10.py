"""DDPM (Ho et al., 2020), CIFAR-10, discrete objective."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ddpm(image_configs.cifar10_config(), 'vpsde', continuous=False)

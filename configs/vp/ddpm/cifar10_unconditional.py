"""DDPM, CIFAR-10, discrete objective, without time conditioning (NCSNv2 technique 3)."""
from score_sde_jax import image_configs


def get_config():
  config = image_configs.ddpm(image_configs.cifar10_config(), 'vpsde', continuous=False)
  config.model.conditional = False
  return config

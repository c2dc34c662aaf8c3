"""The DDPM architecture trained with the SMLD objective (VE, discrete), CIFAR-10."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ddpm(image_configs.cifar10_config(), 'vesde', continuous=False)

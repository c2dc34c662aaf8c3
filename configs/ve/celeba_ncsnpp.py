"""NCSN++ (VE, discrete), CelebA 64x64."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ncsnpp(image_configs.celeba_config(), 'vesde', continuous=False)

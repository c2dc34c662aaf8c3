"""NCSN++ cont. (VE), CelebA-HQ 1024x1024."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ncsnpp_hires(image_configs.ncsnpp(image_configs.celebahq_config(1024), 'vesde', continuous=True))

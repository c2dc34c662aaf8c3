"""NCSN++ cont. (VE), FFHQ 256x256."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ncsnpp_hires(image_configs.ncsnpp(image_configs.ffhq_config(256), 'vesde', continuous=True))

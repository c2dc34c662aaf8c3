"""NCSN++ cont. (VE), LSUN bedroom 256x256."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ncsnpp_hires(image_configs.ncsnpp(image_configs.lsun_config('bedroom'), 'vesde', continuous=True))

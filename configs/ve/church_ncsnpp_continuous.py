"""NCSN++ cont. (VE), LSUN church_outdoor 256x256."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ncsnpp_hires(image_configs.ncsnpp(image_configs.lsun_config('church_outdoor'), 'vesde', continuous=True))

"""NCSN++ cont. (VE), LSUN church_outdoor 256x256 (σ_max = 380)."""
from score_sde_jax import image_configs


def get_config():
  config = image_configs.ncsnpp(image_configs.lsun_config('church_outdoor'), 'vesde', continuous=True)
  return image_configs.ncsnpp_hires(config, sigma_max=380.0)

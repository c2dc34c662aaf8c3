"""NCSN++ cont. (VE), FFHQ 256x256 (σ_max = 348)."""
from score_sde_jax import image_configs


def get_config():
  config = image_configs.ncsnpp(image_configs.ffhq_config(256), 'vesde', continuous=True)
  return image_configs.ncsnpp_hires(config, sigma_max=348.0)

"""DDPM, LSUN bedroom 256x256, discrete objective."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ddpm_hires(image_configs.ddpm(image_configs.lsun_config('bedroom'), 'vpsde', continuous=False))

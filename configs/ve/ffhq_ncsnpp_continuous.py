"""NCSN++ cont. (VE), FFHQ 1024x1024 (the released ffhq_1024_ncsnpp_continuous checkpoint)."""
from score_sde_jax import image_configs


def get_config():
  config = image_configs.ncsnpp_hires(image_configs.ncsnpp(image_configs.ffhq_config(1024), 'vesde', continuous=True))
  config.training.reduce_mean = True   # as the official FFHQ 1024 file (the CelebA-HQ 1024 one sums)
  return config

"""DDPM, CelebA-HQ 256x256, discrete objective."""
from score_sde_jax import image_configs


def _ddpm_hires(config):
  """DDPM at 256x256 (Ho et al.): ch_mult (1, 1, 2, 2, 4, 4), dropout 0."""
  m = config.model
  m.ch_mult = (1, 1, 2, 2, 4, 4)
  m.num_res_blocks = 2
  m.attn_resolutions = (16,)
  m.dropout = 0.0
  return config


def get_config():
  return _ddpm_hires(image_configs.ddpm(image_configs.celebahq_config(256), 'vpsde', continuous=False))

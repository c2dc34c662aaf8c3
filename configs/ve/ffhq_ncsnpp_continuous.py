"""NCSN++ cont. (VE), FFHQ 1024x1024."""
from score_sde_jax import image_configs


def _hires(config):
  """High-resolution NCSN++ (official settings): output_skip / input_skip pyramids."""
  m = config.model
  if config.data.image_size >= 1024:
    m.nf = 16
    m.ch_mult = (1, 2, 4, 8, 16, 16, 16, 16, 16)
    m.num_res_blocks = 1
  else:
    m.nf = 128
    m.ch_mult = (1, 1, 2, 2, 2, 2, 2)
    m.num_res_blocks = 2
  m.attn_resolutions = (16,)
  m.fourier_scale = 16
  m.progressive = "output_skip"
  m.progressive_input = "input_skip"
  m.progressive_combine = "sum"
  m.resblock_type = "biggan"
  m.fir = True
  m.skip_rescale = True
  m.init_scale = 0.0
  return config


def get_config():
  return _hires(image_configs.ncsnpp(image_configs.ffhq_config(1024), 'vesde', continuous=True))

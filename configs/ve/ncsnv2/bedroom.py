"""NCSNv2, LSUN bedroom 128x128: 1086 noise levels σ ∈ [0.01, 190], EMA 0.9999.

The official file misspells `training.continuouse = False`; NCSNv2 is trained here with the discrete
objective (training.continuous = False) like the other NCSN / NCSNv2 configs.
"""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ncsnv2(image_configs.lsun_config('bedroom', image_size=128), num_scales=1086,
                              sigma_max=190.0, ema_rate=0.9999, n_steps_each=3, snr=0.095)

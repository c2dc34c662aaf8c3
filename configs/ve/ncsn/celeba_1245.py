"""NCSN, CelebA 64x64, with NCSNv2 techniques 1, 2, 4, 5 (as celeba_124 plus EMA 0.999)."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ncsn(image_configs.celeba_config(), num_scales=500, sigma_max=None, ema_rate=0.999,
                            n_steps_each=5, snr=0.128)

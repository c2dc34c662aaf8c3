"""NCSN, CelebA 64x64, with NCSNv2 techniques 1, 2, 4 (500 noise levels up to σ_max = 90, 5 steps per level)."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ncsn(image_configs.celeba_config(), num_scales=500, sigma_max=None, n_steps_each=5,
                            snr=0.128)

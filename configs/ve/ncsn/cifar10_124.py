"""NCSN, CIFAR-10, with NCSNv2 techniques 1, 2, 4 (232 noise levels up to σ_max = 50, 5 steps per level)."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ncsn(image_configs.cifar10_config(), num_scales=232, sigma_max=None, n_steps_each=5,
                            snr=0.176)

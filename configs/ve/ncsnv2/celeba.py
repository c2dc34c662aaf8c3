"""NCSNv2, CelebA 64x64: 500 noise levels σ ∈ [0.01, 90]."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ncsnv2(image_configs.celeba_config(), num_scales=500, snr=0.128)

"""NCSN (v1), CelebA 64x64, with NCSNv2 technique 5 only (EMA 0.999)."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ncsn(image_configs.celeba_config(), ema_rate=0.999)

"""The NCSN++ architecture trained with the discrete DDPM objective (VP), CIFAR-10."""
from score_sde_jax import image_configs


def get_config():
  config = image_configs.ncsnpp(image_configs.cifar10_config(), 'vpsde', continuous=False)
  config.sampling.predictor = 'reverse_diffusion'   # as the official file (not ancestral sampling)
  return config

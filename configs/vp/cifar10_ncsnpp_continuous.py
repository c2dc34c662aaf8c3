"""The NCSN++ architecture with the VP SDE, CIFAR-10."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ncsnpp(image_configs.cifar10_config(), 'vpsde', continuous=True)

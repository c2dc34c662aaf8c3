"""MNIST 28x28, VP SDE, small DDPM++ (~20 min on one H100)."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.mnist_ncsnpp('vpsde')

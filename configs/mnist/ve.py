"""MNIST 28x28, VE SDE, small NCSN++ (~20 min on one H100)."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.mnist_ncsnpp('vesde')

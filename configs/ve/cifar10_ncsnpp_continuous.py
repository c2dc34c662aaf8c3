"""NCSN++ cont. (VE SDE), CIFAR-10: FID 2.38 in the paper."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ncsnpp(image_configs.cifar10_config(), 'vesde', continuous=True)

"""DDPM++ cont. deep (sub-VP SDE), CIFAR-10: 106,632,579 parameters, NLL 2.99 bits/dim."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ddpmpp(image_configs.cifar10_config(), 'subvpsde', continuous=True, deep=True)

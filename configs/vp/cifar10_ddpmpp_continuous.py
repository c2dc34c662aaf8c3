"""DDPM++ cont. (VP SDE), CIFAR-10: 61,804,419 parameters."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ddpmpp(image_configs.cifar10_config(), 'vpsde', continuous=True)

"""The DDPM architecture trained with the continuous VP SDE objective, CIFAR-10 (the released
vp/cifar10_ddpm_continuous checkpoint)."""
from score_sde_jax import image_configs


def get_config():
  return image_configs.ddpm(image_configs.cifar10_config(), 'vpsde', continuous=True)

"""The official noise-conditional classifier for class-conditional CIFAR-10 sampling (Song et al. 2021,
App. I.1): a WideResNet-28-10 (`models/wideresnet.py`, the official parameter names, so that the released
classifier weights load with `wideresnet.load_official_classifier`) on x(t) of the VE SDE of
`configs/ve/cifar10_ncsnpp_continuous.py`, with the log-σ(t) Fourier time embedding.

    python scripts/train.py --config configs/ve/cifar10_classifier_wideresnet.py --workdir runs/cifar10_clf
"""
from score_sde_jax import image_configs


def get_config():
  config = image_configs.ncsnpp(image_configs.cifar10_config(), "vesde", continuous=True)
  t = config.training
  t.task = "noise_classifier"
  t.snapshot_sampling = False
  t.n_iters = 200001
  m = config.model
  m.name = "wideresnet_noise_conditional"
  m.num_classes = 10
  m.blocks_per_group = 4
  m.channel_multiplier = 10
  m.dropout = 0.0
  config.data.centered = False    # the official classifier standardises [0, 1] inputs itself
  return config

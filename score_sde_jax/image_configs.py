"""Image configs: dataset defaults and the paper's model presets (Song et al., ICLR 2021).

Built on `config_defaults.base_config()` (official field names).  The files under `configs/ve`,
`configs/vp`, `configs/subvp` and `configs/mnist` call these functions, so each paper setting is one
named file at the official file's path; the values are those of the official score_sde configs (batch 128,
Adam 2e-4, warm-up 5000, gradient clipping 1, EMA 0.999 for VE / 0.9999 for VP and sub-VP, 1.3M iterations
or 950k for the deep models, dropout 0.1, σ ∈ [0.01, 50] on CIFAR-10, β ∈ [0.1, 20]).
`tests/test_official_configs.py` checks every field of every official file against
`tests/data/official_configs.json`.

Model fields added here for the image networks: ch_mult, num_res_blocks, attn_resolutions,
resamp_with_conv, conditional, fir, fir_kernel, skip_rescale, resblock_type, progressive,
progressive_input, progressive_combine, attention_type, init_scale, conv_size, normalization,
nonlinearity, interpolation, num_classes (0 = unconditional; > 0 adds a class-label embedding).
"""
from __future__ import annotations

import ml_collections

from score_sde_jax.config_defaults import base_config, image_model_fields

SDES = ("vesde", "vpsde", "subvpsde")


# --------------------------------------------------------------------------------------------------
# dataset defaults (official default_*_configs)
# --------------------------------------------------------------------------------------------------
def cifar10_config() -> ml_collections.ConfigDict:
  """CIFAR-10 32x32 defaults (official default_cifar10_configs.py)."""
  config = image_model_fields(base_config())
  t = config.training
  t.batch_size = 128
  t.n_iters = 1300001
  t.snapshot_freq = 50000
  t.snapshot_freq_for_preemption = 10000
  t.n_jitted_steps = 5                      # official JAX default (5 steps per compiled call)
  config.sampling.snr = 0.16
  e = config.eval
  e.begin_ckpt = 9
  e.end_ckpt = 26
  e.batch_size = 1024
  e.enable_sampling = False
  data = config.data
  data.dataset = "CIFAR10"
  data.image_size = 32
  data.num_channels = 3
  data.random_flip = True
  data.centered = False
  data.uniform_dequantization = False
  m = config.model
  m.sigma_min = 0.01
  m.sigma_max = 50.0
  m.num_scales = 1000
  m.beta_min = 0.1
  m.beta_max = 20.0
  m.dropout = 0.1
  m.embedding_type = "fourier"
  return config


def svhn_config() -> ml_collections.ConfigDict:
  """SVHN 32x32 (same model defaults as CIFAR-10)."""
  config = cifar10_config()
  config.data.dataset = "SVHN"
  config.data.random_flip = False
  return config


def celeba_config() -> ml_collections.ConfigDict:
  """CelebA 64x64 (centre-cropped) defaults (official default_celeba_configs.py)."""
  config = cifar10_config()
  config.sampling.snr = 0.17
  config.eval.begin_ckpt = 1
  config.eval.end_ckpt = 26
  config.eval.enable_sampling = True
  config.data.dataset = "CELEBA"
  config.data.image_size = 64
  config.model.sigma_max = 90.0
  return config


def _lsun_defaults(image_size: int = 256) -> ml_collections.ConfigDict:
  """The official default_lsun_configs.py values (also the base of the 256px FFHQ / CelebA-HQ configs)."""
  config = cifar10_config()
  t = config.training
  t.batch_size = 64
  t.n_iters = 2400001
  t.snapshot_freq = 50000
  t.snapshot_freq_for_preemption = 5000
  config.sampling.snr = 0.075
  e = config.eval
  e.begin_ckpt = 50
  e.end_ckpt = 96
  e.batch_size = 512
  e.enable_sampling = True
  config.data.dataset = "LSUN"
  config.data.image_size = image_size
  m = config.model
  m.sigma_max = 378.0
  m.num_scales = 2000
  m.dropout = 0.0
  config.optim.lr = 2e-4
  return config


def lsun_config(category: str = "bedroom", image_size: int = 256) -> ml_collections.ConfigDict:
  """LSUN (bedroom / church_outdoor) defaults, 256x256 unless `image_size` says otherwise."""
  config = _lsun_defaults(image_size)
  config.data.category = category           # LSUN only
  return config


def ffhq_config(image_size: int = 1024, dataset: str = "FFHQ") -> ml_collections.ConfigDict:
  """FFHQ (or CelebA-HQ with dataset='CelebAHQ') defaults.

  256x256: the LSUN defaults with the dataset swapped, as in the official ffhq_256 / celebahq_256 configs
  (their VE σ_max = 348 is passed to `ncsnpp_hires`).  1024x1024: the settings of the official
  stand-alone ffhq / celebahq NCSN++ configs (batch 8, σ_max = 1348, evaluation of checkpoints 1-96); they
  set no n_jitted_steps, and one step per compiled call keeps the memory of the 1024px model in check.
  """
  if dataset not in ("FFHQ", "CelebAHQ"):
    raise ValueError(f"ffhq_config: dataset must be 'FFHQ' or 'CelebAHQ'; got {dataset!r}.")
  if image_size < 1024:
    config = _lsun_defaults(image_size)
    config.data.dataset = dataset
    return config
  config = cifar10_config()
  t = config.training
  t.batch_size = 8
  t.n_iters = 2400001
  t.snapshot_freq = 50000
  t.snapshot_freq_for_preemption = 5000
  t.n_jitted_steps = 1
  config.sampling.snr = 0.15
  e = config.eval
  e.begin_ckpt = 1
  e.end_ckpt = 96
  e.batch_size = 1024
  config.data.dataset = dataset
  config.data.image_size = image_size
  m = config.model
  m.sigma_max = 1348.0
  m.num_scales = 2000
  m.dropout = 0.0
  config.optim.lr = 2e-4
  return config


def celebahq_config(image_size: int = 256) -> ml_collections.ConfigDict:
  return ffhq_config(image_size=image_size, dataset="CelebAHQ")


def mnist_config() -> ml_collections.ConfigDict:
  """MNIST 28x28x1 defaults (small training budget; see `mnist_ncsnpp`)."""
  config = cifar10_config()
  config.training.batch_size = 128
  config.training.n_iters = 30001
  config.training.snapshot_freq = 5000
  config.training.snapshot_freq_for_preemption = 2500
  config.training.log_freq = 100
  config.training.eval_freq = 500
  config.training.n_jitted_steps = 1
  config.eval.begin_ckpt = 1
  config.eval.end_ckpt = 6
  config.eval.batch_size = 500
  config.eval.num_samples = 10000
  config.sampling.num_samples = 64
  data = config.data
  data.dataset = "MNIST"
  data.image_size = 28
  data.num_channels = 1
  data.random_flip = False
  data.centered = False
  m = config.model
  m.sigma_max = 50.0                        # ≥ max pairwise distance of MNIST (≈ 30 in [0,1]^784)
  m.dropout = 0.1
  config.optim.warmup = 1000
  return config


# --------------------------------------------------------------------------------------------------
# paper model presets
# --------------------------------------------------------------------------------------------------
def _sde_settings(config, sde: str, continuous: bool):
  if sde not in SDES:
    raise ValueError(f"sde must be one of {SDES}; got {sde!r}.")
  if not continuous and sde == "subvpsde":
    raise ValueError("sub-VP SDE models are continuous only (no discrete objective exists).")
  t = config.training
  t.sde = sde
  t.continuous = continuous
  s = config.sampling
  s.method = "pc"
  if sde == "vesde":
    t.reduce_mean = False
    s.predictor = "reverse_diffusion"
    s.corrector = "langevin"
    config.model.ema_rate = 0.999
    config.data.centered = False
  else:
    t.reduce_mean = True
    s.predictor = "euler_maruyama" if continuous else "ancestral_sampling"
    s.corrector = "none"
    config.model.ema_rate = 0.9999
    config.data.centered = True
  return config


def _ncsnpp_family(config, sde: str, continuous: bool, deep: bool):
  """What NCSN++ and DDPM++ share: 4 (deep: 8) BigGAN blocks per resolution over (1, 2, 2, 2)·128
  channels, attention at 16×16, skip rescaling, zero-init output layers."""
  _sde_settings(config, sde, continuous)
  m = config.model
  m.name = "ncsnpp"
  m.nf = 128
  m.ch_mult = (1, 2, 2, 2)
  m.num_res_blocks = 8 if deep else 4
  m.attn_resolutions = (16,)
  m.resamp_with_conv = True
  m.conditional = True
  m.fir_kernel = [1, 3, 3, 1]
  m.skip_rescale = True
  m.resblock_type = "biggan"
  m.progressive = "none"
  m.progressive_combine = "sum"
  m.attention_type = "ddpm"
  m.init_scale = 0.0
  m.fourier_scale = 16
  m.conv_size = 3
  if deep:
    config.training.n_iters = 950001
  return m


def ncsnpp(config, sde: str = "vesde", continuous: bool = True, deep: bool = False):
  """NCSN++ (FIR, BigGAN blocks, residual input pyramid); VE uses Fourier features and scale_by_sigma."""
  m = _ncsnpp_family(config, sde, continuous, deep)
  m.fir = True
  m.progressive_input = "residual"
  m.scale_by_sigma = sde == "vesde"
  m.embedding_type = "fourier" if sde == "vesde" and continuous else "positional"
  return config


def ncsnpp_hires(config, sigma_max=None):
  """High-resolution NCSN++ (the official 256² and 1024² settings) on top of `ncsnpp(...)`:
  output_skip / input_skip pyramids.  256²: nf = 128 over seven resolutions, two blocks each; 1024²:
  nf = 16 over eight resolutions (ch_mult up to 32), one block each, EMA 0.9999.  `sigma_max`: the VE
  σ_max of the official file where it differs from the dataset default (church 380, FFHQ / CelebA-HQ
  256² 348)."""
  m = config.model
  if config.data.image_size >= 1024:
    m.nf = 16
    m.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
    m.num_res_blocks = 1
    m.ema_rate = 0.9999
  else:
    m.nf = 128
    m.ch_mult = (1, 1, 2, 2, 2, 2, 2)
    m.num_res_blocks = 2
  if sigma_max is not None:
    m.sigma_max = float(sigma_max)
  m.attn_resolutions = (16,)
  m.fourier_scale = 16
  m.progressive = "output_skip"
  m.progressive_input = "input_skip"
  m.progressive_combine = "sum"
  m.resblock_type = "biggan"
  m.fir = True
  m.skip_rescale = True
  m.init_scale = 0.0
  return config


def ddpmpp(config, sde: str = "vpsde", continuous: bool = True, deep: bool = False):
  """DDPM++ (no FIR, BigGAN blocks, no pyramids, positional embedding)."""
  m = _ncsnpp_family(config, sde, continuous, deep)
  m.fir = False
  m.progressive_input = "none"
  m.embedding_type = "positional"
  m.scale_by_sigma = sde == "vesde"
  return config


def ddpm(config, sde: str = "vpsde", continuous: bool = False):
  """The DDPM U-Net (35.7M parameters on CIFAR-10).  Like the official configs it leaves
  model.embedding_type at the dataset default (the U-Net always embeds the timestep sinusoidally)."""
  _sde_settings(config, sde, continuous)
  m = config.model
  m.name = "ddpm"
  m.scale_by_sigma = sde == "vesde"
  m.normalization = "GroupNorm"
  m.nonlinearity = "swish"
  m.nf = 128
  m.ch_mult = (1, 2, 2, 2)
  m.num_res_blocks = 2
  m.attn_resolutions = (16,)
  m.resamp_with_conv = True
  m.conditional = True
  return config


def ddpm_hires(config):
  """DDPM at 256x256 (Ho et al.; official vp/ddpm/{bedroom,church,celebahq}) on top of `ddpm(...)`:
  ch_mult (1, 1, 2, 2, 4, 4), 1000 noise levels, learning rate 2e-5."""
  m = config.model
  m.ch_mult = (1, 1, 2, 2, 4, 4)
  m.num_res_blocks = 2
  m.attn_resolutions = (16,)
  m.num_scales = 1000
  config.optim.lr = 2e-5
  return config


def _annealed_langevin(config, n_steps_each: int, snr: float):
  s = config.sampling
  s.method = "pc"
  s.predictor = "none"
  s.corrector = "annealed_langevin"  # the official configs' 'ald'
  s.n_steps_each = n_steps_each
  s.snr = snr


def _ncsn_family(config, name: str, scale_by_sigma: bool, num_scales: int, sigma_max, ema_rate: float,
                 lr: float):
  _sde_settings(config, "vesde", False)
  config.training.batch_size = 128
  m = config.model
  m.name = name
  m.scale_by_sigma = scale_by_sigma
  if sigma_max is not None:
    m.sigma_max = float(sigma_max)
  m.sigma_min = 0.01
  m.num_scales = num_scales
  m.ema_rate = ema_rate
  m.normalization = "InstanceNorm++"
  m.nonlinearity = "elu"
  m.nf = 128
  m.interpolation = "bilinear"
  o = config.optim
  o.lr = lr
  o.warmup = 0
  o.grad_clip = -1.0                  # no gradient clipping
  return config


def ncsn(config, num_scales: int = 10, sigma_max=1.0, ema_rate: float = 0.0, n_steps_each: int = 100,
         snr: float = 0.316):
  """NCSN (v1): conditional InstanceNorm++ RefineNet, annealed Langevin, Adam 1e-3.  The defaults are
  NCSN itself (10 noise levels σ ∈ [0.01, 1], no EMA, 100 Langevin steps per level); the official
  ablations (NCSNv2 techniques) change num_scales / sigma_max (None: the dataset's) / ema_rate and the
  sampler's n_steps_each / snr."""
  _ncsn_family(config, "ncsn", False, num_scales, sigma_max, ema_rate, 1e-3)
  _annealed_langevin(config, n_steps_each, snr)
  return config


def ncsnv2(config, num_scales: int = 232, sigma_max=None, ema_rate: float = 0.999, n_steps_each: int = 5,
           snr: float = 0.176):
  """NCSNv2: unconditional RefineNet (64 / 128 / 256 variant by image size), output divided by σ,
  annealed Langevin, Adam 1e-4.  sigma_max None: the dataset default (CIFAR-10 50, CelebA 90)."""
  from score_sde_jax.models.ncsnv2 import get_ncsnv2_name
  _ncsn_family(config, get_ncsnv2_name(int(config.data.image_size)), True, num_scales, sigma_max, ema_rate,
               1e-4)
  _annealed_langevin(config, n_steps_each, snr)
  return config


def mnist_ncsnpp(sde: str = "vesde") -> ml_collections.ConfigDict:
  """A small NCSN++ / DDPM++ for MNIST 28x28 (28 → 14 → 7), about 7.0M parameters: trains to good
  samples in roughly 20 minutes on one H100 (30k steps at batch 128).

  VE: NCSN++-style (FIR, BigGAN blocks, residual input pyramid, Fourier features, scale_by_sigma).
  VP / sub-VP: DDPM++-style (no FIR, positional embedding).  `training.likelihood_weighting` and
  `training.importance_sampling` are switches (off by default).
  """
  config = mnist_config()
  if sde == "vesde":
    ncsnpp(config, sde, continuous=True)
  else:
    ddpmpp(config, sde, continuous=True)
  m = config.model
  m.nf = 64
  m.ch_mult = (1, 2, 2)
  m.num_res_blocks = 2
  m.attn_resolutions = (7,)
  m.dropout = 0.1
  m.ema_rate = 0.999
  t = config.training
  t.n_iters = 30001
  t.likelihood_weighting = False
  t.importance_sampling = False
  config.sampling.num_samples = 64
  return config

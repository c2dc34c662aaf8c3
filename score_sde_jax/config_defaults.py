"""Default ml-collections configs shared by the files under `configs/`.

Field names follow the official score_sde code (`training.sde`, `model.num_scales`, `data.centered`, …) so
that its config files carry over; additions are commented.  Config files under `configs/` import these
defaults from the installed package, so they load from any working directory.
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Fields every config has (image or toy)."""
  config = ml_collections.ConfigDict()
  config.seed = 42

  config.training = training = ml_collections.ConfigDict()
  training.sde = "vesde"              # 'vesde' | 'vpsde' | 'subvpsde'
  training.continuous = True
  training.reduce_mean = False
  training.likelihood_weighting = False  # official switch: True means weighting='likelihood'
  training.weighting = "sigma2"       # added: 'sigma2' (λ=σ²) | 'likelihood' (λ=g²) | 'none' (λ=1)
  training.importance_sampling = False  # added: t ~ g²/σ² for the likelihood weighting (ScoreFlow)
  training.loss = "dsm"               # added: 'dsm' | 'esm' | 'ssm' | 'ssm_vr' (the last three: toy data)
  training.batch_size = 128
  training.n_iters = 1300001
  training.snapshot_freq = 50000
  training.log_freq = 50
  training.eval_freq = 100
  training.snapshot_freq_for_preemption = 10000
  training.snapshot_sampling = True
  training.snapshot_weights = "ema"   # added: weights of the snapshot samples: 'ema' (paper) | 'raw'
  training.n_jitted_steps = 1         # added: train steps per compiled lax.scan
  training.task = "score"             # added: what is trained: 'score' (the score model s_θ(x, t[, y])) |
                                      # 'classifier' (p(y | x) on clean data, e.g. the FID-MNIST feature net) |
                                      # 'noise_classifier' (p_t(y | x(t)) on x(t) ~ p_0t(x(t) | x(0)),
                                      # t ~ U[eps, 1], for classifier guidance); see classifier.py
  training.label_dropout = 0.0        # added: class-conditional score models (model.num_classes > 0):
                                      # the probability that a label is replaced by the null class ∅ =
                                      # num_classes (classifier-free guidance's p_uncond; 0.1-0.2 usual)

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = "pc"              # 'pc' | 'ode' | 'ald' (annealed Langevin) | fast samplers: 'ddim' |
                                      # 'edm_heun' | 'edm_euler' | 'dpm_solver' | 'dpm_solver_pp'
  sampling.predictor = "reverse_diffusion"
  sampling.corrector = "langevin"
  sampling.n_steps_each = 1
  sampling.noise_removal = True
  sampling.probability_flow = False
  sampling.snr = 0.16
  sampling.order = "predictor_first"  # added: 'predictor_first' (paper) | 'corrector_first' (official)
  sampling.eps = 1e-3                 # added
  sampling.ode_solver = "rk45"        # added: 'rk45' (scipy's RK45, the official solver, on the
                                      # device; chosen by docs/ode_solvers.md) | 'tsit5' | 'dopri5' |
                                      # 'bosh3' (adaptive) | 'heun' | 'euler' (with ode_num_steps > 0)
  sampling.ode_rtol = 1e-5            # added
  sampling.ode_atol = 1e-5            # added
  sampling.ode_num_steps = 0          # added: >0 selects fixed steps (heun / euler)
  sampling.ode_controller = "batch"   # added: one error norm for the batch ('batch', as the official
                                      # code) | 'per_example' (each sample its own steps); see ode.py
  sampling.ald_step_lr = 2e-5         # added: ε of annealed Langevin dynamics
  sampling.num_samples = 64           # added: samples drawn at each snapshot
  sampling.num_steps = 50             # added: fast samplers: steps ('ddim', 'edm_euler': NFE = num_steps;
                                      # 'edm_heun': 2 num_steps - 1) or the NFE budget ('dpm_solver',
                                      # 'dpm_solver_pp'); +1 NFE with noise_removal (the Tweedie step)
  sampling.ddim_eta = 0.0             # added: DDIM eta in [0, 1]: 0 deterministic (ODE), 1 ancestral (DDPM)
  sampling.edm_rho = 7.0              # added: EDM: rho of the Karras noise schedule
  sampling.edm_s_churn = 0.0          # added: EDM Alg. 2 S_churn (0: deterministic, Alg. 1)
  sampling.edm_s_tmin = 0.0           # added: churn only where S_tmin <= sigma~ <= S_tmax (sigma~ = s/m)
  sampling.edm_s_tmax = 1e30          # added: EDM's infinity, finite so that config.json stays plain JSON
  sampling.edm_s_noise = 1.0          # added: EDM S_noise
  sampling.solver_order = 3           # added: DPM-Solver order 1 | 2 | 3
  sampling.dpm_order_schedule = "fast"  # added: 'fast' (the papers' order mix for the NFE) | 'fixed'
  sampling.dpm_thresholding = False   # added: DPM-Solver++ dynamic thresholding of x0-hat to the data range
                                      # ([-1, 1] if data.centered else [0, 1]); refused for toy data
  sampling.dpm_threshold_ratio = 0.995  # added: the thresholding quantile

  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.begin_ckpt = 1
  evaluate.end_ckpt = 26
  evaluate.batch_size = 1024
  evaluate.enable_sampling = False
  evaluate.num_samples = 50000
  evaluate.enable_loss = True
  evaluate.enable_bpd = False
  evaluate.bpd_dataset = "test"
  evaluate.num_repeats = 1            # added: passes with fresh dequantization noise and probes
  evaluate.divergence = "hutchinson_rademacher"  # added: | 'hutchinson_gaussian' | 'exact'
  evaluate.num_probes = 1             # added
  evaluate.rtol = 1e-5                # added
  evaluate.atol = 1e-5                # added
  evaluate.eps = 1e-5                 # added
  evaluate.solver = "rk45"            # added: as sampling.ode_solver (the adaptive ones)
  evaluate.feature_net = "inception"  # added: FID/KID/IS features (enable_sampling): 'inception'
                                      # (pytorch-fid's FID Inception-v3) | 'mnist' (metrics.MNISTClassifier)
  evaluate.feature_net_path = ""      # added: inception: its .pth ('' = $SCORE_SDE_INCEPTION or ~/.cache/
                                      # score_sde_jax/); mnist: a .msgpack of its variables or its workdir
  evaluate.ref_stats = ""             # added: reference statistics .npz (pytorch-fid mu/sigma or official
                                      # pool_3); '' = computed from data.dataset's ref_split, cached
  evaluate.ref_split = "train"        # added: split of the reference statistics (a tfds slice such as
                                      # 'train[:10000]' works too)
  evaluate.stats_dir = ""             # added: cache of reference statistics ('' = $SCORE_SDE_STATS_DIR or
                                      # ~/.cache/score_sde_jax/stats)
  evaluate.kid_subset_size = 1000     # added: KID subset size
  evaluate.kid_reservoir_size = 10000  # added: features kept per set (a uniform sample) that KID's subsets
                                      # are drawn from (bounds the memory: 10000 x 2048 float32 = 80 MB)
  evaluate.kid_num_subsets = 100      # added: KID subsets averaged
  evaluate.is_splits = 10             # added: Inception Score splits

  config.data = data = ml_collections.ConfigDict()
  data.dataset = "CIFAR10"
  data.centered = False
  data.uniform_dequantization = False
  data.random_flip = True
  data.image_size = 32
  data.num_channels = 3
  data.tfds_data_dir = ""             # added: '' = tfds default (~/tensorflow_datasets or $TFDS_DATA_DIR)

  config.model = model = ml_collections.ConfigDict()
  model.name = "ncsnpp"
  model.sigma_min = 0.01
  model.sigma_max = 50.0
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.0
  model.dropout = 0.1
  model.ema_rate = 0.9999
  model.embedding_type = "fourier"
  model.fourier_scale = 16.0
  model.scale_by_sigma = False
  model.nf = 128
  model.dtype = "float32"             # added: compute dtype ('bfloat16': bf16 compute, fp32 params)
  model.remat = False                 # added: rematerialise blocks to save memory
  model.num_classes = 0               # added: > 0 conditions the score model on a class label (a learned
                                      # embedding of num_classes + 1 rows, the last the null class ∅);
                                      # the number of classes of a classifier (training.task)
  model.blocks_per_group = 4          # added: the noise-conditional WideResNet classifier (official
  model.channel_multiplier = 10       # WRN-28-10: depth 6·4 + 4 = 28, width ×10); models/wideresnet.py

  config.optim = optim = ml_collections.ConfigDict()
  optim.weight_decay = 0.0
  optim.optimizer = "Adam"
  optim.lr = 2e-4
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.warmup = 5000
  optim.grad_clip = 1.0
  return config


def image_model_fields(config):
  """The image networks' model fields (NCSN++ / DDPM++ / DDPM / NCSN) with the official defaults."""
  m = config.model
  m.normalization = "GroupNorm"
  m.nonlinearity = "swish"
  m.ch_mult = (1, 2, 2, 2)
  m.num_res_blocks = 4
  m.attn_resolutions = (16,)
  m.resamp_with_conv = True
  m.conditional = True
  m.fir = False
  m.fir_kernel = [1, 3, 3, 1]
  m.skip_rescale = True
  m.resblock_type = "biggan"
  m.progressive = "none"
  m.progressive_input = "none"
  m.progressive_combine = "sum"
  m.attention_type = "ddpm"
  m.init_scale = 0.0
  m.conv_size = 3
  m.interpolation = "bilinear"
  return config


TOY_DATASETS = ("mixture1d", "ring8", "checkerboard", "moons", "swissroll")   # datasets/toy.py builds them


def is_toy(config) -> bool:
  """Whether `config` trains on a toy (low-dimensional, in-memory) dataset rather than images."""
  return str(config.data.dataset).lower() in TOY_DATASETS


def uses_labels(config) -> bool:
  """Whether training reads class labels: a classifier (training.task) or a class-conditional score
  model (model.num_classes > 0)."""
  return str(config.training.task) != "score" or int(config.model.num_classes) > 0


def toy_config(sde: str = "vesde", dataset: str = "ring8") -> ml_collections.ConfigDict:
  """A small config for 1-D/2-D toy data: MLP score network, short CPU training."""
  config = base_config()
  config.seed = 0
  training = config.training
  training.sde = sde
  training.batch_size = 512
  training.n_iters = 3000
  training.snapshot_freq = 3000      # one snapshot (samples + picture) at the end
  training.snapshot_freq_for_preemption = 500
  training.log_freq = 100
  training.eval_freq = 500
  training.reduce_mean = True
  data = config.data
  data.dataset = dataset
  data.centered = True
  data.random_flip = False
  data.image_size = 0                 # unused for toy data
  data.num_channels = 0
  data.num_train = 100000             # added (toy): size of the fixed training sample
  data.num_test = 1000                # added (toy): size of the held-out sample for NLL
  model = config.model
  model.name = "mlp"
  model.nf = 128
  model.num_layers = 3
  model.dropout = 0.0
  model.ema_rate = 0.999
  if sde == "vesde":
    model.sigma_min = 0.01
    model.sigma_max = 10.0
    model.embedding_type = "fourier"
    model.fourier_scale = 1.0         # log σ spans ~7 units here: scale 16 (images) gives a noisy embedding
    model.scale_by_sigma = True
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
  else:
    model.embedding_type = "positional"
    model.scale_by_sigma = False
    config.sampling.predictor = "euler_maruyama"
    config.sampling.corrector = "none"
  model.num_scales = 500
  optim = config.optim
  optim.lr = 2e-3
  optim.warmup = 100
  optim.grad_clip = 1.0
  config.sampling.num_samples = 1000
  evaluate = config.eval
  evaluate.batch_size = 1000
  evaluate.divergence = "exact"
  evaluate.enable_bpd = True
  return config


def defaults_for(config) -> ml_collections.ConfigDict:
  """The default config of the same kind as `config`: the toy defaults of its dataset and SDE, or the
  base defaults with the image networks' model fields."""
  dataset = str(config.data.dataset) if "data" in config and "dataset" in config.data else ""
  if dataset.lower() in TOY_DATASETS:
    sde = str(config.training.sde) if "training" in config and "sde" in config.training else "vesde"
    return toy_config(sde.strip().lower() if sde.strip().lower() in ("vesde", "vpsde", "subvpsde")
                      else "vesde", dataset.lower())
  return image_model_fields(base_config())


def complete(config) -> list:
  """Fills, in place, every field `config` lacks with its default (`defaults_for`): the one place where an
  old or partial config (a config file from before a field existed, a workdir's saved config.json) gets
  its missing settings.  Returns the filled fields as 'a.b=value' strings, for the caller to report.
  Code then reads `config.a.b` directly, never `.get(key, default)`."""
  filled = []

  def fill(node, default, prefix):
    for key, value in default.items():
      if key not in node:
        with node.unlocked():
          node[key] = value
        filled.append(f"{prefix}{key}={value!r}")
      elif isinstance(value, ml_collections.ConfigDict) and isinstance(node[key], ml_collections.ConfigDict):
        fill(node[key], value, f"{prefix}{key}.")

  fill(config, defaults_for(config), "")
  return filled


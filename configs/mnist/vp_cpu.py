"""MNIST 28x28, VP SDE, a DDPM++ small enough to train on a 2-core CPU (about 0.31M parameters).

The CPU stand-in for `configs/mnist/vp.py` (7.0M parameters, sized for ~20 minutes on one H100): nf=16,
one residual block per resolution, no attention, no dropout (a few epochs are far from overfitting),
likelihood weighting with importance sampling of t (ScoreFlow's recipe for the best bits/dim), a short
warm-up and a larger learning rate for the short budget.  About 0.8 s per step at batch 64 on 2 cores:
4000 steps take roughly an hour.  Snapshot sampling is off (1000 PC steps cost minutes on a CPU);
draw samples afterwards with `scripts/sample.py`.
"""
from score_sde_jax import image_configs


def get_config():
  config = image_configs.mnist_ncsnpp("vpsde")
  m = config.model
  m.nf = 16
  m.ch_mult = (1, 2, 2)
  m.num_res_blocks = 1
  m.attn_resolutions = ()
  m.dropout = 0.0
  m.ema_rate = 0.999
  t = config.training
  t.batch_size = 64
  t.n_iters = 4001
  t.snapshot_freq = 1000
  t.snapshot_freq_for_preemption = 250
  t.log_freq = 50
  t.eval_freq = 0
  t.snapshot_sampling = False
  t.likelihood_weighting = True
  t.importance_sampling = True
  config.optim.lr = 5e-4
  config.optim.warmup = 200
  config.eval.batch_size = 500
  return config

"""A noise-conditional digit classifier p_t(y | x(t)) for classifier guidance of the CPU stand-in
`configs/mnist/vp_cpu.py`: the same VP SDE, data scaling ([-1, 1]) and time labels (999 t), a small CNN
(`classifier_cnn`, nf=16: 16-32-64 channels with a time bias per block, ~0.1M parameters).

    python scripts/train.py --config configs/mnist/vp_cpu_classifier.py --workdir runs/mnist_vp_cpu_classifier

The snapshot reports the test accuracy at t ∈ {0.001, 0.1, 0.25, 0.5, 0.75, 1} (eval/accuracy_t<t>); then
    python scripts/sample.py --workdir runs/mnist_vp_cpu --class_label all \\
        --classifier runs/mnist_vp_cpu_classifier --guidance_scale 1
draws one row per digit.
"""
from score_sde_jax import image_configs


def get_config():
  config = image_configs.mnist_ncsnpp("vpsde")   # the SDE and data settings of vp_cpu.py
  t = config.training
  t.task = "noise_classifier"
  t.likelihood_weighting = False
  t.importance_sampling = False
  t.batch_size = 128
  t.n_iters = 6001
  t.snapshot_freq = 500
  t.snapshot_freq_for_preemption = 250
  t.snapshot_sampling = False
  m = config.model
  m.name = "classifier_cnn"
  m.num_classes = 10
  m.nf = 16
  m.dropout = 0.0
  m.ema_rate = 0.99
  config.optim.lr = 1e-3
  config.optim.warmup = 100
  config.eval.batch_size = 1000
  return config

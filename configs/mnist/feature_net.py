"""The FID-MNIST feature net: `metrics.mnist_features.MNISTClassifier` (a small CNN, 0.43M parameters)
trained as a plain digit classifier (`training.task='classifier'`) by the project's trainer.

    python scripts/train.py --config configs/mnist/feature_net.py --workdir runs/mnist_feature_net

Its penultimate activations (128-d) give "FID-MNIST" and KID, its softmax the Inception-Score analogue
(`eval.feature_net='mnist'`, `eval.feature_net_path=runs/mnist_feature_net`).  About three epochs at batch 128
reach ≥ 99% test accuracy (the accuracy is logged at each snapshot, eval/accuracy); the EMA weights are the
ones used.  Images enter in [0, 1] (data.centered=False; the network maps them to [-1, 1] itself), without
dequantisation noise or flips.
"""
from score_sde_jax import image_configs


def get_config():
  config = image_configs.mnist_config()
  t = config.training
  t.task = "classifier"
  t.batch_size = 128
  t.n_iters = 1500                  # 3.2 epochs of the 60k training images
  t.snapshot_freq = 500
  t.snapshot_freq_for_preemption = 250
  t.log_freq = 50
  t.eval_freq = 0
  t.snapshot_sampling = False       # a classifier draws no samples; its snapshot reports test accuracy
  config.data.centered = False
  config.data.uniform_dequantization = False
  m = config.model
  m.name = "mnist_feature_net"
  m.num_classes = 10
  m.ema_rate = 0.99
  o = config.optim
  o.lr = 1e-3
  o.warmup = 100
  o.grad_clip = -1.0
  config.eval.batch_size = 1000
  return config

#!/usr/bin/env python
"""Training-loop overhead: steps/s and images/s of the full loop (`score_sde_jax.train.train`: data
iterator, host-to-device transfer, sharded step with EMA, metric fetching and logging, progress bar and
periodic checkpoints) against the bare compiled train step on one fixed device-resident batch, same
config, same devices.

    python benchmarks/train.py                                  # toy ring8 VE config
    python benchmarks/train.py --config configs/mnist/ve.py --steps 50 --config.training.batch_size=32

Compilation is excluded from both numbers (warm-up steps first).  Prints one table.
"""
import os
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (default: toy VE ring8).", lock_config=False)
flags.DEFINE_integer("steps", 500, "Timed steps.")
flags.DEFINE_integer("warmup", 20, "Untimed steps first (compilation); the loop skips its first log "
                     "window(s) up to this step.")
flags.DEFINE_bool("checkpoints", True, "Keep the preemption checkpoints in the full loop.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  import numpy as np
  from score_sde_jax import config_defaults, datasets, models, sde as sde_lib
  from score_sde_jax import train as train_lib
  from score_sde_jax.run import parallel
  from score_sde_jax.train import loop

  config = FLAGS.config if FLAGS.config is not None else config_defaults.toy_config("vesde", "ring8")
  n, w = FLAGS.steps, FLAGS.warmup
  t = config.training
  t.n_iters = n + w
  t.snapshot_sampling = False
  t.snapshot_freq = 10 ** 9
  if not FLAGS.checkpoints:
    t.snapshot_freq_for_preemption = 10 ** 9
  config.eval.enable_loss = False
  mesh = parallel.make_mesh()
  bs = int(t.batch_size)

  # Bare compiled step on one device-resident batch.
  sde = sde_lib.sde_from_config(config)
  model = models.get_model(config)
  it = loop.open_train_iterator(config, bs)
  host = next(it)
  scaler = datasets.get_data_scaler(config)
  rep, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  step = train_lib.make_train_step(config, sde, model, scaler=scaler)
  state = jax.jit(lambda k: train_lib.create_train_state(config, model, k, host["image"].shape),
                  out_shardings=rep)(jax.random.PRNGKey(0))
  p_step = jax.jit(step, in_shardings=(rep, bsh), out_shardings=(rep, rep))
  batch = {"image": parallel.host_to_global(np.asarray(host["image"], np.float32), bsh)}
  for _ in range(w):
    state, m = p_step(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(n):
    state, m = p_step(state, batch)
  jax.block_until_ready((state, m))
  bare = n / (time.perf_counter() - t0)

  # Full loop.  Its own per-window rates (each log window ends with a device sync) after the windows
  # that contain compilation; the final checkpoint and shutdown are not counted.
  import json
  log_freq = int(t.log_freq)
  first = -(-w // log_freq) * log_freq          # first window boundary at or after the warm-up
  t.n_iters = first + -(-n // log_freq) * log_freq
  with tempfile.TemporaryDirectory() as d:
    train_lib.train(config, os.path.join(d, "w"), progress=True, report=lambda *_: None)
    rows = [json.loads(l) for l in open(os.path.join(d, "w", "logs", "metrics.jsonl"))]
  rows = [r for r in rows if "train/steps_per_sec" in r and r["step"] > first]
  steps = sum(log_freq for _ in rows)
  full = steps / sum(log_freq / r["train/steps_per_sec"] for r in rows)

  dev = jax.devices()[0]
  print(f"\ndevice: {mesh.devices.size} x {dev.device_kind} ({dev.platform}); model {config.model.name} "
        f"nf={config.model.nf}; data {config.data.dataset}; global batch {bs}; {n} timed steps; "
        f"log_freq {t.log_freq}; preemption checkpoint every {t.snapshot_freq_for_preemption} steps")
  print(f"{'':28s}{'steps/s':>10s}{'images/s':>12s}")
  print(f"{'bare compiled step':28s}{bare:10.1f}{bare * bs:12.0f}")
  print(f"{'full training loop':28s}{full:10.1f}{full * bs:12.0f}")
  print(f"loop overhead: {100 * (1 - full / bare):.1f}% (target on a GPU: <= 5%)")


if __name__ == "__main__":
  app.run(main)

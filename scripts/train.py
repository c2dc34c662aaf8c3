#!/usr/bin/env python
"""Train a score-based model: `python scripts/train.py --config configs/toy/ve_ring8.py --workdir runs/ring8`.

Any config field can be overridden on the command line (`--config.training.n_iters=500`).  Running the
same command again on the same workdir resumes from its newest good checkpoint; a workdir whose saved
config differs in the model, data or optimisation is refused (`--force_resume` to continue anyway).
For toy data, after training it writes pictures of samples and of the learned score field and prints
the test NLL.  Multi-host: pass --multihost (or set SCORE_SDE_DISTRIBUTED=1) and run the same command on
every host (TPU pods, SLURM: nothing else; elsewhere JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID; README "Sampling and evaluating on a pod").  A run resumes on any number of devices or
hosts (train/restore.py says what stays bit-identical).

Exit status: 0 when training finished, 2 for config/data errors, 3 when the loss became NaN/Inf,
4 when another process of a multi-host run stopped, 128+signal when stopped by SIGTERM/SIGINT after
writing a checkpoint.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (ml_collections).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_bool("force_resume", False, "Resume even if the saved config differs in model/data/optim.")
flags.DEFINE_bool("multihost", False, "Multi-host run (also: SCORE_SDE_DISTRIBUTED=1): every host runs the "
                  "same command; JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID where the cluster "
                  "is not detected (TPU pods, SLURM).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("toy_report", True, "For toy data: pictures and test NLL after training.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  from score_sde_jax.train import parallel
  try:
    parallel.initialize_distributed(True if FLAGS.multihost else None)
  except parallel.DistributedError as e:
    print(f"ERROR: {e}", file=sys.stderr)
    sys.exit(2)
  # A SIGTERM/SIGINT stop (128+signal) is agreed by all hosts after a common checkpoint: a clean exit.
  parallel.run_main(_main, clean_exit_codes=range(128, 160))


def _main():
  import jax
  from score_sde_jax import train as train_lib

  import time
  t0 = time.time()
  config = FLAGS.config
  try:
    result = train_lib.train(config, FLAGS.workdir, force_resume=FLAGS.force_resume,
                             progress=FLAGS.progress)
  except train_lib.ConfigError as e:
    print(f"ERROR: {e}", file=sys.stderr)
    sys.exit(2)
  except train_lib.NonFiniteLossError as e:
    print(f"ERROR: {e}", file=sys.stderr)
    sys.exit(3)
  if result.preempted:
    sys.exit(128 + int(result.signal or 15))
  outputs = [f"checkpoints: {result.checkpoint_dir}", f"TensorBoard logs: {result.log_dir}",
             f"samples: {result.sample_dir}"]
  t1 = time.time()
  timing = f"wall time: training {t1 - t0:.1f}s (compilation, snapshots and checkpoints included)"
  if train_lib.is_toy(config) and FLAGS.toy_report and jax.process_index() == 0:
    from score_sde_jax.train import toy_report
    toy_report.toy_report(config, FLAGS.workdir, result.state, samples=result.last_samples)
    timing += f", samples + pictures + test NLL {time.time() - t1:.1f}s"
  if jax.process_index() == 0:
    print(timing.capitalize() + ".")
    print("Everything is in " + os.path.abspath(FLAGS.workdir) + ": " + "; ".join(outputs))


if __name__ == "__main__":
  app.run(main)

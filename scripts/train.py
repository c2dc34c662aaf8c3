#!/usr/bin/env python
"""Train a score-based model: `python scripts/train.py --config configs/toy/ve_ring8.py --workdir runs/ring8`.

Any config field can be overridden on the command line (`--config.training.n_iters=500`).  Running the
same command again on the same workdir resumes from its newest good checkpoint; a workdir whose saved
config differs in the model, data or optimisation is refused (`--force_resume` to continue anyway).
For toy data, after training it writes pictures of samples and of the learned score field and prints
the test NLL.  Multi-host: pass --multihost (or set SCORE_SDE_DISTRIBUTED=1) and run the same command on
every host (TPU pods, SLURM: nothing else; elsewhere JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID; README "Sampling and evaluating on a pod").  A run resumes on any number of devices or
hosts (run/restore.py says what stays bit-identical).

Exit status: 0 when training finished; 2 for bad input — flags, the config, the data, a workdir that
is a file or is in use by another training (one line `ERROR: ...`; nothing in the workdir was written);
3 when the loss became NaN/Inf; 4 when another process of a multi-host run stopped; 5 when a checkpoint
or log could not be written (disk full, permission denied: one line naming the intact checkpoint, the
details in <workdir>/logs/errors.log); 128+signal when stopped by SIGTERM/SIGINT after writing a
checkpoint.  `--verbose` adds the traceback to an ERROR line.  One training per workdir: a second one is
refused, naming the process that holds `<workdir>/.lock` (released when that process ends, however).
"""
import os
import sys

FLAGS = None   # the parsed flags (score_sde_jax.cli.run gives every run its own)


def define_flags(fv):
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Training config file (ml_collections).",
                                  lock_config=True, flag_values=fv)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.", flag_values=fv)
  flags.DEFINE_bool("force_resume", False, "Resume even if the saved config differs in model/data/optim "
                    "(the checkpoints must still fit the new config's train state).", flag_values=fv)
  from score_sde_jax import cli
  cli.define_run_flags(fv)
  flags.DEFINE_bool("toy_report", True, "For toy data: pictures and test NLL after training.", flag_values=fv)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def main(fv):
  global FLAGS
  FLAGS = fv
  from score_sde_jax import cli
  # A SIGTERM/SIGINT stop (128+signal) is agreed by all hosts after a common checkpoint: a clean exit.
  return cli.start_and_run(FLAGS, _main, clean_exit_codes=range(128, 160))


def _main():
  import time

  import jax
  from score_sde_jax import train as train_lib
  from score_sde_jax import cli

  t0 = time.time()
  config = FLAGS.config
  try:
    result = train_lib.train(config, FLAGS.workdir, force_resume=FLAGS.force_resume,
                             progress=FLAGS.progress, keep_lock=True)
  except train_lib.NonFiniteLossError as e:
    cli.print_error(e, e, FLAGS.verbose)
    return 3
  except OSError as e:     # a checkpoint or log that could not be written (CheckpointWriteError included)
    cli.print_error(f"{e}{getattr(e, 'details', '')}", e, FLAGS.verbose)
    return cli.EXIT_IO_ERROR
  try:
    if result.preempted:
      return 128 + int(result.signal or 15)
    outputs = [f"checkpoints: {result.checkpoint_dir}", f"TensorBoard logs: {result.log_dir}",
               f"samples: {result.sample_dir}"]
    t1 = time.time()
    timing = f"wall time: training {t1 - t0:.1f}s (compilation, snapshots and checkpoints included)"
    if train_lib.is_toy(config) and FLAGS.toy_report and jax.process_index() == 0:
      from score_sde_jax.train import toy_report
      try:
        toy_report.toy_report(config, FLAGS.workdir, result.state, samples=result.last_samples)
      except OSError as e:
        cli.print_error(f"training finished (checkpoints in {result.checkpoint_dir}), but writing the toy "
                        f"report failed: {e}", e, FLAGS.verbose)
        return cli.EXIT_IO_ERROR
      timing += f", samples + pictures + test NLL {time.time() - t1:.1f}s"
    if jax.process_index() == 0:
      print(timing.capitalize() + ".")
      print("Everything is in " + os.path.abspath(FLAGS.workdir) + ": " + "; ".join(outputs))
  finally:
    if result.lock is not None:
      result.lock.release()


def run(argv=None) -> int:
  """The script on `argv` (default sys.argv); returns the exit status (some paths raise SystemExit)."""
  from score_sde_jax import cli
  return cli.run(argv, doc=__doc__, define_flags=define_flags, main=main)


if __name__ == "__main__":
  sys.exit(run())

#!/usr/bin/env python
"""Bits/dim over a whole split and/or FID/KID/IS of samples, of a trained workdir or of any checkpoint:

  python scripts/evaluate.py --config configs/mnist/vp.py --workdir runs/mnist_vp --config.eval.enable_bpd=True
  python scripts/evaluate.py --config configs/subvp/cifar10_ddpmpp_deep_continuous.py \
      --checkpoint checkpoint_26.pth --config.eval.enable_bpd=True
  python scripts/evaluate.py --config configs/mnist/vp.py --workdir runs/mnist_vp \
      --config.eval.enable_sampling=True --config.eval.feature_net=mnist --config.eval.feature_net_path=runs/fnet

`--checkpoint`: an official JAX checkpoint (`checkpoint_<k>` or a directory of them), an official PyTorch
`.pth` or a workdir (`score_sde_jax.checkpoints`), its EMA weights (`--weights raw` for the training ones);
results go to `--workdir/eval/` or, without `--workdir`, to `<checkpoint>_outputs/eval/` beside it.

Evaluates the EMA parameters of the newest checkpoint (`--checkpoints=latest`), of every checkpoint with
index in [eval.begin_ckpt, eval.end_ckpt] (`--checkpoints=range`, index i = step i·training.snapshot_freq,
the official convention) or of given steps (`--checkpoints=5000,10000`), on every example of
`eval.bpd_dataset` exactly once, `eval.num_repeats` times (fresh dequantization noise and Hutchinson
probes, keys from (seed, repeat, batch)).  Solver and divergence: `eval.solver`, `eval.rtol`, `eval.atol`,
`eval.eps`, `eval.divergence` ('hutchinson_rademacher' | 'hutchinson_gaussian' | 'exact'),
`eval.num_probes`.  Image data: bits/dim of the 8-bit data (the convention is printed with the result);
toy data: NLL in nats/dim and bits/dim.  Also reports ScoreFlow's bound (`--bound`, default on).

Each batch is one compiled program sharded over all devices of all hosts; a checkpoint written on any
number of devices or hosts restores here, read-only (nothing in the workdir is moved or renamed; an
unreadable checkpoint is an error naming it).  Multi-host (`--multihost` or SCORE_SDE_DISTRIBUTED=1, every
host runs the same command; README "Sampling and evaluating on a pod"): each host reads its share of every
batch, the per-example results are gathered and process 0 alone writes the results and the summary, each
example counted once.  Per-batch results go to
`<workdir>/eval/*.jsonl` as they finish; rerunning the same command continues where it stopped; the
summary is written beside it as `.summary.json`.  The file is keyed by the weights' fingerprint, the model,
SDE and data config and the settings: anything else is computed afresh, saying which earlier file
differs.  Without --config the workdir's saved config is used.

FID/KID/IS (`eval.enable_sampling`; `score_sde_jax/sample_quality.py`): `eval.num_samples` samples of
`config.sampling` (any method) in batches of `eval.batch_size`, written per host in resumable chunks to
`<workdir>/eval/samples_<hash>/ckpt_<step>/` (a rerun reuses them), against the reference statistics of
`eval.ref_split` (computed once, cached in `eval.stats_dir`) or `eval.ref_stats`, with the features of
`eval.feature_net` ('inception': pytorch-fid's weights file; 'mnist': a trained classifier,
`eval.feature_net_path`).  One line per checkpoint; results appended to `<workdir>/eval/fid_*.jsonl`
(keyed by weights, sampler, feature net, reference), eval/fid, eval/kid, eval/is to `<workdir>/eval/logs`.

`--set a.b=value` overrides a field of the config (strict, as in sample.py: an unknown key is an error
naming the closest one).  When the EMA weights evaluated are still mostly the initialisation (step <
3/(1 − model.ema_rate)) one line says so (`--weights raw` evaluates the training weights).

Exit status: 0 done, 2 bad config / flags / missing workdir or checkpoint / unreadable data (one `ERROR:`
line; `--verbose` adds the traceback), 4 another process of a multi-host run stopped.
"""
import sys

FLAGS = None   # the parsed flags (score_sde_jax.cli.run gives every run its own)


def define_flags(fv):
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file (default: the workdir's saved config).",
                                  lock_config=True, flag_values=fv)
  flags.DEFINE_string("workdir", None, "Training workdir (holds config.json and checkpoints/); with "
                      "--checkpoint: where the results go.", flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "Evaluate this checkpoint instead of the workdir's: official JAX "
                      "checkpoint_<k> (or a directory of them), official PyTorch .pth, or a workdir.",
                      flag_values=fv)
  flags.DEFINE_enum("weights", "ema", ["ema", "raw"], "EMA weights (the paper's) or the raw training "
                    "weights.", flag_values=fv)
  flags.DEFINE_multi_string("set", [], "Override a field of the config (strict: the key must exist): "
                            "--set eval.num_repeats=2", flag_values=fv)
  flags.DEFINE_string("checkpoints", "latest", "'latest', 'range' (eval.begin_ckpt..end_ckpt) or steps "
                      "'5000,10000'.", flag_values=fv)
  flags.DEFINE_integer("batch_size", None, "Global batch (default eval.batch_size; padded to a multiple "
                       "of the device count).", flag_values=fv)
  flags.DEFINE_integer("max_examples", None, "Only the first n examples of the split.", flag_values=fv)
  flags.DEFINE_integer("seed", None, "Seed of the noise (default: config.seed).", flag_values=fv)
  flags.DEFINE_bool("bound", True, "Also compute ScoreFlow's variational bound.", flag_values=fv)
  flags.DEFINE_integer("bound_num_t", 16, "Monte Carlo draws of t per example for the bound.",
                       flag_values=fv)
  from score_sde_jax import cli
  cli.define_run_flags(fv)


def main(fv):
  global FLAGS
  FLAGS = fv
  from score_sde_jax import evaluation
  from score_sde_jax import cli
  return cli.start_and_run(FLAGS, _main, user_errors=(evaluation.EvalError, ValueError))


def run(argv=None) -> int:
  """The script on `argv` (default sys.argv); returns the exit status (some paths raise SystemExit)."""
  from score_sde_jax import cli
  return cli.run(argv, doc=__doc__, define_flags=define_flags, main=main)


def _main():
  import jax
  from score_sde_jax import eval_jobs, evaluation
  from score_sde_jax.run import config_utils, restore

  # Bad input raises: the guard of main() prints it as one ERROR line (exit 2).
  if FLAGS.workdir is None and FLAGS.checkpoint is None:
    raise evaluation.EvalError("pass --workdir (a training workdir) or --checkpoint (any checkpoint, "
                               "with --config).")
  if FLAGS.config is None and FLAGS.checkpoint is not None:
    raise evaluation.EvalError(f"pass --config <the config {FLAGS.checkpoint} was trained with>, e.g. "
                               f"configs/subvp/cifar10_ddpmpp_deep_continuous.py.")
  if FLAGS.config is not None:
    config = FLAGS.config
  else:
    try:
      config = restore.load_workdir_config(FLAGS.workdir)
    except FileNotFoundError as e:
      raise evaluation.EvalError(f"{e} Pass --config, or train first: python scripts/train.py "
                                 f"--config <config.py> --workdir {FLAGS.workdir}") from e
  config_utils.complete_config(config, print if jax.process_index() == 0 else (lambda *_: None))
  config_utils.apply_overrides(config, FLAGS.set)
  eval_jobs.run(config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, weights=FLAGS.weights,
                checkpoints=FLAGS.checkpoints, batch_size=FLAGS.batch_size, max_examples=FLAGS.max_examples,
                seed=FLAGS.seed, bound=FLAGS.bound, bound_num_t=FLAGS.bound_num_t, progress=FLAGS.progress)


if __name__ == "__main__":
  sys.exit(run())

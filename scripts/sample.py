#!/usr/bin/env python
"""Draw samples from a trained workdir or any checkpoint:

  python scripts/sample.py --workdir runs/ring8 --num_samples 1000
  python scripts/sample.py --config configs/vp/cifar10_ddpmpp_continuous.py --checkpoint checkpoint_8.pth

`--workdir`: the workdir's saved config (override any field with `--config.a.b=value` after `--config`
points to a config file, or with `--set a.b=value` on the saved one) and the EMA parameters of its newest
good checkpoint (or `--step`).  `--checkpoint`: an official JAX checkpoint (`checkpoint_<k>` or a directory
of them), an official PyTorch `checkpoint_<k>.pth`, or a workdir (see `score_sde_jax.checkpoints`); it
needs `--config` unless it is a workdir; `--weights raw` takes the training weights instead of the EMA.
Samples are drawn with the config's sampler (`sampling.method`, predictor, corrector, ...) in batches of
`--batch_size`, each batch one compiled program sharded over all devices, with a progress bar; they are
written in data space to `<out dir>/samples/sample_<step>.npz` (`samples`, `nfe`) and a PNG (image grid,
or a scatter beside test data for toy data).  The output directory is `--workdir`, or else
`<checkpoint>_outputs/` beside the checkpoint.  Nothing is written next to the checkpoints themselves,
and nothing in the workdir is moved or renamed: a checkpoint that cannot be read is skipped with one line.

Controllable generation (README "Controllable generation"): `--class_label K|all` with `--classifier
<noise-classifier workdir> --guidance_scale S` or `--cfg_weight W` (class-conditional models); `--inpaint
FILE --mask half|center|left|random|FILE`; `--colorize FILE`.  They also write `<out>_grid.png` with the
input, mask and result side by side (one row per class for --class_label all).

Any topology, many hosts (`--multihost`): README "Sampling and evaluating on a pod".  Batch i draws its
noise from fold_in(PRNGKey(--seed), i) whatever the sharding; a `--batch_size` that does not divide by
the device count is rounded down to a multiple of it (with a note).

`--set a.b=value` is strict: a key the config does not have (at any depth) is an error naming the
closest one, and the value must have the field's type.  When the EMA weights of a young checkpoint are
still mostly the initialisation (step < 3/(1 − model.ema_rate)) one line says so (`--weights raw`).

Exit status: 0 done, 2 bad config, flags or checkpoint (one `ERROR:` line; `--verbose` adds the
traceback), 4 another process of a multi-host run stopped.
"""
import os
import sys

FLAGS = None   # the parsed flags (score_sde_jax.cli.run gives every run its own)


def define_flags(fv):
  from absl import flags
  from ml_collections import config_flags
  flags.DEFINE_string("workdir", None, "Training workdir (holds config.json and checkpoints/); with "
                      "--checkpoint: where the samples go.", flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "Checkpoint to sample from instead of the workdir's: official JAX "
                      "checkpoint_<k> (or a directory of them), official PyTorch .pth, or a workdir.",
                      flag_values=fv)
  flags.DEFINE_enum("weights", "ema", ["ema", "raw"], "EMA weights (the paper's) or the raw training "
                    "weights.", flag_values=fv)
  config_flags.DEFINE_config_file("config", None, "Optional config file instead of the saved config.",
                                  lock_config=True, flag_values=fv)
  flags.DEFINE_multi_string("set", [], "Override a field of the config (strict: the key must exist): "
                            "--set sampling.method=ode", flag_values=fv)
  flags.DEFINE_integer("num_samples", None, "How many samples (default: sampling.num_samples).",
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", None, "Samples per compiled batch (default: eval.batch_size).",
                       flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: newest good one).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output .npz path (default: <workdir>/samples/sample_<step>.npz).",
                      flag_values=fv)
  flags.DEFINE_string("class_label", None, "Class-conditional sampling: a class index, or 'all' (one row "
                      "per class); with --classifier or --cfg_weight.", flag_values=fv)
  flags.DEFINE_string("classifier", None, "Workdir of a noise-conditional classifier (classifier guidance).",
                      flag_values=fv)
  flags.DEFINE_float("guidance_scale", 1.0, "Classifier-guidance scale (1: the exact conditional).",
                     flag_values=fv)
  flags.DEFINE_float("cfg_weight", None, "Classifier-free guidance weight w of a class-conditional model "
                     "(0: the plain conditional).", flag_values=fv)
  flags.DEFINE_string("inpaint", None, "Images (.npz/.png, values in [0, 1]) to inpaint.", flag_values=fv)
  flags.DEFINE_string("mask", None, "Inpainting mask: 'half' (default: the lower half is filled in), "
                      "'center', 'left', 'random', or a .npz/.png of 0/1 (1 = known).", flag_values=fv)
  flags.DEFINE_string("colorize", None, "Images (.npz/.png) to colourise (their grey is kept).",
                      flag_values=fv)
  from score_sde_jax import cli
  cli.define_run_flags(fv)


def main(fv):
  global FLAGS
  FLAGS = fv
  from score_sde_jax import cli
  return cli.start_and_run(FLAGS, _main, user_errors=(ValueError,))


def run(argv=None) -> int:
  """The script on `argv` (default sys.argv); returns the exit status (some paths raise SystemExit)."""
  from score_sde_jax import cli
  return cli.run(argv, doc=__doc__, define_flags=define_flags, main=main)


def _main():
  import jax

  from score_sde_jax import sample_jobs
  say = print if jax.process_index() == 0 else (lambda *_: None)
  sample_jobs.run(FLAGS, say)


if __name__ == "__main__":
  sys.exit(run())

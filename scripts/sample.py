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

FLAGS = None   # the parsed flags (score_sde_jax.train.cli.run gives every run its own)


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
  from score_sde_jax.train import cli
  cli.define_run_flags(fv)


def main(fv):
  global FLAGS
  FLAGS = fv
  from score_sde_jax.train import cli
  return cli.start_and_run(FLAGS, _main, user_errors=(ValueError,))


def run(argv=None) -> int:
  """The script on `argv` (default sys.argv); returns the exit status (some paths raise SystemExit)."""
  from score_sde_jax.train import cli
  return cli.run(argv, doc=__doc__, define_flags=define_flags, main=main)


def _main():
  import jax
  import numpy as np

  from score_sde_jax import checkpoints, datasets, models, sde as sde_lib
  from score_sde_jax import draw as draw_lib
  from score_sde_jax.run import config_utils, parallel, restore
  from score_sde_jax.run import state as state_lib

  process0 = jax.process_index() == 0
  say = print if process0 else (lambda *_: None)
  if FLAGS.workdir is None and FLAGS.checkpoint is None:
    raise ValueError("pass --workdir (a training workdir) or --checkpoint (any checkpoint, with --config).")
  source = FLAGS.checkpoint or FLAGS.workdir
  if FLAGS.config is not None:
    config = FLAGS.config
  elif checkpoints.locate(source)[0] == "workdir":
    config = restore.load_workdir_config(checkpoints.locate(source)[1])
  else:
    raise ValueError(f"{source} is not a training workdir: pass --config <the config the checkpoint was "
                     f"trained with>, e.g. configs/vp/cifar10_ddpmpp_continuous.py.")
  config_utils.complete_config(config, say)
  config_utils.apply_overrides(config, FLAGS.set)
  for name in ("num_samples", "batch_size"):
    if getattr(FLAGS, name) is not None and getattr(FLAGS, name) < 1:
      raise ValueError(f"--{name} must be positive; got {getattr(FLAGS, name)}.")
  if FLAGS.step is not None and FLAGS.step < 0:
    raise ValueError(f"--step must be a checkpoint's step (>= 0); got {FLAGS.step}.")
  mesh = parallel.make_mesh()
  n_dev = mesh.devices.size
  total = FLAGS.num_samples or int(config.sampling.num_samples)
  bs = FLAGS.batch_size or min(total, int(config.eval.batch_size))
  if total < 1 or bs < 1:
    raise ValueError(f"sampling.num_samples ({total}) and eval.batch_size ({bs}) must be positive.")
  if bs % n_dev:
    # Padding would change the samples of batch-coupled samplers (the Langevin corrector's step size is a
    # batch mean), so the batch is rounded instead.
    rounded = max(n_dev, bs // n_dev * n_dev)
    say(f"--batch_size {bs} is not a multiple of the {n_dev} devices: using {rounded}.")
    bs = rounded
  # The config is checked (and the sampler built) before the checkpoint is read: a bad value fails fast.
  try:
    config_utils.validate_config(config, 1)
  except config_utils.ConfigError as e:
    raise config_utils.ConfigError(f"{e} (fix it with --set section.field=value or "
                                   f"--config.section.field=value)") from None
  sde = sde_lib.sde_from_config(config)
  model = models.get_model(config)
  shape = (bs,) + datasets.data_shape(config)
  rep, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  # Every process reads (a workdir checkpoint is restored onto this run's mesh, whatever wrote it).
  pre = checkpoints.read_pretrained(source, config, weights=FLAGS.weights, step=FLAGS.step)
  step = pre.step if pre.step is not None else 0
  out_dir = FLAGS.workdir or checkpoints.default_output_dir(pre)
  say(f"{pre.weights} weights of step {pre.step} from {pre.path} ({pre.format}, "
      f"fingerprint {pre.fingerprint})")
  if pre.weights == "ema" and pre.step is not None:
    note = state_lib.young_ema_note(pre.step, float(config.model.ema_rate))
    if note:
      say(note)
  draw = draw_lib.draw_program(config, sde, model, shape, replicated=rep, out_sharding=bsh)
  params = parallel.replicate(pre.variables, mesh)
  samples, nfes, seconds = draw_lib.draw_batches(
      draw, params, seed=FLAGS.seed, total=total, batch_size=bs, replicated=rep,
      progress=FLAGS.progress and process0, desc=f"sampling ({config.sampling.method})")
  if not process0:      # process 0 alone writes
    return
  path = FLAGS.out or os.path.join(out_dir, "samples", f"sample_{step:08d}.npz")
  png = draw_lib.save_samples(config, samples, path, nfes=nfes, step=step, checkpoint=pre.path,
                              fingerprint=pre.fingerprint, seed=FLAGS.seed, batch_size=bs)
  print(f"{total} samples from step {step} in {seconds:.1f}s on {n_dev} device(s), "
        f"{jax.process_count()} process(es) (mean NFE {np.mean(nfes):.0f}) -> {path} and {png}")


if __name__ == "__main__":
  sys.exit(run())

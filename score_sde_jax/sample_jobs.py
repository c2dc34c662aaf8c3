"""What `scripts/sample.py` runs once its flags are parsed: the config and weights, then one of

* plain sampling (`draw.draw_program`);
* class-conditional sampling (`--class_label K|all`) with classifier guidance (`--classifier <workdir of a
  noise-conditional classifier>`, `--guidance_scale`) or classifier-free guidance of a class-conditional
  model (`--cfg_weight`);
* inpainting (`--inpaint <images> --mask <preset|file>`) or colourisation (`--colorize <images>`),

all through `draw.draw_batches` (sharded batches, progress bar), written as .npz + PNG.  The controllable
modes write a side-by-side grid as well: input | mask | result (inpainting), grey | result
(colourisation), one row per class (class-conditional).
"""
from __future__ import annotations

import os

import jax
import numpy as np

from score_sde_jax import checkpoints, conditional_draw, datasets, models
from score_sde_jax import draw as draw_lib
from score_sde_jax import sde as sde_lib
from score_sde_jax.run import config_utils, parallel, restore
from score_sde_jax.run import state as state_lib


def load_config(flags, say):
  """The config: --config, or the saved config of the workdir the weights come from; completed and with
  the --set overrides applied."""
  source = flags.checkpoint or flags.workdir
  kind, where = (None, None) if flags.config is not None else checkpoints.locate(source)
  if flags.config is not None:
    config = flags.config
  elif kind == "workdir":
    config = restore.load_workdir_config(where)
  else:
    raise ValueError(f"{source} is not a training workdir: pass --config <the config the checkpoint was "
                     f"trained with>, e.g. configs/vp/cifar10_ddpmpp_continuous.py.")
  config_utils.complete_config(config, say)
  config_utils.apply_overrides(config, flags.set)
  return config


def load_classifier(path: str, say):
  """(config, model, EMA variables) of a noise-conditional classifier trained with `scripts/train.py`
  (`training.task='noise_classifier'`): its workdir, or any checkpoint of one."""
  kind, where = checkpoints.locate(path)
  if kind != "workdir":
    raise ValueError(f"--classifier {path}: pass the workdir of a classifier trained with scripts/train.py "
                     f"and a noise-classifier config (e.g. configs/mnist/vp_cpu_classifier.py).")
  config = restore.load_workdir_config(where)
  config_utils.complete_config(config, lambda *_: None)
  if str(config.training.task) != "noise_classifier":
    raise ValueError(f"--classifier {path} holds a {config.training.task!r} model, not a noise-conditional "
                     f"classifier (training.task='noise_classifier').")
  pre = checkpoints.read_pretrained(path, config, weights="ema")
  say(f"classifier: EMA weights of step {pre.step} from {pre.path} ({config.model.name}, "
      f"{config.model.num_classes} classes)")
  return config, models.get_model(config), pre.variables


def _check(flags, config):
  conditional = flags.class_label is not None
  modes = [m for m, on in (("--class_label", conditional), ("--inpaint", flags.inpaint),
                           ("--colorize", flags.colorize)) if on]
  if len(modes) > 1:
    raise ValueError(f"{' and '.join(modes)} cannot be combined: pick one.")
  if flags.mask and not flags.inpaint:
    raise ValueError("--mask goes with --inpaint <images>.")
  if conditional and (flags.classifier is None) == (flags.cfg_weight is None):
    raise ValueError("--class_label needs --classifier <noise-classifier workdir> (classifier guidance) or "
                     "--cfg_weight W (classifier-free guidance of a class-conditional model), one of them.")
  if not conditional and (flags.classifier or flags.cfg_weight is not None):
    raise ValueError("--classifier / --cfg_weight / --guidance_scale go with --class_label K|all.")
  if flags.cfg_weight is not None and int(config.model.num_classes) <= 0:
    raise ValueError("--cfg_weight needs a class-conditional model (model.num_classes > 0, trained with "
                     "training.label_dropout > 0); use --classifier for an unconditional one.")
  if flags.colorize and datasets.data_shape(config)[-1] != 3:
    raise ValueError("--colorize needs an RGB model (data.num_channels = 3).")


def run(flags, say) -> None:
  """The whole job (see the module docstring); prints where the samples went."""
  process0 = jax.process_index() == 0
  if flags.workdir is None and flags.checkpoint is None:
    raise ValueError("pass --workdir (a training workdir) or --checkpoint (any checkpoint, with --config).")
  config = load_config(flags, say)
  for name in ("num_samples", "batch_size"):
    if getattr(flags, name) is not None and getattr(flags, name) < 1:
      raise ValueError(f"--{name} must be positive; got {getattr(flags, name)}.")
  if flags.step is not None and flags.step < 0:
    raise ValueError(f"--step must be a checkpoint's step (>= 0); got {flags.step}.")
  _check(flags, config)
  mesh = parallel.make_mesh()
  n_dev = mesh.devices.size
  image_shape = datasets.data_shape(config)
  inputs, extra = (), {}
  if flags.inpaint or flags.colorize:
    images = conditional_draw.load_images(flags.inpaint or flags.colorize, image_shape)
    total = flags.num_samples or len(images)
    images = images[:total]
    total = len(images)
  else:
    total = flags.num_samples or int(config.sampling.num_samples)
  bs = flags.batch_size or min(total, int(config.eval.batch_size))
  if bs % n_dev:
    # Padding would change the samples of batch-coupled samplers (the Langevin corrector's step size is a
    # batch mean), so the batch is rounded instead.
    rounded = max(n_dev, bs // n_dev * n_dev)
    say(f"--batch_size {bs} is not a multiple of the {n_dev} devices: using {rounded}.")
    bs = rounded
  # The config is checked (and the sampler built) before any checkpoint is read: a bad value fails fast.
  try:
    config_utils.validate_config(config, 1)
  except config_utils.ConfigError as e:
    raise config_utils.ConfigError(f"{e} (fix it with --set section.field=value or "
                                   f"--config.section.field=value)") from None
  sde = sde_lib.sde_from_config(config)
  model = models.get_model(config)
  shape = (bs,) + image_shape
  rep, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  kw = dict(replicated=rep, out_sharding=bsh)
  mode = "plain"
  if flags.class_label is not None:
    classifier = load_classifier(flags.classifier, say) if flags.classifier else None
    n_cls = int((classifier[0] if classifier else config).model.num_classes)
    labels = conditional_draw.class_labels(flags.class_label, n_cls, total)
    draw = conditional_draw.guided_draw_program(config, sde, model, shape, classifier=classifier,
                                                guidance_scale=flags.guidance_scale,
                                                cfg_weight=flags.cfg_weight, **kw)
    inputs, mode = (labels,), "classes"
    extra = {"labels": labels, "guidance": (f"classifier scale {flags.guidance_scale}" if classifier
                                            else f"classifier-free w {flags.cfg_weight}")}
  elif flags.inpaint:
    mask = conditional_draw.make_mask(flags.mask or "half", images.shape, jax.random.PRNGKey(flags.seed + 7))
    draw = conditional_draw.inpaint_program(config, sde, model, **kw)
    inputs, mode, extra = (images, mask), "inpaint", {"inputs": images, "mask": mask}
  elif flags.colorize:
    grey = conditional_draw.grey_of(images)
    draw = conditional_draw.inpaint_program(config, sde, model, colorize=True, **kw)
    inputs, mode, extra = (grey,), "colorize", {"inputs": grey}
  else:
    draw = draw_lib.draw_program(config, sde, model, shape, **kw)
  # Every process reads (a workdir checkpoint is restored onto this run's mesh, whatever wrote it).
  source = flags.checkpoint or flags.workdir
  pre = checkpoints.read_pretrained(source, config, weights=flags.weights, step=flags.step)
  step = pre.step if pre.step is not None else 0
  out_dir = flags.workdir or checkpoints.default_output_dir(pre)
  say(f"{pre.weights} weights of step {pre.step} from {pre.path} ({pre.format}, fingerprint {pre.fingerprint})")
  if pre.weights == "ema" and pre.step is not None:
    note = state_lib.young_ema_note(pre.step, float(config.model.ema_rate))
    if note:
      say(note)
  params = parallel.replicate(pre.variables, mesh)
  samples, nfes, seconds = draw_lib.draw_batches(
      draw, params, seed=flags.seed, total=total, batch_size=bs, replicated=rep, inputs=inputs,
      input_sharding=bsh, progress=flags.progress and process0, desc=f"{mode} ({config.sampling.method})")
  if not process0:      # process 0 alone writes
    return
  suffix = "" if mode == "plain" else f"_{mode}"
  path = flags.out or os.path.join(out_dir, "samples", f"sample{suffix}_{step:08d}.npz")
  png = draw_lib.save_samples(config, samples, path, nfes=nfes, step=step, checkpoint=pre.path,
                              fingerprint=pre.fingerprint, seed=flags.seed, batch_size=bs, **extra)
  grid = _side_by_side_png(mode, samples, extra, labels if mode == "classes" else None, path)
  print(f"{total} samples from step {step} in {seconds:.1f}s on {n_dev} device(s), "
        f"{jax.process_count()} process(es) (mean NFE {np.mean(nfes):.0f}) -> {path} and {png}"
        + (f"; side by side: {grid}" if grid else ""))


def _side_by_side_png(mode, samples, extra, labels, path):
  from score_sde_jax import plotting
  png = os.path.splitext(path)[0] + "_grid.png"
  n = min(len(samples), 64)
  if mode == "inpaint":
    inputs, mask = extra["inputs"][:n], extra["mask"][:n]
    shown_mask = inputs * mask + 0.5 * (1 - mask)      # the unknown part greyed out
    return plotting.save_image_grid(conditional_draw.side_by_side(inputs, shown_mask, samples[:n]), png, nrow=3)
  if mode == "colorize":
    return plotting.save_image_grid(conditional_draw.side_by_side(extra["inputs"][:n], samples[:n]), png, nrow=2)
  if mode == "classes":
    per_class = np.bincount(labels).max()
    return plotting.save_image_grid(samples, png, nrow=int(per_class))
  return None

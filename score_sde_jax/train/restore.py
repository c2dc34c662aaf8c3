"""Reading a training workdir back: its saved config and the (EMA) parameters of a checkpoint.

Used by `scripts/sample.py` (and meant for `scripts/evaluate.py`): `load_workdir_config(workdir)`,
`data_shape(config)`, `restore_state(config, workdir, step=None)`.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import jax
import ml_collections

from score_sde_jax.train import checkpoint as ckpt_lib
from score_sde_jax.train import config_utils
from score_sde_jax.train import state as state_lib


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (`<workdir>/config.json`)."""
  saved = config_utils.load_saved_config(workdir)
  if saved is None:
    raise FileNotFoundError(f"{os.path.join(workdir, config_utils.CONFIG_FILE)} does not exist: "
                            f"{workdir!r} is not a training workdir (or training never started).")
  return ml_collections.ConfigDict(saved)


def data_shape(config) -> Tuple[int, ...]:
  """Shape of one example in model space: (D,) for toy data, (H, W, C) for images."""
  from score_sde_jax.train.loop import is_toy
  if is_toy(config):
    from score_sde_jax.datasets import toy
    return (int(toy.get_toy_dataset(config.data.dataset).dim),)
  size = int(config.data.image_size)
  return (size, size, int(config.data.num_channels))


def restore_state(config, workdir: str, step: Optional[int] = None, report=print):
  """(step, TrainState) from `<workdir>/checkpoints`: checkpoint `step`, or the newest one that
  restores (falling back past unreadable ones, with a message).  Arrays land on the default device.
  Read-only: nothing under the workdir is created, moved or deleted."""
  from score_sde_jax import models
  model = models.get_model(config)
  shape = (1,) + data_shape(config)
  abstract = jax.eval_shape(lambda k: state_lib.create_train_state(config, model, k, shape),
                            jax.random.PRNGKey(0))
  if not os.path.isdir(ckpt_lib.checkpoint_dir(workdir)):
    raise FileNotFoundError(f"no checkpoints in {ckpt_lib.checkpoint_dir(workdir)}")
  ck = ckpt_lib.Checkpointer(workdir, async_save=False, read_only=True)
  try:
    steps = ck.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints in {ck.directory}")
    if step is not None:
      if step not in steps:
        raise ValueError(f"no checkpoint for step {step} in {ck.directory}; available: {steps}")
      state, _ = ck.restore(step, abstract)
      return step, state
    found = ck.restore_latest(abstract, check=ckpt_lib.check_finite_state, report=report)
    if found is None:
      raise RuntimeError(f"none of the checkpoints {steps} in {ck.directory} could be restored")
    return found[0], found[1]
  finally:
    ck.close()

"""The training system: train state, optimiser, pure train step, data-parallel loop, checkpoints.

    from score_sde_jax import train
    result = train.train(config, workdir)          # what scripts/train.py runs

Building blocks: `create_train_state`, `get_optimizer`, `make_train_step` (pure
`train_step(state, batch, key=None) -> (state, metrics)`), `make_multi_step` (n steps in one `lax.scan`),
`make_eval_step`, `parallel` (mesh and shardings), `Checkpointer`, `validate_config`.
"""
from score_sde_jax.run.checkpoint import CheckpointWriteError, Checkpointer, checkpoint_dir
from score_sde_jax.run.config_utils import (ConfigError, check_resume_config, config_differences,
                                          save_config, validate_config)
from score_sde_jax.train.lock import WorkdirLocked
from score_sde_jax.train.loop import DataError, NonFiniteLossError, TrainResult, is_toy, train
from score_sde_jax.run.state import (TrainState, create_train_state, ema_update, get_learning_rate_fn,
                                   get_optimizer)
from score_sde_jax.train.step import make_eval_step, make_multi_step, make_train_step

__all__ = [
    "CheckpointWriteError", "Checkpointer", "ConfigError", "DataError", "NonFiniteLossError", "TrainResult",
    "TrainState", "WorkdirLocked", "check_resume_config", "checkpoint_dir", "config_differences",
    "create_train_state", "ema_update", "get_learning_rate_fn", "get_optimizer", "is_toy", "make_eval_step",
    "make_multi_step", "make_train_step", "save_config", "train", "validate_config",
]

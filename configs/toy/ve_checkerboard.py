"""VE SDE on the 'checkerboard' toy data: residual MLP, continuous DSM (σ² weighting), CPU-sized."""
from score_sde_jax.config_defaults import toy_config


def get_config():
  return toy_config("vesde", "checkerboard")

"""VP SDE on the 8-mode ring trained by sliced score matching (variance-reduced form)."""
from score_sde_jax.config_defaults import toy_config


def get_config():
  config = toy_config("vpsde", "ring8")
  config.training.loss = "ssm_vr"
  return config

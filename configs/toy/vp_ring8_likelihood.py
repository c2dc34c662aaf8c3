"""VP SDE on the 8-mode ring with the likelihood weighting λ = g² and importance sampling of t
(ScoreFlow): the objective bounds the negative log-likelihood."""
from score_sde_jax.config_defaults import toy_config


def get_config():
  config = toy_config("vpsde", "ring8")
  config.training.weighting = "likelihood"
  config.training.importance_sampling = True
  return config

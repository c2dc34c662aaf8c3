"""Score networks: a registry by name (`config.model.name`), and the model → score_fn bridge.

Importing this package registers every model family.
"""
from __future__ import annotations

from score_sde_jax import score as score_lib
from score_sde_jax import sde as sde_lib
from score_sde_jax.models import mlp  # noqa: F401  (registers 'mlp')
from score_sde_jax.models import ncsnpp  # noqa: F401  (registers 'ncsnpp')
from score_sde_jax.models import ddpm  # noqa: F401  (registers 'ddpm')
from score_sde_jax.models import ncsnv2  # noqa: F401  (registers 'ncsn', 'ncsnv2_64/128/256')
from score_sde_jax.models import classifiers  # noqa: F401  (registers 'classifier_mlp', 'classifier_cnn')
from score_sde_jax.models import wideresnet  # noqa: F401  (registers 'wideresnet_noise_conditional')
from score_sde_jax.models import mnist_classifier  # noqa: F401  (registers 'mnist_feature_net')
from score_sde_jax.models.convert import convert_torch_state_dict, export_torch_state_dict
from score_sde_jax.models.registry import get_model_class, register_model, registered_models


def get_model(config):
  """The Flax module named by `config.model.name`, built from the whole config (official fields)."""
  return get_model_class(config.model.name)(config=config)


def get_model_fn(model, variables, train: bool = False, rng=None, class_labels=None):
  """`model_fn(x, labels)`: the raw network output with `variables` bound.  In training mode, `rng`
  (a PRNG key) drives dropout; `class_labels` [B] condition class-conditional networks."""

  def model_fn(x, labels):
    kwargs = {}
    if train and rng is not None:
      kwargs["rngs"] = {"dropout": rng}
    if class_labels is not None:
      kwargs["class_labels"] = class_labels
    return model.apply(variables, x, labels, train=train, **kwargs)

  return model_fn


def get_score_fn(sde, model, variables, continuous: bool = True, train: bool = False, rng=None,
                 class_labels=None):
  """`score_fn(x, t)` of a network with the official conventions: VE networks take σ(t) (continuous)
  or the reversed ladder index (discrete) and return the score (any `scale_by_sigma` happens inside the
  network); VP / sub-VP networks take 999·t (continuous) or the DDPM index t(N−1) (discrete) and
  predict noise, divided by the marginal std to give the score."""
  model_fn = get_model_fn(model, variables, train=train, rng=rng, class_labels=class_labels)
  param = "score" if isinstance(sde, sde_lib.VESDE) else "noise"
  return score_lib.make_score_fn(sde, model_fn, parameterization=param, continuous=continuous)


__all__ = ["get_model", "get_model_fn", "get_score_fn", "register_model", "registered_models",
           "convert_torch_state_dict", "export_torch_state_dict"]

"""Name → Flax module registry, so that `config.model.name` picks the score network."""
from __future__ import annotations

from typing import Callable, Dict, Type

from score_sde_jax import checks

_MODELS: Dict[str, Type] = {}


def register_model(name: str) -> Callable[[Type], Type]:
  """Class decorator: `@register_model('ncsnpp')` makes `get_model` find the module by that name."""

  def wrap(cls):
    if name in _MODELS and _MODELS[name] is not cls:
      raise ValueError(f"model name {name!r} is registered twice ({_MODELS[name]} and {cls}).")
    _MODELS[name] = cls
    return cls

  return wrap


def registered_models() -> Dict[str, Type]:
  return dict(_MODELS)


def get_model_class(name: str) -> Type:
  key = checks.check_choice("model.name", name, _MODELS)
  return _MODELS[key]

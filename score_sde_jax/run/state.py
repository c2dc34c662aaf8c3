"""Train state and optimiser.

The state is a pytree (a `flax.struct` dataclass) holding everything a bit-identical resume needs:
the completed step count, the model variables, their exponential moving average, the optax state and
the PRNG key that drives the loss noise (and dropout).  Parameters, EMA and optimiser stay float32 even
when the model computes in bfloat16 (`model.dtype`): mixed precision lives inside the modules.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import optax

from score_sde_jax import memo

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array         # int32 scalar: number of completed optimiser steps
  params: PyTree          # the whole Flax variables pytree ({'params': ...}); what apply_fn takes
  ema_params: PyTree      # EMA of `params` at rate model.ema_rate (used for sampling and evaluation)
  opt_state: PyTree       # optax state
  rng: jax.Array          # raw uint32 PRNG key; split once per step


def get_learning_rate_fn(config) -> Callable[[jax.Array], jax.Array]:
  """lr(step) = optim.lr · min((step + 1) / optim.warmup, 1): linear warm-up, then constant (step is the
  number of completed steps, so the first update already uses a non-zero rate)."""
  lr = float(config.optim.lr)
  warmup = int(config.optim.warmup)

  def lr_fn(step):
    step = jnp.asarray(step, jnp.float32)
    if warmup > 0:
      return lr * jnp.minimum((step + 1.0) / warmup, 1.0)
    return jnp.full_like(step, lr)

  return lr_fn


def get_optimizer(config) -> Tuple[optax.GradientTransformation, Callable]:
  """optax chain from `config.optim`: global-norm clipping at `grad_clip` (skipped when < 0), then Adam
  (AdamW when `weight_decay` > 0) with β₁ = `beta1`, β₂ = 0.999, ε = `eps` and the warm-up schedule.
  Returns (tx, lr_fn)."""
  optim = config.optim
  name = str(optim.optimizer).lower()
  if name not in ("adam", "adamw"):
    raise ValueError(f"optim.optimizer={optim.optimizer!r} is not supported; allowed values: 'Adam', "
                     f"'AdamW'.")
  lr_fn = get_learning_rate_fn(config)
  wd = float(optim.weight_decay)
  if wd > 0 or name == "adamw":
    opt = optax.adamw(lr_fn, b1=float(optim.beta1), b2=0.999, eps=float(optim.eps), weight_decay=wd)
  else:
    opt = optax.adam(lr_fn, b1=float(optim.beta1), b2=0.999, eps=float(optim.eps))
  parts = []
  if float(optim.grad_clip) >= 0:
    parts.append(optax.clip_by_global_norm(float(optim.grad_clip)))
  parts.append(opt)
  return optax.chain(*parts), lr_fn


def _to_float32(tree):
  return jax.tree_util.tree_map(
      lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def init_variables(config, model, key, input_shape):
  """Model variables for inputs of `input_shape` ([B, *D]; B is replaced by 1), in float32."""
  input_shape = (1,) + tuple(int(d) for d in input_shape[1:])
  x = jnp.zeros(input_shape, jnp.float32)
  labels = jnp.ones((1,), jnp.float32)
  k_params, k_drop = jax.random.split(key)
  kwargs = {}
  if str(config.training.task) == "score" and int(config.model.num_classes) > 0:
    kwargs["class_labels"] = jnp.zeros((1,), jnp.int32)     # a class-conditional score model
  variables = model.init({"params": k_params, "dropout": k_drop}, x, labels, train=False, **kwargs)
  return _to_float32(flax.core.unfreeze(variables) if isinstance(variables, flax.core.FrozenDict)
                     else variables)


@memo.per_config
def variables_shapes(config):
  """The variables tree of `get_model(config)` as training creates it (`init_variables`), as
  ShapeDtypeStructs: no computation, traced once per config content (`memo.per_config`).  Validation
  checks that the model builds through it, and every checkpoint reader checks a tree against it."""
  from score_sde_jax import datasets   # pylint: disable=import-outside-toplevel
  from score_sde_jax.models import get_model   # pylint: disable=import-outside-toplevel
  model = get_model(config)
  shape = (1,) + datasets.data_shape(config)
  return jax.eval_shape(lambda k: init_variables(config, model, k, shape), jax.random.PRNGKey(0))


def create_train_state(config, model, key, input_shape, tx=None) -> TrainState:
  """A fresh TrainState: variables initialised from `key` on inputs shaped `input_shape`, EMA equal to
  the initial parameters, optimiser state from `get_optimizer(config)` (or `tx`), and the training PRNG
  key derived from `key`."""
  if tx is None:
    tx, _ = get_optimizer(config)
  k_init, k_train = jax.random.split(jnp.asarray(key))
  variables = init_variables(config, model, k_init, input_shape)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables,
                    ema_params=jax.tree_util.tree_map(jnp.copy, variables),
                    opt_state=tx.init(variables), rng=k_train)


def ema_update(ema, params, rate: float):
  """ema ← rate · ema + (1 − rate) · params (leaf-wise)."""
  return jax.tree_util.tree_map(lambda e, p: rate * e + (1.0 - rate) * p, ema, params)


# An EMA at rate r averages over about 1/(1 - r) steps and starts from the initial weights: before a few
# such horizons it is still mostly the initialisation, and its samples look like noise.
YOUNG_EMA_HORIZONS = 3


def young_ema_note(step, ema_rate: float, raw_hint: str = "--weights raw") -> Optional[str]:
  """One line when the EMA weights of a checkpoint at `step` are still close to their initial values
  (step < 3 / (1 - ema_rate)), else None.  `raw_hint`: how to take the raw weights instead."""
  try:
    step, ema_rate = int(step), float(ema_rate)
  except (TypeError, ValueError):
    return None
  if not 0.0 < ema_rate < 1.0 or step < 0:
    return None
  horizon = 1.0 / (1.0 - ema_rate)
  needed = int(round(YOUNG_EMA_HORIZONS * horizon))
  if step >= needed:
    return None
  left = ema_rate ** step
  return (f"WARNING: the EMA weights (model.ema_rate={ema_rate:g}, an average over ~{horizon:.0f} steps) "
          f"of step {step} are still {100 * left:.0f}% the initial weights, so their samples look like "
          f"noise until about step {needed}; take the raw training weights ({raw_hint}) to see what the "
          f"model has learned so far.")

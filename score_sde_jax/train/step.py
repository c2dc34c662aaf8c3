"""Pure training and evaluation steps.

`train_step(state, batch, key=None) -> (state, metrics)` is a pure function of its arguments: jit it with
whatever shardings you like (`score_sde_jax.run.parallel` replicates the state and shards the batch
along a 1-D device mesh, and the compiler inserts the gradient all-reduce).  With `key=None` the step
splits the state's own PRNG key, which is what the training loop does, so that a resumed run draws the
same noise as an uninterrupted one.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import optax

from score_sde_jax import classifier as classifier_lib
from score_sde_jax import losses as losses_lib
from score_sde_jax.run import state as state_lib

Metrics = Dict[str, jax.Array]


def _scale_batch(batch, scaler):
  image = jnp.asarray(batch["image"], jnp.float32)
  if scaler is not None:
    image = scaler(image)
  out = {"image": image}
  if "label" in batch:
    out["label"] = jnp.asarray(batch["label"], jnp.int32)
  return out


def per_example_losses_fn(config, sde, model, train: bool) -> Callable:
  """`losses_fn(key, params, batch) -> [B]` of `training.task`: the score objective of `losses.py`, or a
  classifier's cross-entropy (`classifier.py`)."""
  apply_fn = fp32_apply(model.apply)
  if str(config.training.task) == "score":
    return losses_lib.get_per_example_loss_fn(sde, apply_fn, config, train=train)
  return classifier_lib.get_losses_fn(sde, apply_fn, config, train=train)


def fp32_apply(apply_fn: Callable) -> Callable:
  """`apply_fn` whose floating outputs are cast to float32: with `model.dtype='bfloat16'` the network
  computes in bf16, but the loss, its gradient and the optimiser see float32."""

  def wrapped(*args, **kwargs):
    out = apply_fn(*args, **kwargs)
    return jax.tree_util.tree_map(
        lambda o: o.astype(jnp.float32) if jnp.issubdtype(o.dtype, jnp.floating) else o, out)

  return wrapped


def make_train_step(config, sde, model, tx=None, lr_fn=None, scaler=None, loss_fn=None) -> Callable:
  """The training step for `config`: the loss of `score_sde_jax.losses.get_loss_fn` (or `loss_fn`),
  its gradient, the optax update (clipping, warm-up Adam), and the EMA update at model.ema_rate.

  `batch['image']` is in data space and is mapped to model space with `scaler` inside the step (pass
  `None` when it is already scaled).  metrics: loss, grad_norm (before clipping), lr (the rate used by
  this update), loss_std.
  """
  if tx is None or lr_fn is None:
    tx, lr_fn = state_lib.get_optimizer(config)
  if loss_fn is None:
    loss_fn = _mean_loss(per_example_losses_fn(config, sde, model, train=True))
  ema_rate = float(config.model.ema_rate)

  def train_step(state: state_lib.TrainState, batch, key=None) -> Tuple[state_lib.TrainState, Metrics]:
    if key is None:
      rng, key = jax.random.split(state.rng)
    else:
      rng = state.rng
    batch = _scale_batch(batch, scaler)
    (loss, aux), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(key, state.params, batch)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state_lib.ema_update(state.ema_params, params, ema_rate)
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                              rng=rng)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(state.step)}
    if "loss_std" in aux:
      metrics["loss_std"] = aux["loss_std"]
    return new_state, metrics

  return train_step


def make_multi_step(train_step: Callable, n_steps: int) -> Callable:
  """`multi_step(state, batches) -> (state, metrics)`: `n_steps` train steps in one `lax.scan`, over
  `batches` whose leaves have a leading axis of length n_steps; metrics are stacked [n_steps]."""

  def multi_step(state, batches):
    def body(s, b):
      return train_step(s, b)

    return jax.lax.scan(body, state, batches, length=n_steps)

  return multi_step


def _mean_loss(losses_fn: Callable) -> Callable:
  """(key, params, batch) -> (mean loss, {'loss', 'loss_std'}), as `losses.get_loss_fn`."""

  def loss_fn(key, params, batch):
    losses = losses_fn(key, params, batch)
    loss = jnp.mean(losses)
    return loss, {"loss": loss, "loss_std": jnp.std(losses)}

  return loss_fn


def make_eval_step(config, sde, model, scaler=None) -> Callable:
  """`eval_step(params, batch, key) -> (sum of per-example losses over valid rows, number of valid
  rows)`, with the training objective in evaluation mode (no dropout); `batch['mask']` marks the
  valid (non-padding) rows."""
  losses_fn = per_example_losses_fn(config, sde, model, train=False)

  def eval_step(params, batch, key):
    scaled = _scale_batch(batch, scaler)
    per_example = losses_fn(key, params, scaled)
    mask = jnp.asarray(batch["mask"], jnp.float32)
    return jnp.sum(per_example * mask), jnp.sum(mask)

  return eval_step

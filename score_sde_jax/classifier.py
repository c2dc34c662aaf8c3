"""Classifiers trained by the project's trainer: the objective, accuracy against t, and the log-probability
function that classifier guidance consumes.

`training.task` selects what `train/step.py` optimises:

* 'classifier' — p_φ(y | x) on clean data (the FID-MNIST feature net):
      L(φ) = E_{(x, y)} [ −log softmax(f_φ(x))_y ].
* 'noise_classifier' — the noise-conditional classifier p_φ(y | x(t), t) of the paper's class-conditional
  sampling (Song et al. 2021, Sec. 5 and App. I.1), trained on samples perturbed by the same SDE as the
  score model:
      L(φ) = E_{t ~ U[eps, 1]} E_{(x(0), y)} E_{x(t) ~ N(m(t) x(0), σ(t)² I)} [ −log p_φ(y | x(t), t) ],
  with m(t), σ(t) from `sde.marginal_prob` and t given to the network as `score.time_labels` (σ(t) for
  VE, 999 t for VP / sub-VP), exactly as the score model receives it.  Its gradient
  ∇ₓ log p_φ(y | x, t) is what `controllable.classifier_guided_score_fn` adds to the score.

The network is any registered model `f(x, labels, train) -> logits [B, C]` (or a dict with 'logits').
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from score_sde_jax import score as score_lib
from score_sde_jax import sde as sde_lib

Array = jax.Array

TASKS = ("score", "classifier", "noise_classifier")
EPS = 1e-5   # the smallest training time, as the score objectives (losses.get_loss_fn)


def logits_of(output) -> Array:
  """The logits of a classifier's output (an array, or a dict with 'logits' as the MNIST feature net)."""
  return jnp.asarray(output["logits"] if isinstance(output, dict) else output, jnp.float32)


def perturb(key: Array, sde: sde_lib.SDE, x: Array, t: Array) -> Array:
  """x(t) = m(t) x(0) + σ(t) z, z ~ N(0, I): a draw from the perturbation kernel p_0t(x(t) | x(0))."""
  mean, std = sde.marginal_prob(x, t)
  return mean + sde_lib.batch_mul(std, jax.random.normal(key, x.shape, x.dtype))


def _network_inputs(task: str, sde: sde_lib.SDE, continuous: bool, key: Array, x: Array, t: Array):
  """(input, time labels) of the classifier: x(t) drawn from the kernel with the score model's labels of
  t ('noise_classifier'), or the clean x with unused zero labels ('classifier': t is ignored)."""
  if task == "noise_classifier":
    return perturb(key, sde, x, t), score_lib.time_labels(sde, t, continuous)
  return x, jnp.zeros((x.shape[0],), jnp.float32)


def get_losses_fn(sde: sde_lib.SDE, apply_fn: Callable, config, train: bool = True, *, eps: float = EPS):
  """`losses_fn(key, params, batch) -> [B]` cross-entropies of `training.task` (see the module docstring);
  `batch` holds 'image' (model space) and 'label' (int [B])."""
  task = str(config.training.task)
  continuous = bool(config.training.continuous)
  if task not in ("classifier", "noise_classifier"):
    raise ValueError(f"classifier.get_losses_fn: training.task={task!r} is not a classifier task")

  def losses_fn(key, params, batch):
    x, y = batch["image"], batch["label"]
    k_drop, k_t, k_z = jax.random.split(key, 3)
    rngs = {"dropout": k_drop} if train else {}
    t = jax.random.uniform(k_t, (x.shape[0],), minval=eps, maxval=sde.T)
    x, labels = _network_inputs(task, sde, continuous, k_z, x, t)
    logits = logits_of(apply_fn(params, x, labels, train=train, rngs=rngs))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y.astype(jnp.int32))

  return losses_fn


def accuracy_fn(sde: sde_lib.SDE, apply_fn: Callable, config) -> Callable:
  """`correct(params, key, x, y, t) -> bool [B]`: argmax p_φ(· | x(t), t) == y on x(t) drawn from the
  kernel at the times t [B] ('noise_classifier'), or on clean x ('classifier': t is ignored)."""
  task = str(config.training.task)
  continuous = bool(config.training.continuous)

  def correct(params, key, x, y, t):
    x, labels = _network_inputs(task, sde, continuous, key, x, t)
    return jnp.argmax(logits_of(apply_fn(params, x, labels, train=False)), axis=-1) == y

  return correct


ACCURACY_TIMES: Sequence[float] = (1e-3, 0.1, 0.25, 0.5, 0.75, 1.0)   # t of the reported accuracy curve


def log_prob_fn(sde: sde_lib.SDE, model, variables, config) -> Callable[[Array, Array], Array]:
  """`classifier_log_prob_fn(x, t) -> log p_φ(· | x, t)` [B, C] of a trained noise-conditional classifier
  (x in model space, t in [eps, T]): the argument `controllable.classifier_guided_score_fn` takes."""
  continuous = bool(config.training.continuous)

  def fn(x, t):
    out = model.apply(variables, x, score_lib.time_labels(sde, t, continuous), train=False)
    return jax.nn.log_softmax(logits_of(out), axis=-1)

  return fn

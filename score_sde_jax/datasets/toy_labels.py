"""Exact class-conditional quantities of a labelled Gaussian mixture: the ground truth for guidance.

Take the component index k of a mixture p₀ = Σ_k w_k N(μ_k, Σ_k) as a class label.  Under an SDE with
Gaussian perturbation kernel N(m(t) x₀, σ(t)² I), every class-conditional marginal is Gaussian,

    p_t(x | k) = N(x; m μ_k, C_k),   C_k = m² Σ_k + σ² I,

so the noise-conditional classifier (Bayes' rule) and the conditional score are exact for every t:

    log p_t(k | x) = log w_k + log N(x; m μ_k, C_k) − logsumexp_j [log w_j + log N(x; m μ_j, C_j)],
    ∇ₓ log p_t(x | k) = C_k⁻¹ (m μ_k − x).

These are what `controllable.classifier_guided_score_fn` (unconditional score + ∇ log p_t(y | x)) and
`controllable.classifier_free_score_fn` (conditional and unconditional scores) are tested against.
Shapes: x is [B, *D] with prod(D) = mixture.dim, t is [B], labels are int [B].
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from score_sde_jax import checks
from score_sde_jax.datasets.toy import GaussianMixture

Array = jax.Array


def _component_terms(mixture: GaussianMixture, x: Array, mean_coeff: Array, std: Array):
  """log(w_k N(x; m μ_k, C_k)) [B, K] and the component scores C_k⁻¹ (m μ_k − x) [B, K, D]."""
  means, covs = mixture._perturbed_components(mean_coeff, std)            # [B, K, D], [B, K, D, D]
  chol = jnp.linalg.cholesky(covs)
  diff = x[:, None, :] - means
  sol = jax.scipy.linalg.solve_triangular(chol, diff[..., None], lower=True)[..., 0]
  maha = jnp.sum(sol ** 2, axis=-1)
  logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
  log_joint = (jnp.log(jnp.asarray(mixture.weights, jnp.float32))[None]
               - 0.5 * (maha + logdet + mixture.dim * math.log(2 * math.pi)))
  scores = -jax.scipy.linalg.solve_triangular(jnp.swapaxes(chol, -1, -2), sol[..., None],
                                              lower=False)[..., 0]
  return log_joint, scores


def noise_conditional_log_prob_fn(mixture: GaussianMixture, sde) -> Callable[[Array, Array], Array]:
  """(x, t) ↦ log p_t(k | x) for every component k, shaped [B, K]: the exact noise-conditional
  classifier (the softmax over k of log w_k + log N(x; m(t) μ_k, m(t)² Σ_k + σ(t)² I))."""

  def log_prob(x, t):
    checks.check_x_t(x, t)
    m, s = sde.mean_coeff_and_std(t)
    log_joint, _ = _component_terms(mixture, x.reshape(x.shape[0], -1), m, s)
    return jax.nn.log_softmax(log_joint, axis=-1)

  return log_prob


def component_score_fn(mixture: GaussianMixture, sde) -> Callable[[Array, Array, Array], Array]:
  """(x, t, k) ↦ ∇ₓ log p_t(x | k) = C_k⁻¹ (m μ_k − x), the exact score of component k (int [B])."""

  def score_fn(x, t, k):
    checks.check_x_t(x, t)
    m, s = sde.mean_coeff_and_std(t)
    _, scores = _component_terms(mixture, x.reshape(x.shape[0], -1), m, s)
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, mixture.num_components - 1)
    return jnp.take_along_axis(scores, k[:, None, None], axis=1)[:, 0].reshape(x.shape)

  return score_fn


def conditional_score_fn(mixture: GaussianMixture, sde) -> Callable[[Array, Array, Array], Array]:
  """(x, t, y) ↦ ∇ₓ log p_t(x | y) for labels y in 0..K−1, and the unconditional mixture score
  ∇ₓ log p_t(x) for the null label y = K = mixture.num_components (the convention of classifier-free
  guidance, which trains one network on both)."""
  component = component_score_fn(mixture, sde)
  marginal = mixture.perturbed_score_fn(sde)
  k = mixture.num_components

  def score_fn(x, t, y):
    y = jnp.asarray(y, jnp.int32)
    null = (y == k).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(null, marginal(x, t), component(x, t, y))

  return score_fn

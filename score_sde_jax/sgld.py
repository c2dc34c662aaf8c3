"""Stochastic gradient Langevin dynamics (Welling & Teh, ICML 2011): posterior sampling of parameters
from minibatch gradients.

For a posterior p(θ | x_1..N) ∝ p(θ) Π_i p(x_i | θ), each step draws a minibatch of n indices and updates

    θ ← θ + (ε_t / 2) (∇ log p(θ) + (N / n) Σ_{i ∈ batch} ∇ log p(x_i | θ)) + η_t,   η_t ~ N(0, ε_t I),

with the polynomially decaying step ε_t = a (b + t)^(−γ), t = 0, 1, … the update's index.  For
γ ∈ (0.5, 1] the steps satisfy Σ ε_t = ∞ and Σ ε_t² < ∞, and the chain's samples approach the posterior
as ε_t → 0: the minibatch gradient noise enters an update with variance O(ε_t²) and is dominated by the
injected N(0, ε_t) noise (Welling & Teh's argument).  At any finite ε the stationary law is inflated by
O(ε) — the Euler step and the gradient noise; `linear_regression_sgld_stationary_cov` gives it exactly
for linear regression.  γ = 0 is a constant step: a stationary, biased chain.

`sgld` is pure and jit-compiled: one `lax.scan` over the kept samples (an inner `fori_loop` over the
thinning interval, after a `fori_loop` of burn-in), the PRNG key threaded through every step (minibatch
indices and noise drawn from it), parameters any pytree of float arrays.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from score_sde_jax import checks

Array = jax.Array
PyTree = Any


def polynomial_step_size(t, a, b, gamma):
  """ε_t = a (b + t)^(−γ) (Welling & Teh, 2011), t the 0-based update index."""
  return a * (b + jnp.asarray(t, jnp.float32)) ** (-gamma)


def _check_args(num_steps, batch_size, num_data, a, b, gamma, thin, burn_in):
  checks.check_positive_int("num_steps", num_steps)
  checks.check_positive_int("batch_size", batch_size)
  checks.check_positive_int("thin", thin)
  checks.check_non_negative_int("burn_in", burn_in)
  if batch_size > num_data:
    raise ValueError(f"batch_size ({batch_size}) exceeds the number of data points ({num_data}).")
  if burn_in + thin > num_steps:
    raise ValueError(f"burn_in + thin ({burn_in} + {thin}) exceeds num_steps ({num_steps}): no sample "
                     f"would be kept.")
  # a, b, gamma may be traced (arguments of the caller's jit/vmap): then they are not checked.
  traced = lambda v: isinstance(v, jax.core.Tracer)
  if not traced(a):
    checks.check_positive("a", a)
  if not traced(b):
    checks.check_positive("b", b)
  if traced(gamma):
    return
  try:
    ok = 0.0 <= float(gamma) <= 1.0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"gamma must lie in [0, 1] ((0.5, 1] for the decaying schedule of Welling & Teh, 0 "
                     f"for a constant step); got {gamma!r}.")


def _num_data(data) -> int:
  leaves = jax.tree_util.tree_leaves(data)
  if not leaves:
    raise ValueError("data must be a pytree of arrays with a leading data axis; got no arrays.")
  sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
  if len(sizes) != 1 or -1 in sizes:
    raise ValueError(f"every array in data needs the same leading (data) axis; got leading sizes "
                     f"{sorted(sizes)}.")
  return sizes.pop()


@functools.partial(jax.jit, static_argnames=("log_prior_fn", "log_likelihood_fn", "num_steps",
                                             "batch_size", "thin", "burn_in"))
def _run(key, init_params, data, a, b, gamma, *, log_prior_fn, log_likelihood_fn, num_steps, batch_size,
         thin, burn_in):
  num_data = jax.tree_util.tree_leaves(data)[0].shape[0]
  scale = num_data / batch_size

  def log_post_estimate(params, batch):
    log_lik = log_likelihood_fn(params, batch)
    return log_prior_fn(params) + scale * jnp.sum(log_lik)

  grad_fn = jax.grad(log_post_estimate)

  def update(t, carry):
    params, key = carry
    key, k_idx, k_noise = jax.random.split(key, 3)
    idx = jax.random.randint(k_idx, (batch_size,), 0, num_data)
    batch = jax.tree_util.tree_map(lambda d: d[idx], data)
    grads = grad_fn(params, batch)
    eps = polynomial_step_size(t, a, b, gamma)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    noise_keys = jax.random.split(k_noise, len(leaves))
    grad_leaves = treedef.flatten_up_to(grads)
    new = [p + (0.5 * eps).astype(p.dtype) * g
           + jnp.sqrt(eps).astype(p.dtype) * jax.random.normal(k, p.shape, p.dtype)
           for p, g, k in zip(leaves, grad_leaves, noise_keys)]
    return jax.tree_util.tree_unflatten(treedef, new), key

  params, key = jax.lax.fori_loop(0, burn_in, update, (init_params, key))
  num_kept = (num_steps - burn_in) // thin

  def keep(carry, j):
    start = burn_in + j * thin
    carry = jax.lax.fori_loop(start, start + thin, update, carry)
    return carry, (carry[0], polynomial_step_size(start + thin - 1, a, b, gamma))

  _, (chain, step_sizes) = jax.lax.scan(keep, (params, key), jnp.arange(num_kept))
  return chain, step_sizes


def sgld(key, log_prior_fn: Callable, log_likelihood_fn: Callable, init_params: PyTree, data: PyTree, *,
         num_steps: int, batch_size: int, a: float, b: float = 1.0, gamma: float = 0.55, thin: int = 1,
         burn_in: int = 0) -> Tuple[PyTree, Array]:
  """Runs SGLD for `num_steps` updates; returns (chain, step_sizes).

  log_prior_fn(params) -> scalar log p(θ) (up to a constant); log_likelihood_fn(params, batch) ->
  per-example log p(x_i | θ) shaped [n] (or their sum); data: a pytree of arrays sharing a leading axis
  of size N, from which each minibatch takes `batch_size` indices drawn uniformly with replacement (an
  unbiased estimate of the full-data gradient).  Step sizes ε_t = a (b + t)^(−γ).

  The chain keeps the parameters after updates burn_in + thin, burn_in + 2·thin, … (pytree leaves with a
  leading axis of (num_steps − burn_in) // thin), and step_sizes the ε of each kept sample's last update
  (Welling & Teh weight posterior averages by ε_t when the step decays: `weighted_average`).  Jitted;
  the callables are static arguments (a new function object compiles again).
  """
  num_data = _num_data(data)
  _check_args(num_steps, batch_size, num_data, a, b, gamma, thin, burn_in)
  if not callable(log_prior_fn) or not callable(log_likelihood_fn):
    raise ValueError("log_prior_fn and log_likelihood_fn must be callables.")
  for leaf in jax.tree_util.tree_leaves(init_params):
    if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      raise ValueError(f"init_params must hold float arrays only; got dtype {jnp.asarray(leaf).dtype}.")
  init_params = jax.tree_util.tree_map(jnp.asarray, init_params)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  return _run(key, init_params, data, f32(a), f32(b), f32(gamma),
              log_prior_fn=log_prior_fn, log_likelihood_fn=log_likelihood_fn, num_steps=int(num_steps),
              batch_size=int(batch_size), thin=int(thin), burn_in=int(burn_in))


def weighted_average(chain: PyTree, weights: Array) -> PyTree:
  """Σ_j w_j θ_j / Σ_j w_j over the chain's leading axis (with w = step_sizes: Welling & Teh's
  estimator of posterior expectations under a decaying step)."""
  weights = jnp.asarray(weights)
  return jax.tree_util.tree_map(
      lambda c: jnp.tensordot(weights, c, axes=(0, 0)) / jnp.sum(weights), chain)


# ---------------------------------------------------------------------------------------------------
# Exact references for Bayesian linear regression  y = X θ + N(0, σ²),  θ ~ N(0, s² I)  (float64)
# ---------------------------------------------------------------------------------------------------
def linear_regression_posterior(X, y, noise_std: float, prior_std: float):
  """The conjugate Gaussian posterior: precision A = I/s² + XᵀX/σ², mean A⁻¹ Xᵀy/σ²; returns
  (mean [D], covariance [D, D])."""
  X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
  precision = np.eye(X.shape[1]) / prior_std ** 2 + X.T @ X / noise_std ** 2
  cov = np.linalg.inv(precision)
  return cov @ (X.T @ y) / noise_std ** 2, cov


def linear_regression_sgld_stationary_cov(X, y, noise_std: float, prior_std: float, step_size: float,
                                          batch_size: int):
  """The exact stationary covariance of constant-step SGLD (ε = step_size) on the linear-regression
  posterior with minibatch indices drawn uniformly with replacement (as `sgld`).

  With e = θ − μ (μ the posterior mean), an update is  e' = P_B e + (ε/2) ξ_B + √ε z  with
  P_B = I − (ε/2) A_B,  A_B = I/s² + c Σ_{j≤n} x_{i_j} x_{i_j}ᵀ,  c = N / (n σ²),  and ξ_B the minibatch
  gradient at μ (mean 0).  e is independent of the batch, so E e = 0 at stationarity (the mean is
  unbiased) and the covariance S solves

      S = E[P_B S P_Bᵀ] + (ε²/4) E[ξ ξᵀ] + ε I,
      E[A_B S A_B] = A S A + c² n (mean_i[x_i x_iᵀ S x_i x_iᵀ] − Ū S Ū),   Ū = mean_i x_i x_iᵀ,
      E[ξ ξᵀ] = c² n Cov_i(x_i r_i),   r = y − X μ,

  a linear system in S.  As ε → 0, S → A⁻¹ (the posterior); for small ε the relative inflation is
  about ε λ / 4 (the Euler discretisation) plus ε c² n Var(x r) / (4 λ) (the minibatch noise) along an
  eigen-direction of A with eigenvalue λ."""
  X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
  n_data, d = X.shape
  mean, _ = linear_regression_posterior(X, y, noise_std, prior_std)
  A = np.eye(d) / prior_std ** 2 + X.T @ X / noise_std ** 2
  c = n_data / (batch_size * noise_std ** 2)
  outer = np.einsum("ni,nj->nij", X, X)                                   # x_i x_iᵀ
  U = outer.mean(0)
  uu = np.einsum("nij,nkl->iljk", outer, outer).reshape(d * d, d * d) / n_data   # E[u ⊗ u] (row-major vec)
  r = y - X @ mean
  xr = X * r[:, None]
  Q = c ** 2 * batch_size * np.cov(xr.T, bias=True).reshape(d, d)
  eye = np.eye(d)
  # Row-major vec: vec(L S R) = (L ⊗ Rᵀ) vec(S).
  kron = np.kron
  lin = (0.5 * (kron(A, eye) + kron(eye, A.T))
         - 0.25 * step_size * (kron(A, A.T) + c ** 2 * batch_size * (uu - kron(U, U.T))))
  rhs = (0.25 * step_size * Q + eye).reshape(-1)
  S = np.linalg.solve(lin, rhs).reshape(d, d)
  return 0.5 * (S + S.T)

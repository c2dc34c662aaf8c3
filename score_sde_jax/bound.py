"""ScoreFlow's variational bound on −log p(x) (Song, Durkan, Murray & Ermon, 2021, Theorem 1), beside the
exact likelihood of `likelihood.py`.

`variational_bound`: for an SDE
dx = f dt + g dw with Gaussian kernel p_{0t}(x_t | x) = N(m(t) x, σ(t)² I),

    −log p(x) ≤ L(x) = −E_{x_T}[log π(x_T)]
                       + ½ ∫_ε^T E_{x_t}[ g² ‖s_θ(x_t, t) − ∇log p_{0t}(x_t | x)‖² − g² ‖∇log p_{0t}(x_t | x)‖²
                                          − 2 ∇·f(x_t, t) ] dt.

Derivation of what L bounds (and equals, for the exact score): let q_t = p_{0t}(· | x), which solves the
Fokker–Planck equation of the SDE, and s* = ∇log p_t the true score.  Integration by parts gives
E_{q_t}[s·∇log q_t] = −E_{q_t}[∇·s], so for s = s* the integrand is E_{q_t}[½g²‖s*‖² + g²∇·s* − ∇·f]; the
Fokker–Planck equations of q_t and p_t give d/dt E_{q_t}[log p_t] = E_{q_t}[−∇·f + g²∇·s* + ½g²‖s*‖²], the
same expression.  Hence, for s = s*,

    L(x) = E_{x_ε ~ q_ε}[−log p_ε(x_ε)] + E_{x_T ~ q_T}[log p_T(x_T) − log π(x_T)],

the NLL of x at time ε (smoothed by the kernel's σ(ε), negligible for ε = 1e-5) plus the prior mismatch,
whose average over the data is KL(p_T ‖ π) ≥ 0; averaged over data, a wrong score adds
½ ∫ g² E_{p_t}‖s − s*‖² dt ≥ 0.  The tests check both against the exact mixture score.

Estimator.  With z ~ N(0, I), x_t = m x + σ z and ∇log p_{0t} = −z/σ, the score terms are
½ (g²/σ²) (‖σ s + z‖² − ‖z‖²) (one expression, no cancellation of two O(1/σ²) terms); t is drawn by
importance sampling from q(t) ∝ g²/σ² on [ε, T] (inverting `SDE.weight_integral`, stratified over the `num_t`
draws), which makes every term bounded.  For the linear drifts here f = a(t) x, so ∇·f = D a(t) and
−∫ ∇·f dt = −D ∫_ε^T a(t) dt is computed exactly (Gauss–Legendre, exact for the affine a(t) of VP and
sub-VP: −D ∫ −½β = ½ D (B(T) − B(ε)); 0 for VE).  The prior term is exact for the isotropic Gaussian
priors of every SDE here: E[log π(m x + σ z)] = log π(m x) + ½ σ² D h with h = ∂² log π / ∂y₁².
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from score_sde_jax import checks
from score_sde_jax import sde as sde_lib

Array = jax.Array


# ---------------------------------------------------------------------------------------------------
def _drift_coefficient(sde, t: Array) -> Array:
  """a(t) of the linear drift f(x, t) = a(t) x (per dimension), from `sde.sde` on a vector of ones."""
  ones = jnp.ones((t.shape[0], 1), jnp.float32)
  return sde.sde(ones, t)[0][:, 0]


def drift_divergence_integral(sde, eps: float, dim: int, num_nodes: int = 8) -> Array:
  """∫_ε^T ∇·f(x, t) dt = D ∫_ε^T a(t) dt for a linear drift (exact for polynomial a of degree < 2·nodes)."""
  nodes, weights = np.polynomial.legendre.leggauss(num_nodes)
  half = 0.5 * (sde.T - eps)
  t = jnp.asarray(eps + half * (nodes + 1.0), jnp.float32)
  return dim * half * jnp.sum(jnp.asarray(weights, jnp.float32) * _drift_coefficient(sde, t))


def _expected_prior_logp(sde, mean: Array, std: Array) -> Array:
  """E_z[log π(mean + std z)] [B] for an isotropic Gaussian prior π (every SDE here): log π is quadratic
  with Hessian h I, so the expectation is log π(mean) + ½ std² D h, h from a central difference."""
  d = math.prod(mean.shape[1:])
  e = jnp.zeros((3, d), jnp.float32).at[0, 0].set(1.0).at[1, 0].set(-1.0)
  lp = sde.prior_logp(e.reshape((3,) + mean.shape[1:]))
  h = lp[0] + lp[1] - 2.0 * lp[2]
  return sde.prior_logp(mean) + 0.5 * std ** 2 * d * h


def variational_bound(key, sde, score_fn, x, *, num_t: int = 16, eps: float = 1e-5,
                      importance_sampling: bool = True, antithetic: bool = False) -> Array:
  """ScoreFlow's upper bound L(x) ≥ −log p(x) in nats, per example [B] (see the module docstring).

  Monte Carlo over t (`num_t` stratified draws per example, importance-sampled from g²/σ² unless
  `importance_sampling=False`, then uniform on [ε, T]) and over z; the prior and divergence terms are
  exact.  With `antithetic`, each t is used with z and −z, and `score_fn(x, t)` is called 2·`num_t`
  times on the batch (else `num_t` times).
  """
  sde_lib.check_sde(sde)
  shape = checks.check_shape("x.shape", getattr(x, "shape", None))
  checks.check_eps(eps, sde.T)
  checks.check_positive_int("num_t", num_t)
  checks.check_score_fn(score_fn, shape)
  x = jnp.asarray(x, jnp.float32)
  b, d = shape[0], math.prod(shape[1:])
  k_t, k_z = jax.random.split(key)
  ts_std = sde.mean_coeff_and_std(jnp.full((b,), sde.T, jnp.float32))
  prior_term = -_expected_prior_logp(sde, sde_lib.batch_mul(ts_std[0], x), ts_std[1])
  div_term = -drift_divergence_integral(sde, eps, d)

  # Stratified uniforms: draw j of num_t lies in [j/num_t, (j+1)/num_t).
  u = (jnp.arange(num_t, dtype=jnp.float32)[:, None]
       + jax.random.uniform(k_t, (num_t, b))) / num_t
  if importance_sampling:
    f_lo, f_hi = sde.weight_integral(jnp.asarray(eps)), sde.weight_integral(jnp.asarray(sde.T))
    t = jnp.clip(sde.weight_integral_inverse(f_lo + u * (f_hi - f_lo)), eps, sde.T)
  else:
    t = eps + u * (sde.T - eps)

  def one(carry, inputs):
    tj, kj = inputs
    m, std = sde.mean_coeff_and_std(tj)
    z = jax.random.normal(kj, x.shape, jnp.float32)
    g2 = sde.sde(jnp.zeros((b, 1)), tj)[1] ** 2
    flat = lambda a: a.reshape(b, -1)

    def sq_of(zz):
      s = score_fn(sde_lib.batch_mul(m, x) + sde_lib.batch_mul(std, zz), tj)
      return jnp.sum(flat(sde_lib.batch_mul(std, s) + zz) ** 2 - flat(zz) ** 2, axis=-1)

    # antithetic pair (z, −z): the term linear in z, the bulk of the variance, cancels in the pair.
    sq = 0.5 * (sq_of(z) + sq_of(-z)) if antithetic else sq_of(z)
    if importance_sampling:
      # (g²/σ²) · [density of t: (g²/σ²)/Z]⁻¹ = Z
      w = (f_hi - f_lo) * jnp.ones_like(tj)
    else:
      w = g2 / std ** 2 * (sde.T - eps)
    return carry + 0.5 * w * sq / num_t, None

  keys = jax.random.split(k_z, num_t)
  score_term, _ = jax.lax.scan(one, jnp.zeros((b,), jnp.float32), (t, keys))
  return prior_term + score_term + div_term

"""Exact likelihood through the probability-flow ODE (Song et al., 2021, Sec. 4.3 and App. D.2).

With f̃(x, t) = f(x, t) − ½ g(t)² s(x, t), the instantaneous change of variables (Chen et al., 2018) gives

    log p_0(x(0)) = log p_T(x(T)) + ∫_0^T ∇·f̃(x(t), t) dt,

solved jointly for (x(t), ∫ ∇·f̃) from eps to T by diffrax, on the device, in one compiled solve.  The
divergence is exact (the Jacobian trace by one JVP per data dimension, for low-dimensional data) or the
Hutchinson estimator ∇·f̃ ≈ vᵀ (∂f̃/∂x) v with v Rademacher or Gaussian, fixed over the solve, computed with
one forward pass and one JVP per evaluation (`jax.linearize`; the official code took the gradient of ⟨f̃, v⟩
and a second forward pass for f̃).  Forward mode, because on XLA:CPU the convolutions of a VJP inside the
solver's while-loop miss the fast convolution path (see `divergence.hutchinson_divergence`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from score_sde_jax import checks
from score_sde_jax import ode as ode_lib
from score_sde_jax import sde as sde_lib
from score_sde_jax import divergence as divergence_lib
from score_sde_jax.sampling import probability_flow_drift

Array = jax.Array

DIVERGENCES = ("hutchinson_rademacher", "hutchinson_gaussian", "exact")
DEQUANTIZATIONS = ("uniform", "none")


def _probes(key, divergence, num_probes, shape, dtype):
  if divergence == "hutchinson_rademacher":
    return jax.random.rademacher(key, (num_probes,) + tuple(shape), dtype=dtype)
  return jax.random.normal(key, (num_probes,) + tuple(shape), dtype)


def augmented_dynamics(sde, score_fn, divergence="hutchinson_rademacher", probes=None):
  """(t, (x, ·)) ↦ (f̃(x, t), ∇·f̃(x, t)): the vector field of the joint ODE for x and Δlog p (Hutchinson
  probes [P, B, *D], fixed)."""
  f = likelihood_vector_field(sde, score_fn, divergence)
  batch_probes = None if probes is None else jnp.moveaxis(probes, 0, 1)
  return lambda t, state: f(t, state, batch_probes)


def likelihood_vector_field(sde, score_fn, divergence="hutchinson_rademacher"):
  """The same vector field as f(t, (x, ·), probes), the probes passed in (not closed over) with the batch
  axis first, [B, P, *D] (None for the exact divergence), so that `ode.solve` can vmap them with x for
  the per-example controller."""
  drift = probability_flow_drift(sde, score_fn)

  def f(t, state, probes):
    x, _ = state
    fn = lambda y: drift(t, y)
    if divergence == "exact":
      return fn(x), divergence_lib.exact_divergence(fn, x)
    return divergence_lib.hutchinson_divergence(fn, x, jnp.moveaxis(probes, 1, 0))

  return f


def _check_common(sde, score_fn, x, eps, solver, rtol, atol, num_steps, controller="batch",
                  step_control=None):
  sde_lib.check_sde(sde)
  shape = checks.check_shape("x.shape", getattr(x, "shape", None))
  checks.check_eps(eps, sde.T)
  ode_lib.check_solver_args(solver, rtol, atol, num_steps)
  ode_lib.check_controller(controller)
  ode_lib.check_step_control(step_control, solver)
  checks.check_score_fn(score_fn, shape)
  checks.check_finite_data("x", x)
  return shape


def log_likelihood(key, sde, score_fn, x, divergence="hutchinson_rademacher", rtol=1e-5, atol=1e-5,
                   eps=1e-5, num_probes=1, solver=ode_lib.DEFAULT_SOLVER, num_steps=None,
                   max_steps=16384, controller="batch", step_control=None, sharding=None):
  """log p_eps(x) in nats, per example [B], by the probability-flow ODE from eps to T.

  Returns (logp, z, nfe): z = x(T) (whose prior log-density enters logp) and the number of evaluations
  of the ODE's vector field (each one forward and `num_probes` JVPs of the score model for Hutchinson, or
  one forward and D JVPs for 'exact').  The Hutchinson probes are drawn once for the whole batch (their
  values do not depend on how it is sharded) and fixed over the solve, as the official code does.
  controller ('batch' | 'per_example'), step_control (None: the solver's) and sharding (of the batch
  axis): see `ode.solve`; with 'per_example' nfe is the largest example's.
  """
  shape = _check_common(sde, score_fn, x, eps, solver, rtol, atol, num_steps, controller, step_control)
  divergence = checks.check_choice("divergence", divergence, DIVERGENCES)
  checks.check_positive_int("num_probes", num_probes)
  x = jnp.asarray(x, jnp.float32)
  probes = None
  if divergence != "exact":
    probes = jnp.moveaxis(_probes(key, divergence, num_probes, shape, x.dtype), 0, 1)  # [B, P, *D]
  f = likelihood_vector_field(sde, score_fn, divergence)
  (z, delta_logp), nfe = ode_lib.solve(f, (x, jnp.zeros((shape[0],), x.dtype)), eps, sde.T, args=probes,
                                       solver=solver, rtol=rtol, atol=atol, num_steps=num_steps,
                                       max_steps=max_steps, controller=controller,
                                       step_control=step_control, sharding=sharding)
  return sde.prior_logp(z) + delta_logp, z, nfe


def encode(sde, score_fn, x, *, eps=1e-5, rtol=1e-5, atol=1e-5, solver=ode_lib.DEFAULT_SOLVER,
           num_steps=None, controller="batch", step_control=None, sharding=None):
  """x ↦ z = x(T): the probability-flow ODE from eps to T.  Returns (z, nfe)."""
  _check_common(sde, score_fn, x, eps, solver, rtol, atol, num_steps, controller, step_control)
  return ode_lib.solve(probability_flow_drift(sde, score_fn), jnp.asarray(x, jnp.float32), eps, sde.T,
                       solver=solver, rtol=rtol, atol=atol, num_steps=num_steps, controller=controller,
                       step_control=step_control, sharding=sharding)


def decode(sde, score_fn, z, *, eps=1e-5, rtol=1e-5, atol=1e-5, solver=ode_lib.DEFAULT_SOLVER,
           num_steps=None, controller="batch", step_control=None, sharding=None):
  """z ↦ x = x(eps): the probability-flow ODE from T to eps.  Returns (x, nfe)."""
  _check_common(sde, score_fn, z, eps, solver, rtol, atol, num_steps, controller, step_control)
  return ode_lib.solve(probability_flow_drift(sde, score_fn), jnp.asarray(z, jnp.float32), sde.T, eps,
                       solver=solver, rtol=rtol, atol=atol, num_steps=num_steps, controller=controller,
                       step_control=step_control, sharding=sharding)


# ---------------------------------------------------------------------------------------------------
# Bits per dimension
# ---------------------------------------------------------------------------------------------------
SCALERS = {
    "centered": lambda u: 2.0 * u - 1.0,   # [0, 1] → [−1, 1]
    "unit": lambda u: u,                    # [0, 1] → [0, 1]
}

BPD_CONVENTION = (
    "bits/dim = −(log p(y) + log|det ∂y/∂u|) / (D ln 2) + b, with u = (x + U[0,1)) / 2^b the uniformly "
    "dequantized b-bit data in [0, 1), y = scaler(u) the model's input and log p(y) from the "
    "probability-flow ODE; for b = 8 and the centred scaler y = 2u − 1 (log|det| = D ln 2) this is "
    "NLL/(D ln 2) + 7, and for the identity scaler NLL/(D ln 2) + 8 (the official '7 − inverse_scaler(−1)')."
)


def scaler_log_abs_det(scaler, u):
  """Σ log|scaler'(u)| over the non-batch dimensions, for an elementwise scaler (a JVP with ones)."""
  _, d = jax.jvp(scaler, (u,), (jnp.ones_like(u),))
  return jnp.sum(jnp.log(jnp.abs(d)).reshape(u.shape[0], -1), axis=-1)


def _check_integer_data(x, num_bits, dequantization):
  """Integer data in {0, …, 2^b − 1} for 'uniform'; finite data in [0, 2^b) for 'none' (concrete arrays;
  a traced array is checked for its dtype only)."""
  if dequantization == "none":
    if isinstance(x, jax.core.Tracer):
      return
    checks.check_finite_data("x", x)
    arr = np.asarray(x)
    if arr.size and (arr.min() < 0 or arr.max() >= 2 ** num_bits):
      raise ValueError(f"with dequantization='none' the data must be dequantized values in [0, "
                       f"{2 ** num_bits}) for num_bits={num_bits}; got range [{arr.min()}, {arr.max()}]. "
                       f"Pass the raw integers with dequantization='uniform', or rescale the data.")
    return
  if isinstance(x, jax.core.Tracer):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError("bits_per_dim needs integer-valued data: pass an integer array (traced input must "
                       "have an integer dtype), or state dequantization='none' for data already "
                       "dequantized to [0, 2^num_bits).")
    return
  arr = np.asarray(x)
  if not np.issubdtype(arr.dtype, np.integer):
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
      raise ValueError("bits_per_dim needs integer-valued data (e.g. uint8 pixels); got non-integer "
                       "values. Pass the raw integers, or state dequantization='none' if the data is "
                       "already dequantized to [0, 2^num_bits).")
  if arr.size and (arr.min() < 0 or arr.max() > 2 ** num_bits - 1):
    raise ValueError(f"data values must lie in [0, {2 ** num_bits - 1}] for num_bits={num_bits}; got "
                     f"range [{arr.min()}, {arr.max()}].")


def bits_per_dim(key, sde, score_fn, x, *, num_bits=8, scaler="centered", dequantization="uniform",
                 divergence="hutchinson_rademacher", rtol=1e-5, atol=1e-5, eps=1e-5, num_probes=1,
                 solver=ode_lib.DEFAULT_SOLVER, num_steps=None, controller="batch", step_control=None,
                 sharding=None):
  """Bits per dimension of b-bit integer data x ∈ {0, …, 2^b − 1}^D under the model (see BPD_CONVENTION).

  Derivation: with u = (x + U)/2^b and y = scaler(u), the continuous density of v = x + U ∈ [0, 2^b)^D is
  p_v(v) = p(y) |det ∂y/∂u| 2^{−bD}, and −log₂ p_v / D is an upper bound (in expectation over U) on the
  discrete model's bits/dim.  So bpd = −(log p(y) + log|det ∂y/∂u|)/(D ln 2) + b.

  scaler: 'centered' (y = 2u − 1), 'unit' (y = u) or any elementwise callable on [0, 1]; its exact
  log-Jacobian is taken by automatic differentiation.  dequantization: 'uniform' (adds U[0, 1) noise to
  integer data; non-integer data is refused) or 'none' (x is already dequantized, in [0, 2^b)).
  controller, step_control, sharding: see `log_likelihood`.
  Returns (bpd [B], z, nfe).
  """
  checks.check_positive_int("num_bits", num_bits)
  dequantization = checks.check_choice("dequantization", dequantization, DEQUANTIZATIONS)
  if isinstance(scaler, str):
    scaler = SCALERS[checks.check_choice("scaler", scaler, SCALERS)]
  elif not callable(scaler):
    raise ValueError(f"scaler must be 'centered', 'unit' or an elementwise callable; got {scaler!r}.")
  _check_integer_data(x, num_bits, dequantization)
  k_deq, k_ll = jax.random.split(key)
  v = jnp.asarray(x, jnp.float32)
  if dequantization == "uniform":
    v = v + jax.random.uniform(k_deq, v.shape, jnp.float32)
  u = v / 2 ** num_bits
  y = scaler(u)
  log_det = scaler_log_abs_det(scaler, u)
  logp, z, nfe = log_likelihood(k_ll, sde, score_fn, y, divergence=divergence, rtol=rtol, atol=atol,
                                eps=eps, num_probes=num_probes, solver=solver, num_steps=num_steps,
                                controller=controller, step_control=step_control, sharding=sharding)
  d = math.prod(y.shape[1:])
  bpd = -(logp + log_det) / (d * math.log(2)) + num_bits
  return bpd, z, nfe

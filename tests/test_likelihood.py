"""Likelihood, encode/decode and bits/dim against the exact densities of a 2-D Gaussian mixture."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde_jax import likelihood
from score_sde_jax import sde as sde_lib
from score_sde_jax.datasets import toy

from tiers import default_or_slow  # tests/tiers.py

MIX = toy.ring8()
SDES = {
    "ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0),
    "vp": sde_lib.VPSDE(),
    "subvp": sde_lib.SubVPSDE(),
}
B = 128
EPS = 1e-5


_CASES = {}


def _case(sde_name):
  """One exact-divergence solve per SDE (computed once per process), shared by the tests below."""
  if sde_name not in _CASES:
    sde = SDES[sde_name]
    score_fn = MIX.perturbed_score_fn(sde)
    x = MIX.sample(jax.random.PRNGKey(7), B)
    logp, z, nfe = jax.jit(lambda k, x: likelihood.log_likelihood(k, sde, score_fn, x, divergence="exact",
                                                                   eps=EPS))(jax.random.PRNGKey(0), x)
    _CASES[sde_name] = (sde, score_fn, x, logp, z, nfe)
  return _CASES[sde_name]


@pytest.fixture(scope="module", params=list(SDES))
def case(request):
  return _case(request.param)


def test_exact_likelihood_equals_the_true_log_density(case):
  """|log p̂(x) − log p_eps(x)| ≤ 1e-3 nats per dimension for every example, after replacing the prior
  N(0, σ_T² I) at z by the exact marginal p_T(z) (the ODE maps p_eps exactly onto p_T, not onto the
  prior).  The solver tolerance (rtol = atol = 1e-5) bounds the error well below that."""
  sde, _, x, logp, z, nfe = case
  log_pt = MIX.perturbed_log_prob_fn(sde)
  corrected = logp - sde.prior_logp(z) + log_pt(z, jnp.full((B,), sde.T))
  true = log_pt(x, jnp.full((B,), EPS))
  err_per_dim = np.abs(np.asarray(corrected - true)) / MIX.dim
  assert err_per_dim.max() < 1e-3, err_per_dim.max()
  assert 10 < int(nfe) < 2000


# Each SDE and each estimator at least once by default; the other three pairs with -m slow.
_HUTCHINSON_BY_DEFAULT = {("ve", "hutchinson_rademacher"), ("vp", "hutchinson_gaussian"),
                          ("subvp", "hutchinson_rademacher")}


@pytest.mark.parametrize("sde_name,divergence", default_or_slow(
    [(s, d) for s in SDES for d in ("hutchinson_rademacher", "hutchinson_gaussian")], _HUTCHINSON_BY_DEFAULT))
def test_hutchinson_estimators_agree_with_the_exact_divergence(sde_name, divergence):
  """The mean over 8 independent probe draws (2 probes each) of the Hutchinson log-likelihood, averaged
  over examples, agrees with the exact one within 3 standard errors (SE from the spread over draws)."""
  sde, score_fn, x, logp_exact, _, _ = _case(sde_name)
  f = jax.jit(lambda k: likelihood.log_likelihood(k, sde, score_fn, x, divergence=divergence, eps=EPS,
                                                  num_probes=2)[0])
  diffs = np.stack([np.asarray(f(jax.random.PRNGKey(100 + i)) - logp_exact).mean() for i in range(8)])
  se = diffs.std(ddof=1) / math.sqrt(diffs.size)
  assert abs(diffs.mean()) <= 3 * se + 1e-4, (diffs.mean(), se)
  assert diffs.std() > 0  # the estimator is stochastic: the test can fail


def test_decode_inverts_encode(case):
  """decode(encode(x)) = x within 1e-3 relative L2 (ODE round trip at rtol = atol = 1e-5)."""
  sde, score_fn, x, _, z_ll, _ = case
  z, _ = likelihood.encode(sde, score_fn, x, eps=EPS)
  np.testing.assert_allclose(z, z_ll, rtol=1e-3, atol=1e-3)
  x_rec, _ = likelihood.decode(sde, score_fn, z, eps=EPS)
  assert float(jnp.linalg.norm(x_rec - x) / jnp.linalg.norm(x)) <= 1e-3


def _gaussian_case():
  """A model whose density is known in closed form: the exact VP score of a 4-D Gaussian."""
  gauss = toy.GaussianMixture(np.ones(1), np.zeros((1, 4)), 0.09 * np.eye(4)[None])
  sde = sde_lib.VPSDE()
  return gauss, sde, gauss.perturbed_score_fn(sde)


def test_bits_per_dim_follows_its_derivation():
  """bits_per_dim = −(log p(y) + log|det ∂y/∂u|)/(D ln 2) + b, checked by recomputing it from
  log_likelihood with the same keys, for the centred (offset 7 at 8 bits), unit (offset 8) and a
  nonlinear (logit-type) scaler whose log-Jacobian is known analytically, and for 5-bit data."""
  _, sde, score_fn = _gaussian_case()
  key = jax.random.PRNGKey(3)
  x_int = jax.random.randint(jax.random.PRNGKey(4), (16, 4), 100, 156)
  d = 4
  for num_bits, scaler, log_det_fn in [
      (8, "centered", lambda u: d * math.log(2.0) * jnp.ones(u.shape[0])),
      (8, "unit", lambda u: jnp.zeros(u.shape[0])),
      (5, "centered", lambda u: d * math.log(2.0) * jnp.ones(u.shape[0])),
      (8, lambda u: 0.5 * jnp.log(u / (1 - u)),
       lambda u: jnp.sum(jnp.log(0.5 / (u * (1 - u))), axis=1)),
  ]:
    xi = x_int if num_bits == 8 else x_int % 32
    bpd, z, _ = likelihood.bits_per_dim(key, sde, score_fn, xi, num_bits=num_bits, scaler=scaler)
    k_deq, k_ll = jax.random.split(key)
    u = (xi + jax.random.uniform(k_deq, xi.shape)) / 2 ** num_bits
    fn = likelihood.SCALERS[scaler] if isinstance(scaler, str) else scaler
    logp, _, _ = likelihood.log_likelihood(k_ll, sde, score_fn, fn(u))
    expected = -(logp + log_det_fn(u)) / (d * math.log(2)) + num_bits
    np.testing.assert_allclose(bpd, expected, rtol=1e-5)
  # The official 8-bit centred convention: bpd = NLL/(D ln 2) + 7.
  bpd, _, _ = likelihood.bits_per_dim(key, sde, score_fn, x_int)
  k_deq, k_ll = jax.random.split(key)
  y = 2 * (x_int + jax.random.uniform(k_deq, x_int.shape)) / 256 - 1
  logp, _, _ = likelihood.log_likelihood(k_ll, sde, score_fn, y)
  np.testing.assert_allclose(bpd, -logp / (d * math.log(2)) + 7, rtol=1e-5)


def test_bits_per_dim_refuses_non_integer_data_unless_told():
  _, sde, score_fn = _gaussian_case()
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 4)) * 255
  with pytest.raises(ValueError, match="integer"):
    likelihood.bits_per_dim(jax.random.PRNGKey(1), sde, score_fn, x)
  with pytest.raises(ValueError, match=r"\[0, 255\]"):
    likelihood.bits_per_dim(jax.random.PRNGKey(1), sde, score_fn, jnp.full((4, 4), 300))
  bpd, _, _ = likelihood.bits_per_dim(jax.random.PRNGKey(1), sde, score_fn, x, dequantization="none")
  assert bpd.shape == (4,) and np.all(np.isfinite(bpd))


def test_non_finite_or_out_of_range_data_is_refused_before_any_solve():
  """NaN/Inf data fails at once naming the count and the first index (before: 16,384 solver steps and a
  message about the solver); dequantization='none' refuses values outside [0, 2^b)."""
  _, sde, score_fn = _gaussian_case()
  rng = np.random.default_rng()
  x = rng.normal(size=(4, 4)).astype(np.float32)
  where = tuple(int(i) for i in rng.integers(0, 4, size=2))
  x[where] = rng.choice([np.nan, np.inf, -np.inf])
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  for fn in (lambda: likelihood.log_likelihood(key, sde, score_fn, x),
             lambda: likelihood.encode(sde, score_fn, x),
             lambda: likelihood.decode(sde, score_fn, x),
             lambda: likelihood.bits_per_dim(key, sde, score_fn, np.abs(x) * 10, dequantization="none")):
    with pytest.raises(ValueError, match=r"x holds 1 NaN/Inf value\(s\) of 16 \(first at index "
                                         + re.escape(str(where))):
      fn()
  u = rng.uniform(0, 256, size=(4, 4)).astype(np.float32)
  for bad in (u - 300.0, u + 256.0, u * 2.0 + 1.0):
    bad[where] = 256.0 if bad.max() < 256 else bad[where]
    with pytest.raises(ValueError, match=r"dequantization='none'.*\[0, 256\)"):
      likelihood.bits_per_dim(key, sde, score_fn, bad, dequantization="none")


def test_bits_per_dim_matches_the_true_discrete_probability_bound():
  """3-bit 1-D data, model = the exact VP score of a known Gaussian in model space: bits/dim from the ODE
  equals −log₂ p_v(x + U) computed from the closed-form density, p_v = p(y)·2·2⁻³ (y = 2u − 1), within
  0.05 bits per example (the prior mismatch at T and the solver error are far smaller)."""
  gauss = toy.GaussianMixture(np.ones(1), np.full((1, 1), 0.1), 0.04 * np.eye(1)[None])
  sde = sde_lib.VPSDE()
  score_fn = gauss.perturbed_score_fn(sde)
  x_int = jnp.arange(8).repeat(64)[:, None]
  bpd, _, _ = jax.jit(lambda k: likelihood.bits_per_dim(k, sde, score_fn, x_int, num_bits=3,
                                                        divergence="exact"))(jax.random.PRNGKey(2))
  k_deq, _ = jax.random.split(jax.random.PRNGKey(2))
  u = (x_int + jax.random.uniform(k_deq, x_int.shape)) / 8
  log_p_true = _logp_at_eps(gauss, sde)(2 * u - 1)
  bpd_true = -(log_p_true + math.log(2)) / math.log(2) + 3
  np.testing.assert_allclose(np.asarray(bpd), np.asarray(bpd_true), atol=0.05)


def _logp_at_eps(mix, sde):
  return lambda y: mix.perturbed_log_prob_fn(sde)(y, jnp.full((y.shape[0],), 1e-5))


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_rk45_reproduces_the_official_scipy_solver(sde_name):
  """'rk45' (its default 'scipy' step control) on the device takes the steps of the official solver,
  scipy's solve_ivp(method='RK45') on the flattened [x, Δlog p] of the batch with the same vector field:
  the same NFE (scipy's nfev), and log p equal up to float32 round-off (scipy's state is float64, the
  device's float32; with the same steps accepted, only round-off separates them, which the flow
  amplifies to ~4e-5 relative for VE: 1e-4 relative and absolute is the bound checked)."""
  from scipy import integrate
  from score_sde_jax import ode
  sde = SDES[sde_name]
  score_fn = MIX.perturbed_score_fn(sde)
  x = MIX.sample(jax.random.PRNGKey(3), 32)
  logp, _, nfe = jax.jit(lambda x: likelihood.log_likelihood(
      None, sde, score_fn, x, divergence="exact", solver="rk45", rtol=1e-4, atol=1e-4, eps=EPS))(x)
  f = likelihood.likelihood_vector_field(sde, score_fn, "exact")
  b = x.shape[0]
  flat = jax.jit(lambda t, y: jnp.concatenate(
      [v.reshape(-1) for v in f(t, (y[:-b].reshape(x.shape), jnp.zeros(b)), None)]))
  sol = integrate.solve_ivp(lambda t, y: np.asarray(flat(jnp.float32(t), jnp.asarray(y, jnp.float32)),
                                                    np.float64),
                            (EPS, sde.T), np.concatenate([np.asarray(x, np.float64).reshape(-1), np.zeros(b)]),
                            method="RK45", rtol=1e-4, atol=1e-4)
  z = sol.y[:-b, -1].reshape(x.shape)
  logp_scipy = np.asarray(sde.prior_logp(jnp.asarray(z))) + sol.y[-b:, -1]
  assert int(nfe) == sol.nfev
  np.testing.assert_allclose(np.asarray(logp), logp_scipy, rtol=1e-4, atol=1e-4)
  assert ode.check_step_control(None, "rk45") == "scipy"

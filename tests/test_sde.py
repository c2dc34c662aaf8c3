"""The SDEs against their closed forms: marginals vs Euler–Maruyama simulation, prior law, discretisations,
the importance-sampling antiderivatives, and jit/vmap/pytree use."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from score_sde_jax import sde as sde_lib
from score_sde_jax.datasets import toy

SDES = {
    "ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0, N=1000),
    "vp": sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000),
    "subvp": sde_lib.SubVPSDE(beta_min=0.1, beta_max=20.0, N=1000),
}


@pytest.fixture(params=list(SDES))
def sde(request):
  return SDES[request.param]


def _simulate_forward(sde, key, x0, t0, t1, steps):
  """Euler–Maruyama simulation of the forward SDE from t0 to t1."""
  dt = (t1 - t0) / steps
  n = x0.shape[0]

  def body(carry, i):
    x, key = carry
    key, sub = jax.random.split(key)
    t = jnp.full((n,), t0 + i * dt)
    drift, diffusion = sde.sde(x, t)
    x = x + drift * dt + sde_lib.batch_mul(diffusion * math.sqrt(dt), jax.random.normal(sub, x.shape))
    return (x, key), None

  return jax.lax.scan(body, (x0, key), jnp.arange(steps))[0][0]


@pytest.mark.parametrize("t1", [0.3, 1.0])
def test_marginal_prob_matches_euler_maruyama(sde, t1):
  """Mean and variance of x(t1) from 1000 EM steps agree with marginal_prob.

  x(0) is the 1-D mixture (for VE plus N(0, σ_min²), the official convention that p_0 is the data
  perturbed at σ_min).  n = 40,000 paths; tolerance: 5 standard errors of the sample mean / variance plus
  0.5% for the EM discretisation bias at 1000 steps (the VP mean decays as Π(1 − β dt/2) instead of
  exp(−∫β/2): relative error ≲ Σ(β dt)²/8 < 0.2%)."""
  n = 40000
  mix = toy.mixture1d()
  key = jax.random.PRNGKey(11)
  k0, k1, k2 = jax.random.split(key, 3)
  x0 = mix.sample(k0, n)
  if isinstance(sde, sde_lib.VESDE):
    x0 = x0 + sde.sigma_min * jax.random.normal(k1, x0.shape)
  x1 = np.asarray(jax.jit(_simulate_forward, static_argnums=(0, 3, 4, 5))(sde, k2, x0, 0.0, t1, 1000))

  mean_x0 = float(np.sum(mix.weights * mix.means[:, 0]))
  var_x0 = float(np.sum(mix.weights * (mix.covs[:, 0, 0] + mix.means[:, 0] ** 2)) - mean_x0 ** 2)
  m, s = sde.mean_coeff_and_std(jnp.asarray(t1))
  mean_pred, _ = sde.marginal_prob(jnp.full((1, 1), mean_x0), jnp.full((1,), t1))
  var_pred = float(m) ** 2 * var_x0 + float(s) ** 2
  assert float(mean_pred[0, 0]) == pytest.approx(float(m) * mean_x0, rel=1e-6)

  se_mean = math.sqrt(var_pred / n)
  se_var = var_pred * math.sqrt(2.0 / n)
  assert abs(x1.mean() - float(m) * mean_x0) < 5 * se_mean + 0.005 * abs(float(m) * mean_x0)
  assert abs(x1.var() - var_pred) < 5 * se_var + 0.005 * var_pred


def test_prior_logp_is_the_log_density_of_prior_sampling(sde):
  """prior_logp equals the N(0, σ²I) log-density summed over dims, and prior_sampling draws from it
  (sample std within 4 standard errors; KS test p > 1e-3)."""
  key = jax.random.PRNGKey(3)
  z = sde.prior_sampling(key, (20000, 3))
  std = sde.sigma_max if isinstance(sde, sde_lib.VESDE) else 1.0
  ref = scipy.stats.norm(scale=std).logpdf(np.asarray(z, np.float64)).sum(axis=1)
  np.testing.assert_allclose(np.asarray(sde.prior_logp(z)), ref, rtol=1e-5, atol=1e-4)
  flat = np.asarray(z).ravel()
  assert abs(flat.std() - std) < 4 * std / math.sqrt(2 * flat.size)
  assert scipy.stats.kstest(flat / std, "norm").pvalue > 1e-3
  # The density integrates to one (1-D grid, trapezoid rule).
  grid = jnp.linspace(-12 * std, 12 * std, 20001)[:, None]
  assert float(jnp.trapezoid(jnp.exp(sde.prior_logp(grid)), grid[:, 0])) == pytest.approx(1.0, abs=1e-5)


def test_reverse_and_probability_flow_drifts(sde):
  """reverse(): drift f − g² s and diffusion g; probability flow: f − ½ g² s and zero diffusion."""
  key = jax.random.PRNGKey(5)
  x = jax.random.normal(key, (7, 3))
  t = jax.random.uniform(jax.random.PRNGKey(6), (7,), minval=0.1, maxval=0.9)
  score_fn = lambda x, t: -x * (1.0 + t[:, None])
  f, g = sde.sde(x, t)
  s = score_fn(x, t)
  rd, rg = sde.reverse(score_fn).sde(x, t)
  pd, pg = sde.reverse(score_fn, probability_flow=True).sde(x, t)
  np.testing.assert_allclose(rd, f - (g ** 2)[:, None] * s, rtol=1e-6)
  np.testing.assert_allclose(rg, g)
  np.testing.assert_allclose(pd, f - 0.5 * (g ** 2)[:, None] * s, rtol=1e-6)
  assert np.all(np.asarray(pg) == 0)
  # Discretised reverse: rev_f = f_i − G_i² s, rev_G = G_i.
  fi, Gi = sde.discretize(x, t)
  rf, rG = sde.reverse(score_fn).discretize(x, t)
  np.testing.assert_allclose(rf, fi - (Gi ** 2)[:, None] * s, rtol=1e-6)
  np.testing.assert_allclose(rG, Gi)


def test_discrete_chains_reproduce_the_marginals():
  """The SMLD chain's variances add up to the ladder σ_i², and the DDPM chain's ᾱ_N matches the
  continuous VP kernel at t = 1 (to O(1/N)); Euler–Maruyama discretisation for sub-VP uses Δt = 1/N."""
  ve = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=100)
  ts = jnp.minimum((jnp.arange(ve.N) + 0.5) / (ve.N - 1), 1.0)  # mid-cell: floor(t (N−1)) = i
  _, G = ve.discretize(jnp.zeros((ve.N, 1)), ts)
  np.testing.assert_allclose(np.cumsum(np.asarray(G) ** 2), np.asarray(ve.discrete_sigmas) ** 2,
                             rtol=1e-4)
  vp = sde_lib.VPSDE(N=1000)
  m, _ = vp.mean_coeff_and_std(jnp.asarray(1.0))
  # log √ᾱ_N − log m(1) = ½ Σ [log(1 − β_i) + β_i] ≈ −¼ Σ β_i²: the O(1/N) gap of the chain.
  gap = math.log(float(vp.sqrt_alphas_cumprod[-1])) - math.log(float(m))
  sum_b2 = float(jnp.sum(vp.discrete_betas ** 2))
  assert -0.3 * sum_b2 < gap < -0.2 * sum_b2
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 2))
  t = jnp.full((4,), 0.5)
  f, G = vp.discretize(x, t)
  beta = float(vp.discrete_betas[int(0.5 * 999)])
  np.testing.assert_allclose(f, (math.sqrt(1 - beta) - 1) * x, rtol=1e-4)  # float32 cancellation
  np.testing.assert_allclose(G, math.sqrt(beta), rtol=1e-6)
  sub = sde_lib.SubVPSDE(N=50)
  f, G = sub.discretize(x, t)
  drift, diffusion = sub.sde(x, t)
  np.testing.assert_allclose(f, drift / 50, rtol=1e-6)
  np.testing.assert_allclose(G, diffusion * math.sqrt(1 / 50), rtol=1e-6)


def test_weight_integral_is_an_antiderivative_of_g2_over_sigma2(sde):
  """d/dt weight_integral = g²/σ² (autodiff, rel. 1e-4 in float32) and weight_integral_inverse inverts
  it (1e-4 relative) on t ∈ [1e-3, 1]."""
  t = jnp.concatenate([jnp.geomspace(1e-3, 0.05, 20), jnp.linspace(0.05, 1.0, 30)])
  deriv = jax.vmap(jax.grad(lambda u: sde.weight_integral(u)))(t)
  _, std = sde.mean_coeff_and_std(t)
  g2 = sde.sde(jnp.zeros((t.shape[0], 1)), t)[1] ** 2
  np.testing.assert_allclose(deriv, g2 / std ** 2, rtol=2e-4)
  np.testing.assert_allclose(sde.weight_integral_inverse(sde.weight_integral(t)), t, rtol=1e-4)


def test_sdes_are_static_hashable_pytrees(sde):
  """An SDE works as a static jit argument, as a (leafless) pytree argument, and under vmap."""
  assert jax.tree_util.tree_leaves(sde) == []
  assert hash(sde) == hash(type(sde)(**{f: getattr(sde, f) for f in sde.__dataclass_fields__}))
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 2))
  t = jax.random.uniform(jax.random.PRNGKey(2), (5,))
  ref = sde.marginal_prob(x, t)
  static = jax.jit(lambda s, x, t: s.marginal_prob(x, t), static_argnums=0)(sde, x, t)
  as_tree = jax.jit(lambda s, x, t: s.marginal_prob(x, t))(sde, x, t)
  vmapped = jax.vmap(lambda x, t: sde.marginal_prob(x[None], t[None]))(x, t)
  for out in (static, as_tree):
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-6)
    np.testing.assert_allclose(out[1], ref[1], rtol=1e-6)
  np.testing.assert_allclose(vmapped[0][:, 0], ref[0], rtol=1e-6)
  np.testing.assert_allclose(vmapped[1][:, 0], ref[1], rtol=1e-6)


def test_subvp_variance_is_bounded_by_vp():
  t = jnp.linspace(1e-3, 1, 100)
  _, s_vp = sde_lib.VPSDE().mean_coeff_and_std(t)
  _, s_sub = sde_lib.SubVPSDE().mean_coeff_and_std(t)
  assert bool(jnp.all(s_sub <= s_vp))


def test_mixture_scores_are_gradients_of_the_log_density(sde):
  """The exact perturbed score of a mixture equals ∇ of its exact perturbed log-density (autodiff)."""
  mix = toy.ring8()
  x = mix.sample(jax.random.PRNGKey(4), 16) * 1.3
  t = jax.random.uniform(jax.random.PRNGKey(5), (16,), minval=1e-3, maxval=1.0)
  logp = mix.perturbed_log_prob_fn(sde)
  grad = jax.grad(lambda y: jnp.sum(logp(y, t)))(x)
  np.testing.assert_allclose(mix.perturbed_score_fn(sde)(x, t), grad, rtol=1e-4, atol=1e-4)

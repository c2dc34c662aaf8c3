"""Controllable generation (classifier and classifier-free guidance, inpainting, colourisation) and SGLD,
against exact answers.

Ground truth.  A Gaussian mixture whose component index is the label has, for every t, an exact score, an
exact class-conditional score and an exact noise-conditional classifier (datasets/toy_labels.py): so
guided sampling must reproduce the chosen component, classifier-free guidance of Gaussians with a shared
covariance has a closed form, and inpainting/colourisation of data whose known and unknown parts are
independent under every p_t must reproduce the unknown part's marginal.  SGLD on Bayesian linear
regression has a conjugate Gaussian posterior and, at a constant step, an exactly computable stationary
covariance (sgld.linear_regression_sgld_stationary_cov).

Tolerances (the statistical reasoning; every statistical test uses a fixed key and is deterministic):
* mode weights within 0.03 with n = 4,000 (guidance) or 10,000 (inpainting): the standard error of a
  weight 0.3 is √(0.21/n) = 0.0072 / 0.0046, so 0.03 is 4.1 / 6.5 SE;
* a mode's std within 5%: SE of a sample std is std/√(2 n_mode) = 1.1% (n_mode = 4,000) or 1.3%
  (n_mode = 3,000), so 5% is ≥ 3.8 SE, the rest left to the sampler's discretisation (N = 500 steps; the
  Langevin corrector's last noise-free step narrows a mode by up to ~2.5%);
* a mode's mean within 5% of |μ| = 2 (0.1), ≥ 10 SE: the means are the loosest check, as in the brief;
* the fraction of guided samples in the chosen component (x < 0 for the mode at −2): truth Φ(4) ≈ 1 − 3e-5,
  required ≥ 0.97.
Statistical tests run on N = 500-step VP samplers by default; other SDEs are `slow`.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde_jax import controllable, sampling, sgld
from score_sde_jax import sde as sde_lib
from score_sde_jax.datasets import toy, toy_labels

from tiers import default_or_slow  # tests/tiers.py

EPS = 1e-3
N_STEPS = 500
MIX = toy.mixture1d()                 # 0.3 N(−2, 0.5²) + 0.7 N(2, 0.5²); label 0 is the mode at −2
SDES = {
    "vp": sde_lib.VPSDE(N=N_STEPS),
    "subvp": sde_lib.SubVPSDE(N=N_STEPS),
    # σ_max = 50 (not 10): the VE prior N(0, σ_max²) must match p_T for the ODE, which transports the
    # prior's mismatch deterministically (σ_max = 10 shrinks a mode's mean by ~|μ| σ_mode / σ_max = 5%).
    "ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=1000),
}


def _fresh_key():
  return jax.random.PRNGKey(int(np.random.default_rng().integers(1 << 30)))


def _std_at_eps(sde, std0, eps=EPS):
  m, s = sde.mean_coeff_and_std(jnp.asarray(eps))
  return float(np.sqrt(float(m) ** 2 * std0 ** 2 + float(s) ** 2)), float(m)


def _check_component(x, sde, mean0, std0, label=""):
  """Samples of N(m μ, m² std0² + σ²) at eps: fraction on μ's side ≥ 0.97, mean and std within 5%."""
  x = np.asarray(x, np.float64).reshape(-1)
  assert np.all(np.isfinite(x)), label
  true_std, m = _std_at_eps(sde, std0)
  inside = x[np.sign(x) == np.sign(mean0)]
  assert inside.size / x.size >= 0.97, (label, inside.size / x.size)
  assert abs(inside.mean() / (m * mean0) - 1) < 0.05, (label, inside.mean(), m * mean0)
  assert abs(inside.std() / true_std - 1) < 0.05, (label, inside.std(), true_std)


def _check_mixture1d(x, sde, label=""):
  x = np.asarray(x, np.float64).reshape(-1)
  assert np.all(np.isfinite(x)), label
  true_std, m = _std_at_eps(sde, 0.5)
  left, right = x[x < 0], x[x >= 0]
  assert abs(left.size / x.size - MIX.weights[0]) < 0.03, (label, left.size / x.size)
  for part, mu in ((left, -2.0), (right, 2.0)):
    assert abs(part.mean() / (m * mu) - 1) < 0.05, (label, part.mean())
    assert abs(part.std() / true_std - 1) < 0.05, (label, part.std(), true_std)


# ---------------------------------------------------------------------------------------------------
# The exact classifier and classifier guidance
# ---------------------------------------------------------------------------------------------------
ANISO = toy.GaussianMixture(
    weights=np.array([0.2, 0.5, 0.3]),
    means=np.array([[-2.0, 1.0], [2.0, 0.5], [0.0, -2.5]]),
    covs=np.array([[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.4]], [[0.5, 0.0], [0.0, 0.1]]]),
    name="aniso")


@pytest.mark.parametrize("sde_name", list(SDES))
def test_guided_score_at_scale_one_is_the_exact_conditional_score(sde_name):
  """Bayes' rule, analytically: ∇ log p_t(x) + ∇ log p_t(y | x) = ∇ log p_t(x | y) = C_y⁻¹ (m μ_y − x)
  for an anisotropic 2-D mixture at t from eps to T, every label; the exact classifier's probabilities
  sum to one.  Float32 tolerance: the scores are up to ~1/σ_min² at small t."""
  sde = SDES[sde_name]
  key = _fresh_key()
  n = 96
  x = 3.0 * jax.random.normal(key, (n, 2))
  t = jnp.tile(jnp.asarray([EPS, 0.05, 0.3, 0.7, 1.0]), n)[:n]
  y = jnp.arange(n, dtype=jnp.int32) % 3
  log_probs = toy_labels.noise_conditional_log_prob_fn(ANISO, sde)
  np.testing.assert_allclose(jax.scipy.special.logsumexp(jax.jit(log_probs)(x, t), axis=1), 0.0, atol=1e-5)
  guided = jax.jit(controllable.classifier_guided_score_fn(ANISO.perturbed_score_fn(sde), log_probs, y, 1.0))(x, t)
  exact = jax.jit(toy_labels.component_score_fn(ANISO, sde))(x, t, y)
  m, s = sde.mean_coeff_and_std(t)
  cov = (m ** 2)[:, None, None] * jnp.asarray(ANISO.covs, jnp.float32)[y] + (s ** 2)[:, None, None] * jnp.eye(2)
  by_hand = jnp.linalg.solve(cov, (m[:, None] * jnp.asarray(ANISO.means, jnp.float32)[y] - x)[..., None])[..., 0]
  np.testing.assert_allclose(exact, by_hand, rtol=1e-4, atol=1e-4)
  scale = jnp.max(jnp.abs(exact), axis=1, keepdims=True)
  np.testing.assert_allclose(guided / scale, exact / scale, atol=2e-4)
  # scale s: the unconditional score plus s times the classifier gradient
  base = jax.jit(ANISO.perturbed_score_fn(sde))(x, t)
  g2 = jax.jit(controllable.classifier_guided_score_fn(ANISO.perturbed_score_fn(sde), log_probs, y, 2.5))(x, t)
  np.testing.assert_allclose(g2 / scale, (base + 2.5 * (exact - base)) / scale, atol=5e-4)


def test_classifier_logits_are_normalised():
  """Logits and log-probabilities give the same guidance (log_softmax is a no-op on the latter)."""
  sde = SDES["vp"]
  key = _fresh_key()
  x = jax.random.normal(key, (16, 2))
  t = jnp.full((16,), 0.2)
  y = jnp.arange(16, dtype=jnp.int32) % 3
  log_probs = toy_labels.noise_conditional_log_prob_fn(ANISO, sde)
  logits = lambda x, t: log_probs(x, t) + 7.0 + jnp.sum(x, axis=1, keepdims=True)
  a = jax.jit(controllable.classifier_guided_score_fn(ANISO.perturbed_score_fn(sde), log_probs, y))(x, t)
  b = jax.jit(controllable.classifier_guided_score_fn(ANISO.perturbed_score_fn(sde), logits, y))(x, t)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


N_GUIDED = 4000


def _guided(sde, scale, label=0, n=N_GUIDED):
  y = jnp.full((n,), label, jnp.int32)
  return controllable.classifier_guided_score_fn(
      MIX.perturbed_score_fn(sde), toy_labels.noise_conditional_log_prob_fn(MIX, sde), y, scale)


def _sde_params(names_default):
  return default_or_slow(list(SDES), names_default)


@pytest.mark.parametrize("sde_name", _sde_params(("vp",)))
def test_classifier_guided_pc_sampling_reproduces_the_component(sde_name):
  """Reverse diffusion + Langevin (the official order, corrector first), N = 500: guidance towards the
  minority mode (weight 0.3, at −2) gives N(−2, 0.5²), ≥ 97% of samples in it."""
  sde = SDES[sde_name]
  score_fn = _guided(sde, 1.0)
  x, nfe = jax.jit(lambda k: sampling.pc_sample(k, sde, score_fn, (N_GUIDED, 1), predictor="reverse_diffusion",
                                                corrector="langevin", order="corrector_first", eps=EPS))(
                                                    jax.random.PRNGKey(10))
  _check_component(x, sde, -2.0, 0.5, label=("pc", sde_name))
  assert int(nfe) == 2 * sde.N


@pytest.mark.parametrize("sde_name", _sde_params(("vp",)))
def test_classifier_guided_ode_sampling_reproduces_the_component(sde_name):
  sde = SDES[sde_name]
  x, nfe = sampling.ode_sample(jax.random.PRNGKey(11), sde, _guided(sde, 1.0), (N_GUIDED, 1), eps=EPS)
  _check_component(x, sde, -2.0, 0.5, label=("ode", sde_name))
  assert 10 < int(nfe) < 1000


@pytest.mark.parametrize("method", ["pc", "ode"])
def test_guidance_scale_zero_reproduces_the_mixture(method):
  """scale = 0: the unconditional score, so the mixture (weights 0.3 / 0.7) comes back."""
  sde = SDES["vp"]
  score_fn = _guided(sde, 0.0)
  if method == "pc":
    x, _ = jax.jit(lambda k: sampling.pc_sample(k, sde, score_fn, (N_GUIDED, 1), predictor="reverse_diffusion",
                                                corrector="langevin", order="corrector_first"))(
                                                    jax.random.PRNGKey(12))
  else:
    x, _ = sampling.ode_sample(jax.random.PRNGKey(13), sde, score_fn, (N_GUIDED, 1))
  _check_mixture1d(x, sde, label=method)


# ---------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------------
def _pc_run(sde, score_fn, n, key):
  return sampling.pc_sample(key, sde, score_fn, (n, 1), predictor="reverse_diffusion", corrector="langevin",
                            order="corrector_first")[0]


def _pc(sde, score_fn, n, key):
  return jax.jit(lambda k: _pc_run(sde, score_fn, n, k))(key)


def test_classifier_free_guidance_at_weight_zero_is_the_conditional():
  """w = 0 returns the conditional score itself (bit for bit), and sampling with it gives the class."""
  sde = SDES["vp"]
  cond = toy_labels.conditional_score_fn(MIX, sde)
  y = jnp.zeros((N_GUIDED,), jnp.int32)
  score_fn = controllable.classifier_free_score_fn(cond, y, 0.0, null_label=MIX.num_components)
  x = jax.random.normal(_fresh_key(), (N_GUIDED, 1)) * 3
  t = jnp.full((N_GUIDED,), 0.4)
  np.testing.assert_array_equal(score_fn(x, t), cond(x, t, y))
  _check_component(_pc(sde, score_fn, N_GUIDED, jax.random.PRNGKey(20)), sde, -2.0, 0.5, label="cfg w=0")


def test_classifier_free_guidance_of_shared_covariance_gaussians_is_exact():
  """Classes N(μ_y, v) and an unconditional N(μ_∅, v) with one covariance: for every t,
  (1 + w) C⁻¹(m μ_y − x) − w C⁻¹(m μ_∅ − x) = C⁻¹(m [(1 + w) μ_y − w μ_∅] − x), the score of
  N((1 + w) μ_y − w μ_∅, v) under the SDE, so guided samples are exactly that Gaussian: here
  μ_y = 2, μ_∅ = 0, v = 0.5², w = 1 → N(4, 0.5²)."""
  sde = SDES["vp"]
  gm = toy.GaussianMixture(np.ones(3) / 3, np.array([[-2.0], [2.0], [0.0]]), np.full((3, 1, 1), 0.25))
  y = jnp.ones((N_GUIDED,), jnp.int32)
  score_fn = controllable.classifier_free_score_fn(toy_labels.component_score_fn(gm, sde), y, 1.0, null_label=2)
  _check_component(_pc(sde, score_fn, N_GUIDED, jax.random.PRNGKey(21)), sde, 4.0, 0.5, label="cfg exact")


def test_classifier_free_guidance_sharpens_the_class():
  """Overlapping classes N(∓1, 1), weights ½: the conditional of class +1 is N(1, 1) (P(x < 0) =
  0.159).  w > 0 samples ∝ p(x | y) p(y | x)^w (approximately), which tilts the class away from the
  other: the mean rises, the std and the mass on the other side fall, monotonically in w.  Observed
  (n = 4000, N = 500): w = 0: 1.02 / 1.01 / 0.158; w = 1: 1.32 / 0.87 / 0.059; w = 3: 1.57 / 0.78 /
  0.011.  Required: the w = 0 moments within 5% (SE 1.6% / 1.1%), and each step in w moving the
  mean up by > 0.15 (SE of a difference of means √2/√4000 = 0.022), the std down by > 5% and the
  other side's mass down by > 0.02."""
  sde = SDES["vp"]
  gm = toy.GaussianMixture(np.array([0.5, 0.5]), np.array([[-1.0], [1.0]]), np.ones((2, 1, 1)))
  cond = toy_labels.conditional_score_fn(gm, sde)
  y = jnp.ones((N_GUIDED,), jnp.int32)
  # The weight is an argument of one compiled sampler (a traced guidance weight).
  run = jax.jit(lambda k, w: _pc_run(sde, controllable.classifier_free_score_fn(cond, y, w, null_label=2),
                                     N_GUIDED, k))
  stats = []
  for w in (0.0, 1.0, 3.0):
    x = np.asarray(run(jax.random.PRNGKey(22), w), np.float64)[:, 0]
    stats.append((x.mean(), x.std(), (x < 0).mean()))
  (m0, s0, p0) = stats[0]
  true_std, _ = _std_at_eps(sde, 1.0)
  assert abs(m0 - 1.0) < 0.05 and abs(s0 / true_std - 1) < 0.05, stats
  assert abs(p0 - 0.1587) < 0.025, stats      # SE √(0.13/4000) = 0.0058
  for (ma, sa, pa), (mb, sb, pb) in zip(stats, stats[1:]):
    assert mb > ma + 0.15 and sb < 0.95 * sa and pb < pa - 0.02, stats


# ---------------------------------------------------------------------------------------------------
# Inpainting
# ---------------------------------------------------------------------------------------------------
def _product_mixture(a: toy.GaussianMixture, b: toy.GaussianMixture) -> toy.GaussianMixture:
  """The 2-D mixture of independent coordinates x₀ ~ a, x₁ ~ b (components (i, j), weights a_i b_j).
  Its score factorises for every t, so x₁ | x₀ ~ b under every p_t."""
  w = np.outer(a.weights, b.weights).ravel()
  means = np.array([[ma[0], mb[0]] for ma in a.means for mb in b.means])
  covs = np.array([np.diag([ca[0, 0], cb[0, 0]]) for ca in a.covs for cb in b.covs])
  return toy.GaussianMixture(w, means, covs, name="product")


INDEP = _product_mixture(toy.GaussianMixture(np.array([0.5, 0.5]), np.array([[-1.5], [1.5]]),
                                             np.full((2, 1, 1), 0.25)), MIX)


@pytest.mark.parametrize("sde_name,predictor,corrector", [
    ("vp", "reverse_diffusion", "langevin"),
    pytest.param("ve", "reverse_diffusion", "langevin", marks=pytest.mark.slow),
    pytest.param("subvp", "euler_maruyama", "none", marks=pytest.mark.slow),
    pytest.param("vp", "ancestral_sampling", "langevin", marks=pytest.mark.slow)])
def test_inpainting_independent_parts_gives_the_marginal(sde_name, predictor, corrector):
  """x = (x₀, x₁) with x₀ ~ ½N(∓1.5, 0.5²) known and x₁ ~ mixture1d to fill in, independent: the
  filled-in x₁ must follow mixture1d whatever x₀ (n = 10,000: weights within 0.03, modes' mean and
  std within 5%, overall std (1.90) within 5% (SE 0.7%)), be uncorrelated with x₀ (|r| < 4/√n =
  0.04), and x₀ must come back bit for bit."""
  sde = SDES[sde_name]
  n = 10000
  data = INDEP.sample(jax.random.PRNGKey(30), n)
  mask = jnp.asarray([[1.0, 0.0]])
  x, nfe = jax.jit(lambda k: controllable.inpaint(k, sde, INDEP.perturbed_score_fn(sde), data, mask,
                                                  predictor=predictor, corrector=corrector))(
                                                      jax.random.PRNGKey(31))
  x = np.asarray(x)
  np.testing.assert_array_equal(x[:, 0], np.asarray(data)[:, 0])
  _check_mixture1d(x[:, 1], sde, label=(sde_name, predictor, corrector))
  true_var = 0.25 + 4.0 - (0.3 * -2 + 0.7 * 2) ** 2
  assert abs(x[:, 1].std() / math.sqrt(true_var) - 1) < 0.05
  assert abs(np.corrcoef(x[:, 0], x[:, 1])[0, 1]) < 0.04
  assert int(nfe) == sde.N * ((predictor != "none") + (corrector != "none"))


def test_inpainting_keeps_known_pixels_bit_exact():
  """Image-shaped data [B, 4, 4, 1], a random mask (and a broadcast [1, 4, 4, 1] one), a Gaussian
  score: where mask == 1 the output is `data` bit for bit, elsewhere finite and filled in."""
  sde = sde_lib.VESDE(N=20)
  key = _fresh_key()
  k1, k2, k3 = jax.random.split(key, 3)
  data = jax.random.uniform(k1, (8, 4, 4, 1)) * 2 - 1
  score_fn = lambda x, t: -x / (0.3 ** 2 + sde.mean_coeff_and_std(t)[1][:, None, None, None] ** 2)
  run = jax.jit(lambda mask, denoise: controllable.inpaint(k3, sde, score_fn, data, mask, denoise=denoise)[0],
                static_argnums=1)
  cases = [(jax.random.bernoulli(k2, 0.5, data.shape).astype(jnp.float32), True),
           (jnp.ones_like(data), True),                   # everything known: the data itself
           (jax.random.bernoulli(k2, 0.3, (1, 4, 4, 1)).astype(jnp.float32), False)]
  for mask, denoise in cases:
    x = run(mask, denoise)
    x, full = np.asarray(x), np.broadcast_to(np.asarray(mask), data.shape) == 1
    np.testing.assert_array_equal(x[full], np.asarray(data)[full])
    assert np.all(np.isfinite(x))
    assert full.all() or not np.allclose(x[~full], np.asarray(data)[~full])


def test_inpainting_is_one_scan_jit_vmap_and_counts_its_nfe():
  """One lax.scan of N steps; vmap over keys equals separate calls; the reported NFE equals the score
  evaluations counted by a host callback (N × (1 + n_steps))."""
  sde = sde_lib.VPSDE(N=13)
  base = INDEP.perturbed_score_fn(sde)
  data = INDEP.sample(jax.random.PRNGKey(40), 16)
  mask = jnp.asarray([[1.0, 0.0]])
  run = lambda k, f=base: controllable.inpaint(k, sde, f, data, mask, n_steps=2)
  jaxpr = jax.make_jaxpr(lambda k: run(k)[0])(jax.random.PRNGKey(0))
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  assert len(scans) == 1 and scans[0].params["length"] == 13
  keys = jax.random.split(_fresh_key(), 3)
  batched = jax.jit(jax.vmap(lambda k: run(k)[0]))(keys)
  single = jax.jit(lambda k: run(k)[0])
  for i in range(3):
    np.testing.assert_allclose(batched[i], single(keys[i]), rtol=1e-5, atol=1e-5)
  count = [0]

  def counting(x, t):
    jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
    return base(x, t)

  x, nfe = run(keys[0], counting)
  jax.block_until_ready(x)
  jax.effects_barrier()
  assert int(nfe) == count[0] == 13 * 3


# ---------------------------------------------------------------------------------------------------
# Colourisation
# ---------------------------------------------------------------------------------------------------
def test_colour_matrix_is_the_official_orthogonal_one():
  """M is orthogonal, its first column the grey direction (1, 1, 1)/√3, and it equals the official
  float32 matrix to its printed precision; decouple(x)[..., 0] / √3 is the channel mean."""
  M = controllable.COLOR_MATRIX
  np.testing.assert_allclose(M.T @ M, np.eye(3), atol=1e-15)
  np.testing.assert_allclose(M[:, 0], np.full(3, 1 / math.sqrt(3)), atol=1e-15)
  official = np.array([[5.7735014e-01, -8.1649649e-01, 4.7008697e-08],
                       [5.7735026e-01, 4.0824834e-01, 7.0710671e-01],
                       [5.7735026e-01, 4.0824822e-01, -7.0710683e-01]])
  np.testing.assert_allclose(M, official, atol=3e-7)
  x = jax.random.normal(_fresh_key(), (5, 3, 3))
  np.testing.assert_allclose(controllable.decouple(x)[..., :1] / math.sqrt(3), controllable.grey(x), atol=1e-6)
  np.testing.assert_allclose(controllable.couple(controllable.decouple(x)), x, atol=1e-6)


# A two-pixel "image" [B, 1, 2, 3]: each pixel's RGB ~ N(μ_p, v_p I), independent.  Isotropic per pixel,
# so in the decoupled space y = x M (M orthogonal) the grey coordinate y₀ and the colour coordinates
# y₁, y₂ are independent under every p_t, and colour given grey g is known exactly:
#     x | grey(x) = g  ~  N(μ_p + (g − mean(μ_p)) 1, v_p (I − 11ᵀ/3)),
# per-channel std √(2 v_p / 3) and channel correlation −1/2.
COLOR_MU = np.array([[[0.6, -0.7, 0.9], [-0.5, 1.2, -0.1]]])
COLOR_VAR = np.array([[[0.04], [0.09]]])
GREY = np.array([[[0.55], [-0.35]]])


def _color_score_fn(sde):
  mu = jnp.asarray(COLOR_MU, jnp.float32)
  v = jnp.asarray(COLOR_VAR, jnp.float32)

  def score_fn(x, t):
    m, s = sde.mean_coeff_and_std(t)
    m, s = m[:, None, None, None], s[:, None, None, None]
    return (m * mu - x) / (m ** 2 * v + s ** 2)

  return score_fn


@pytest.mark.parametrize("sde_name", _sde_params(("vp",)))
def test_colorize_gives_the_conditional_colour_distribution(sde_name):
  """n = 4,000 copies of one grey image: per channel, the colour's mean within 5% of the conditional
  mean (every |mean| ≥ 0.35; SE ≤ 0.245/√4000 = 0.004, so 5% ≥ 4.4 SE), its std within 5% of
  √(2v/3) (SE 1.1%), channel correlations within 0.05 of −1/2 (SE (1 − ρ²)/√n = 0.012), and the grey
  channel (channel mean) equal to the input's to float32 round-off."""
  sde = SDES[sde_name]
  n = 4000
  gray = jnp.asarray(np.broadcast_to(GREY, (n, 1, 2, 3)), jnp.float32)
  x, nfe = jax.jit(lambda k: controllable.colorize(k, sde, _color_score_fn(sde), gray))(jax.random.PRNGKey(50))
  x = np.asarray(x, np.float64)
  assert np.abs(x.mean(-1, keepdims=True) - GREY).max() < 1e-6
  m_eps, s_eps = (float(v) for v in sde.mean_coeff_and_std(jnp.asarray(EPS)))
  cond_mean = COLOR_MU + (GREY - COLOR_MU.mean(-1, keepdims=True))
  # The colour coordinates at eps: N(m μ, m² v + σ²) projected orthogonally to grey.
  cond_std = np.sqrt(2 * (m_eps ** 2 * COLOR_VAR + s_eps ** 2) / 3) * np.ones(3)
  assert np.all(np.abs(cond_mean) >= 0.35)
  np.testing.assert_array_less(np.abs(x.mean(0) / cond_mean - 1), 0.05)
  np.testing.assert_array_less(np.abs(x.std(0) / cond_std[0] - 1), 0.05)
  for p in range(2):
    corr = np.corrcoef(x[:, 0, p, :].T)
    np.testing.assert_allclose(corr[np.triu_indices(3, 1)], -0.5, atol=0.05)
  assert int(nfe) == 2 * sde.N


def test_colorize_preserves_grey_exactly_for_any_input():
  """Random images and a one-channel grey input: grey(output) == grey(input) to float32 round-off
  (|Δ| < 1e-6 for values in [0, 1]), the colour channels finite."""
  sde = sde_lib.VPSDE(N=50)       # (N ≥ 20: the DDPM chain's β_i = β_max/N must stay below 1)
  key = _fresh_key()
  k1, k2 = jax.random.split(key)
  img = jax.random.uniform(k1, (6, 5, 5, 3))
  score_fn = lambda x, t: -x
  run = jax.jit(lambda g: controllable.colorize(k2, sde, score_fn, g, corrector="none"))
  for gray in (img, controllable.grey(img)):
    x, nfe = run(gray)
    assert x.shape == (6, 5, 5, 3) and int(nfe) == 50
    assert float(jnp.max(jnp.abs(controllable.grey(x) - controllable.grey(img)))) < 1e-6
    assert np.all(np.isfinite(np.asarray(x)))


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------
def test_bad_arguments_are_refused_with_clear_errors():
  sde = SDES["vp"]
  s = MIX.perturbed_score_fn(sde)
  clf = toy_labels.noise_conditional_log_prob_fn(MIX, sde)
  with pytest.raises(ValueError, match="labels y"):
    controllable.classifier_guided_score_fn(s, clf, jnp.zeros((4, 1), jnp.int32))
  with pytest.raises(ValueError, match="labels y"):
    controllable.classifier_guided_score_fn(s, clf, jnp.zeros((4,)))
  with pytest.raises(ValueError, match="guidance_weight"):
    controllable.classifier_free_score_fn(toy_labels.conditional_score_fn(MIX, sde), jnp.zeros(4, jnp.int32), -1.0, 2)
  data = jnp.zeros((4, 2))
  with pytest.raises(ValueError, match="mask must hold 0"):
    controllable.inpaint(jax.random.PRNGKey(0), sde, INDEP.perturbed_score_fn(sde), data, jnp.full((4, 2), 0.5))
  with pytest.raises(ValueError, match="broadcast"):
    controllable.inpaint(jax.random.PRNGKey(0), sde, INDEP.perturbed_score_fn(sde), data, jnp.ones((3, 2)))
  with pytest.raises(ValueError, match="Unknown predictor"):
    controllable.inpaint(jax.random.PRNGKey(0), sde, INDEP.perturbed_score_fn(sde), data, jnp.ones((4, 2)),
                         predictor="heun")
  with pytest.raises(ValueError, match="gray must be shaped"):
    controllable.colorize(jax.random.PRNGKey(0), sde, lambda x, t: -x, jnp.zeros((4, 2, 2, 2)))


# ---------------------------------------------------------------------------------------------------
# SGLD on Bayesian linear regression
# ---------------------------------------------------------------------------------------------------
# y = X θ + N(0, 1), θ ~ N(0, I), N = 100 points in D = 2: posterior precision A = I + XᵀX with
# eigenvalues λ ≈ 81 and 106 (fixed data, numpy seed 0).
_rng = np.random.default_rng(0)
REG_X = _rng.normal(size=(100, 2))
REG_Y = REG_X @ np.array([1.0, -0.5]) + _rng.normal(size=100)
REG_DATA = (jnp.asarray(REG_X, jnp.float32), jnp.asarray(REG_Y, jnp.float32))
REG_MEAN, REG_COV = sgld.linear_regression_posterior(REG_X, REG_Y, 1.0, 1.0)
LAMBDA_MIN = float(np.linalg.eigvalsh(np.linalg.inv(REG_COV)).min())


def _log_prior(theta):
  return -0.5 * jnp.sum(theta ** 2)


def _log_lik(theta, batch):
  x, y = batch
  return -0.5 * (y - x @ theta) ** 2


def _whitened_moments(chain, mean, cov):
  """Mean [D] and covariance [D, D] of L⁻¹(θ − mean), L = chol(cov): 0 and I if the chain has them."""
  z = np.linalg.solve(np.linalg.cholesky(cov), (np.asarray(chain, np.float64).reshape(-1, 2) - mean).T).T
  return z.mean(0), np.cov(z.T)


def _tolerances(step_sizes_sum, num_chains):
  """4 standard errors of the whitened mean and covariance entries from the effective sample size.

  Along an eigen-direction of A with eigenvalue λ an SGLD step contracts by ρ = 1 − ε λ/2, an AR(1)
  chain whose integrated autocorrelation time is (1 + ρ)/(1 − ρ) ≈ 4/(ε λ) for the mean and
  (1 + ρ²)/(1 − ρ²) ≈ 2/(ε λ) for second moments; each step therefore adds ε λ/4 (ε λ/2) effective
  samples, and the slowest direction (λ_min) bounds every linear combination: ESS_mean = C Σ_t ε_t λ_min/4,
  ESS_cov = C Σ_t ε_t λ_min/2.  SE of a whitened mean 1/√ESS_mean; of a whitened covariance entry at most
  √(2/ESS_cov) (a variance; off-diagonal entries have SE ≈ 1/√ESS_cov)."""
  ess_mean = num_chains * step_sizes_sum * LAMBDA_MIN / 4
  ess_cov = num_chains * step_sizes_sum * LAMBDA_MIN / 2
  return 4 / math.sqrt(ess_mean), 4 * math.sqrt(2 / ess_cov)


def test_constant_step_sgld_has_the_exact_stationary_law_and_its_bias():
  """Constant step ε = 1e-3 (γ = 0), minibatch n = 10 of N = 100, 16 chains × 40,000 kept steps
  after 2,000 of burn-in.  The stationary mean is the posterior mean exactly (the minibatch matrix A_B
  is independent of θ); the stationary covariance is `linear_regression_sgld_stationary_cov`, inflated
  over the posterior by 25–45% (Euler: ε λ/4 ≈ 2.5%; minibatch noise: ε N² Var(x r)/(4 n λ), the rest).
  Both are matched within 4 SE (whitened: 0.035 each); the posterior covariance is rejected."""
  eps, n, chains, steps, burn = 1e-3, 10, 16, 40000, 2000
  run = jax.jit(jax.vmap(lambda k: sgld.sgld(k, _log_prior, _log_lik, jnp.zeros(2), REG_DATA,
                                             num_steps=steps + burn, batch_size=n, a=eps, gamma=0.0,
                                             burn_in=burn)))
  chain, step_sizes = run(jax.random.split(jax.random.PRNGKey(60), chains))
  assert chain.shape == (chains, steps, 2)
  np.testing.assert_allclose(step_sizes, eps, rtol=1e-6)
  stationary = sgld.linear_regression_sgld_stationary_cov(REG_X, REG_Y, 1.0, 1.0, eps, n)
  inflation = np.linalg.eigvalsh(np.linalg.solve(REG_COV, stationary))
  assert 0.2 < inflation.min() - 1 and inflation.max() - 1 < 0.5, inflation
  tol_mean, tol_cov = _tolerances(eps * steps, chains)
  assert tol_mean < 0.04 and tol_cov < 0.04
  z_mean, z_cov = _whitened_moments(chain, REG_MEAN, stationary)
  np.testing.assert_array_less(np.abs(z_mean), tol_mean)
  np.testing.assert_array_less(np.abs(z_cov - np.eye(2)), tol_cov)
  _, z_cov_post = _whitened_moments(chain, REG_MEAN, REG_COV)
  assert np.abs(z_cov_post - np.eye(2)).max() > 5 * tol_cov     # the step-size bias, plainly visible


def test_stationary_covariance_tends_to_the_posterior():
  """The exact constant-step covariance → A⁻¹ as ε → 0, the inflation linear in ε for small ε."""
  small = [sgld.linear_regression_sgld_stationary_cov(REG_X, REG_Y, 1.0, 1.0, e, 10) for e in (1e-6, 2e-6)]
  np.testing.assert_allclose(small[0], REG_COV, rtol=5e-4, atol=1e-9)
  np.testing.assert_allclose(small[1] - REG_COV, 2 * (small[0] - REG_COV), rtol=1e-2, atol=1e-10)


def test_decaying_step_sgld_samples_the_posterior():
  """Welling & Teh's schedule ε_t = a (b + t)^(−0.55) with b = 1000, a such that ε = 2e-4 after the
  6,000 burn-in steps, falling to 6.1e-5 at 60,000; minibatch n = 25; 16 chains thinned by 10.

  Bias: by `linear_regression_sgld_stationary_cov`, a constant ε = 2e-4 inflates the posterior
  covariance by at most 3.9% (whitened eigenvalue), ε = 6.1e-5 by 1.2%; the chain's covariance, an
  average over the decaying steps, lies between the posterior and the ε = 2e-4 law.  The mean is
  unbiased.  Required: the whitened mean within 4 SE and the whitened covariance within 4 SE + 3.9%
  of the posterior's (SE from ESS = C Σ ε_t λ_min/4 (/2), see `_tolerances`); the step-size-weighted
  average (Welling & Teh) within the same tolerance as the mean."""
  n, chains, steps, burn, thin, b, gamma = 25, 16, 60000, 6000, 10, 1000.0, 0.55
  a = 2e-4 * (b + burn) ** gamma
  run = jax.jit(jax.vmap(lambda k: sgld.sgld(k, _log_prior, _log_lik, jnp.zeros(2), REG_DATA, num_steps=steps,
                                             batch_size=n, a=a, b=b, gamma=gamma, burn_in=burn, thin=thin)))
  chain, step_sizes = run(jax.random.split(jax.random.PRNGKey(61), chains))
  assert chain.shape == (chains, (steps - burn) // thin, 2)
  t_kept = burn + thin * np.arange(1, (steps - burn) // thin + 1) - 1
  np.testing.assert_allclose(step_sizes[0], a * (b + t_kept) ** -gamma, rtol=1e-5)
  bias = np.linalg.eigvalsh(np.linalg.solve(
    REG_COV, sgld.linear_regression_sgld_stationary_cov(REG_X, REG_Y, 1.0, 1.0, 2e-4, n))).max() - 1
  assert bias < 0.04, bias
  eps_sum = float(np.sum(a * (b + np.arange(burn, steps)) ** -gamma))
  tol_mean, tol_cov = _tolerances(eps_sum, chains)
  z_mean, z_cov = _whitened_moments(chain, REG_MEAN, REG_COV)
  np.testing.assert_array_less(np.abs(z_mean), tol_mean)
  np.testing.assert_array_less(np.abs(z_cov - np.eye(2)), tol_cov + bias)
  weighted = np.mean([np.asarray(sgld.weighted_average(chain[c], step_sizes[c])) for c in range(chains)], axis=0)
  z_w = np.linalg.solve(np.linalg.cholesky(REG_COV), weighted - REG_MEAN)
  np.testing.assert_array_less(np.abs(z_w), tol_mean)


def test_sgld_on_a_pytree_is_pure_and_thins():
  """Parameters as a dict (slope [1], intercept []), a whole run under jit: the same key gives the same
  chain, another key another; thinning keeps (steps − burn_in) // thin samples; bad arguments refused."""
  x = jnp.linspace(-1, 1, 40)
  data = {"x": x, "y": 2 * x + 0.5}
  log_prior = lambda p: -0.5 * (jnp.sum(p["w"] ** 2) + p["b"] ** 2)
  log_lik = lambda p, d: -0.5 * (d["y"] - d["x"] * p["w"][0] - p["b"]) ** 2 / 0.1 ** 2
  init = {"w": jnp.zeros(1), "b": jnp.zeros(())}
  run = lambda k: sgld.sgld(k, log_prior, log_lik, init, data, num_steps=1000, batch_size=8, a=1e-3,
                            gamma=0.55, burn_in=100, thin=7)
  key = _fresh_key()
  c1, e1 = jax.jit(run)(key)
  c2, _ = run(key)
  c3, _ = run(jax.random.split(key)[0])
  assert c1["w"].shape == (900 // 7, 1) and c1["b"].shape == (900 // 7,) and e1.shape == (900 // 7,)
  np.testing.assert_allclose(c1["w"], c2["w"], rtol=1e-6, atol=1e-6)
  assert not np.allclose(c1["w"], c3["w"])
  assert np.all(np.diff(np.asarray(e1)) < 0)
  # it finds the line (the posterior std is ~0.03 here)
  assert abs(float(c1["w"][-50:].mean()) - 2.0) < 0.2 and abs(float(c1["b"][-50:].mean()) - 0.5) < 0.2
  for kwargs, match in [(dict(gamma=1.5), "gamma"), (dict(batch_size=41), "batch_size"),
                        (dict(burn_in=1000), "burn_in"), (dict(a=-1.0), "a must")]:
    args = dict(num_steps=1000, batch_size=8, a=1e-3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
      sgld.sgld(key, log_prior, log_lik, init, data, **args)

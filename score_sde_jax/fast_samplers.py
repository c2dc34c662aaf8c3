"""Few-step samplers of the probability-flow ODE and its stochastic relatives: DDIM (Song et al., 2021a)
and EDM's Euler/Heun with optional churn (Karras et al., 2022).  DPM-Solver and DPM-Solver++ (Lu et al.,
2022a, b) live in `dpm_solver.py` and share the parametrisation defined here.

One parametrisation for VE, VP and sub-VP
-----------------------------------------
Every SDE of `sde.py` has the Gaussian kernel  x_t = m(t) x₀ + s(t) z  and is the *affine* SDE

    dx = (ṁ/m) x dt + g dw,   g² = d(s²)/dt − 2 (ṁ/m) s² = 2 m² σ̃ σ̃',   σ̃(t) := s(t)/m(t)

(for sub-VP, g² = β(1 − e^{−2B}) is indeed 2 m² σ̃ σ̃' with m = e^{−B/2}, s = 1 − e^{−B}).  Its
probability-flow ODE  dx/dt = (ṁ/m) x − ½ g² ∇log p_t  becomes, in the scaled state y = x/m and with the
noise level σ̃ as the time variable, the ODE every method here integrates:

    dy/dσ̃ = ε̂(x, t),   ε̂ := −s(t) ∇ₓ log p_t(x),   x = m y,  t = t(σ̃),                      (1)

which is EDM's dx/dσ = (x − D(x; σ))/σ (their σ(t) = t, s(t) = 1) with the denoiser (Tweedie)

    D = x̂₀ := (x + s² ∇log p_t(x)) / m = y − σ̃ ε̂.                                            (2)

In terms of the half log-SNR λ := log(m/s) = −log σ̃ (DPM-Solver's time), (1) reads
dy/dλ = −e^{−λ} ε̂, whose linear part DPM-Solver integrates exactly.  Per SDE (B(t) = ∫₀ᵗ β):

    VE:      m = 1,         s = σ(t),            σ̃ = σ(t),             t(σ̃) = log(σ̃/σ_min)/log(σ_max/σ_min)
    VP:      m = e^{−B/2},  s = √(1 − e^{−B}),   σ̃ = √(e^{B} − 1),     B(σ̃) = log(1 + σ̃²)
    sub-VP:  m = e^{−B/2},  s = 1 − e^{−B},      σ̃ = 2 sinh(B/2),      B(σ̃) = 2 asinh(σ̃/2)

and t(B) is the positive root of ½(β_max − β_min) t² + β_min t − B = 0 (`_integrated_beta_inverse`), so
every conversion t ↔ σ̃ ↔ λ is exact (closed form).  What sub-VP changes against VP: s = 1 − ᾱ instead of
√(1 − ᾱ) (ᾱ = e^{−B} = m²), so σ̃ = (1 − ᾱ)/√ᾱ instead of √((1 − ᾱ)/ᾱ): the same σ̃ at large t
(both ≈ e^{B/2}), but σ̃ ≈ B instead of √B at small t (σ̃(10⁻³) ≈ 10⁻⁴ instead of 10⁻²), so its grids span
a wider range of noise levels (λ up to ≈ 9.2 instead of 4.6), and only the inversion B(σ̃) differs.
The score network is always queried at (x, t) = (m(t) y, t(σ̃)), in the SDE's own time.

Common API.  `sampler(key, sde, score_fn, shape, *, num_steps, eps=1e-3, denoise=False, ...)
-> (x, nfe)`: x(T) = sde.prior_sampling(key, shape) with the key as given (as `sampling.ode_sample`, so
runs from the same key start from the same x(T)); the noise of stochastic samplers comes from
fold_in(key, 1).  The samplers integrate from T to eps; denoise=True adds the noise-free step
x ← x̂₀(x, eps) of (2) (Tweedie's formula: the Euler step of (1) to σ̃ = 0, i.e. EDM's final step and
DPM-Solver's `denoise_to_zero`), counted in nfe.  nfe is the exact number of score evaluations on the
batch (a Python int).  Each run is one `lax.scan` over its steps plus at most two statically unrolled
ones (EDM's last, Euler, step; DPM-Solver's lower-order tail; DPM-Solver++'s first, 1st-order, step), so
`jax.jit(lambda k: sampler(k, ...))` compiles it to one loop.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from score_sde_jax import checks
from score_sde_jax import sde as sde_lib

Array = jax.Array


# ---------------------------------------------------------------------------------------------------
# The parametrisation: t ↔ σ̃ = s/m ↔ λ = −log σ̃
# ---------------------------------------------------------------------------------------------------
def _check_supported(sde) -> None:
  sde_lib.check_sde(sde)
  if not isinstance(sde, (sde_lib.VESDE, sde_lib.VPSDE, sde_lib.SubVPSDE)):
    raise ValueError(f"the fast samplers need the closed-form noise level of a VESDE, VPSDE or SubVPSDE; "
                     f"got {type(sde).__name__}.")


def edm_sigma(sde, t) -> Array:
  """σ̃(t) = s(t)/m(t), the noise level of the scaled state x/m (closed forms in the module docstring)."""
  t = jnp.asarray(t)
  if isinstance(sde, sde_lib.VESDE):
    return sde.mean_coeff_and_std(t)[1]
  b = sde.integrated_beta(t)
  if isinstance(sde, sde_lib.VPSDE):
    return jnp.sqrt(jnp.expm1(b))
  return 2.0 * jnp.sinh(0.5 * b)


def time_of_edm_sigma(sde, sigma) -> Array:
  """The inverse of `edm_sigma`, exact: t with σ̃(t) = sigma."""
  sigma = jnp.asarray(sigma)
  if isinstance(sde, sde_lib.VESDE):
    return jnp.log(sigma / sde.sigma_min) / math.log(sde.sigma_max / sde.sigma_min)
  if isinstance(sde, sde_lib.VPSDE):
    b = jnp.log1p(sigma ** 2)
  else:
    b = 2.0 * jnp.arcsinh(0.5 * sigma)
  return sde._integrated_beta_inverse(b)  # pylint: disable=protected-access


def log_snr(sde, t) -> Array:
  """λ(t) = log(m/s) = −log σ̃(t) (VP: −½ log(e^{B} − 1), computed without cancellation)."""
  t = jnp.asarray(t)
  if isinstance(sde, sde_lib.VPSDE):
    return -0.5 * jnp.log(jnp.expm1(sde.integrated_beta(t)))
  return -jnp.log(edm_sigma(sde, t))


def time_of_log_snr(sde, lam) -> Array:
  """The inverse of `log_snr`, exact: t(λ) = t(σ̃ = e^{−λ})."""
  return time_of_edm_sigma(sde, jnp.exp(-jnp.asarray(lam)))


def _grid_times(sde, values, inverse, eps, dtype) -> Array:
  """t at each grid value (σ̃ or λ) by the exact inverse, the ends set to exactly T and eps."""
  t = inverse(sde, values).astype(dtype)
  return t.at[0].set(sde.T).at[-1].set(eps)


def _vec(t, x):
  return jnp.full((x.shape[0],), t, x.dtype)


def noise_prediction(score_fn, x, t, s):
  """ε̂ = −s(t) ∇log p_t(x) at scalar t (one score evaluation)."""
  return -s * score_fn(x, _vec(t, x))


def data_prediction(score_fn, x, t, m, s):
  """x̂₀ = (x + s² ∇log p_t(x)) / m at scalar t, Tweedie's formula (one score evaluation)."""
  return (x + s ** 2 * score_fn(x, _vec(t, x))) / m


def tweedie_denoise(sde, score_fn, x, eps):
  """The final noise-free step x ← x̂₀(x, eps) of (2) (one score evaluation)."""
  m, s = sde.mean_coeff_and_std(jnp.asarray(eps, x.dtype))
  return data_prediction(score_fn, x, eps, m, s)


def check_common(sde, score_fn, shape, num_steps, eps) -> tuple:
  """The checks every fast sampler makes; returns the normalised shape."""
  _check_supported(sde)
  shape = checks.check_shape("shape", shape)
  checks.check_positive_int("num_steps", num_steps)
  checks.check_eps(eps, sde.T)
  checks.check_score_fn(score_fn, shape)
  return shape


def _check_in_range(param, value, lo, hi, lo_open=False, hi_open=False):
  try:
    v = float(value)
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi) and not math.isnan(v)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"{param} must lie in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}; "
                     f"got {value!r}.")
  return v


def noise_keys(key, num_steps):
  """Per-step keys of a stochastic sampler, independent of the prior draw `prior_sampling(key)`."""
  return jax.random.split(jax.random.fold_in(key, 1), num_steps)


def validate(sampler, sde, shape, **options) -> None:
  """Runs every argument check of `sampler(key, sde, score_fn, shape, **options)` now, by abstract
  evaluation with a zero score (traces the sampler, computes nothing): a bad setting fails when a sampler
  is built (`sampling.get_sampler`), not when it first runs."""
  jax.eval_shape(lambda k: sampler(k, sde, lambda x, t: jnp.zeros_like(x), shape, **options)[0],
                 jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------------------
def ddim_sample(key, sde, score_fn, shape, *, num_steps, eps=1e-3, denoise=False, eta=0.0):
  """DDIM (Song, Meng & Ermon, 2021) on t_i = linspace(T, eps, num_steps + 1); returns (x, nfe).

  A step t → t' (m, s at t; m', s' at t'; σ̃ = s/m) predicts x̂₀ = (x + s² ∇log p)/m and ε̂ = −s ∇log p
  and moves to the marginal x_{t'} = m' x₀ + s' z with those predictions:

      x' = m' x̂₀ + √(s'² − c²) ε̂ + c z,    c = η s' √(1 − (σ̃'/σ̃)²),   z ~ N(0, I).

  c² is the variance of the forward process's posterior q(x_{t'} | x_t, x₀) for the Markov step
  x_t = (m/m') x_{t'} + √(s² − (m s'/m')²) w, namely s'² (1 − (m s'/(m' s))²) = s'² (1 − (σ̃'/σ̃)²),
  times η².  For VP (m = √ᾱ, s = √(1 − ᾱ)) this is DDIM's σ_t(η) = η √((1 − ᾱ')/(1 − ᾱ)) √(1 − ᾱ/ᾱ')
  exactly; for VE (m = 1) and sub-VP (s = 1 − ᾱ) it is the same construction on their own marginals.
  η = 0: deterministic, x' = m' x̂₀ + s' ε̂, i.e. y' = y + (σ̃' − σ̃) ε̂ — Euler's method on (1), a
  first-order solver of the probability-flow ODE.  η = 1: ancestral sampling (the DDPM posterior, a
  discretisation of the reverse SDE).  0 ≤ η ≤ 1 (beyond 1, c can exceed s').
  nfe = num_steps (+1 with denoise).
  """
  shape = check_common(sde, score_fn, shape, num_steps, eps)
  eta = _check_in_range("eta", eta, 0.0, 1.0)
  x = sde.prior_sampling(key, shape)
  dtype = x.dtype
  ts = jnp.linspace(sde.T, eps, num_steps + 1).astype(dtype)
  ts = ts.at[0].set(sde.T).at[-1].set(eps)
  m, s = sde.mean_coeff_and_std(ts)

  def step(x, inp):
    t, m_t, s_t, m_n, s_n, k = inp
    e = noise_prediction(score_fn, x, t, s_t)
    x0 = (x - s_t * e) / m_t
    if eta == 0.0:
      return m_n * x0 + s_n * e, None
    ratio = (s_n * m_t) / (m_n * s_t)                                   # σ̃'/σ̃ < 1
    c = eta * s_n * jnp.sqrt(jnp.maximum(1.0 - ratio ** 2, 0.0))
    z = jax.random.normal(k, x.shape, x.dtype)
    return m_n * x0 + jnp.sqrt(jnp.maximum(s_n ** 2 - c ** 2, 0.0)) * e + c * z, None

  x, _ = jax.lax.scan(step, x, (ts[:-1], m[:-1], s[:-1], m[1:], s[1:], noise_keys(key, num_steps)))
  nfe = num_steps
  if denoise:
    x, nfe = tweedie_denoise(sde, score_fn, x, eps), nfe + 1
  return x, nfe


# ---------------------------------------------------------------------------------------------------
# EDM (Karras et al., 2022)
# ---------------------------------------------------------------------------------------------------
EDM_SOLVERS = ("euler", "heun")


def karras_sigmas(sigma_max: float, sigma_min: float, num_steps: int, rho: float = 7.0, dtype=jnp.float32):
  """σ_i = (σ_max^{1/ρ} + i/K (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0..K (K = num_steps), ends exact."""
  i = jnp.arange(num_steps + 1, dtype=dtype) / num_steps
  inv = 1.0 / rho
  sig = (sigma_max ** inv + i * (sigma_min ** inv - sigma_max ** inv)) ** rho
  return sig.astype(dtype).at[0].set(sigma_max).at[-1].set(sigma_min)


def edm_sample(key, sde, score_fn, shape, *, num_steps, eps=1e-3, denoise=False, solver="heun", rho=7.0,
               s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
  """EDM's sampler (Karras et al., 2022, Alg. 1 and, with s_churn > 0, Alg. 2) on the ODE (1) of the
  module docstring, in the scaled state y = x/m and noise level σ̃ = s/m; returns (x, nfe).

  Grid: Karras' schedule σ̃_i = (σ_max^{1/ρ} + i/K (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0..K = num_steps,
  with σ_max = σ̃(T) and σ_min = σ̃(eps): the interval [eps, T] that every sampler here integrates, so
  that the run starts from the prior sample x(T) (a smaller σ_max would need another start distribution;
  a larger σ_min is a larger eps).  Step i (d(y, σ̃) = ε̂(m y, t(σ̃)) = (y − D)/σ̃, EDM's d_i):

      γ_i = min(S_churn/K, √2 − 1) if S_tmin ≤ σ̃_i ≤ S_tmax else 0,   σ̂ = min(σ̃_i (1 + γ_i), σ̃(T)),
      ŷ = y + √(σ̂² − σ̃_i²) S_noise z,                               (churn: Alg. 2; none when S_churn = 0)
      y' = ŷ + (σ̃_{i+1} − σ̂) d(ŷ, σ̂),                                  ('euler')
      y' = ŷ + (σ̃_{i+1} − σ̂) ½ [d(ŷ, σ̂) + d(y', σ̃_{i+1})]              ('heun': the 2nd-order correction).

  σ̂ is capped at σ̃(T) (a noise level beyond T is outside the score model's training range; the cap
  only touches the first step, where σ̃_0 = σ̃(T) already).

  The last step is an Euler step, as in Alg. 1/2.  There it is forced (the last level is σ = 0, where d
  is undefined); here the last level σ̃(eps) is positive but small (VP ≈ 0.01, sub-VP ≈ 1e-4), and d
  there is stiff: off the data manifold d ≈ (y − D)/σ̃_K is huge, so a Heun correction evaluated at σ̃_K
  after a large step overshoots (on the ring8 toy, VP, K = 3: error 4.8 with the correction, 0.35
  without), while for larger K the Karras grid makes the last step so short (ρ = 7) that its Euler
  error is negligible: at equal NFE the Euler last step is as accurate or better, and the global order
  stays 2 (one step of local error O(h²)).  So a run is Alg. 1 (Alg. 2 with churn) with N = K levels
  whose last level σ = 0 is replaced by σ̃(eps), 2K − 1 evaluations for 'heun' as there (2N − 1); and
  `denoise` adds the Euler step σ̃(eps) → 0, which is y − σ̃ d = D (Tweedie).
  nfe = K ('euler') or 2K − 1 ('heun'), +1 with denoise.  One scan over the first K − 1 steps, then the
  last (Euler) step.
  """
  shape = check_common(sde, score_fn, shape, num_steps, eps)
  solver = checks.check_choice("solver", solver, EDM_SOLVERS)
  checks.check_positive("rho", rho)
  s_churn = _check_in_range("s_churn", s_churn, 0.0, math.inf, hi_open=True)
  s_tmin = _check_in_range("s_tmin", s_tmin, 0.0, math.inf, hi_open=True)
  s_tmax = _check_in_range("s_tmax", s_tmax, s_tmin, math.inf)
  s_noise = _check_in_range("s_noise", s_noise, 0.0, math.inf, hi_open=True)
  x = sde.prior_sampling(key, shape)
  dtype = x.dtype
  with jax.ensure_compile_time_eval():
    sigma_max = float(edm_sigma(sde, jnp.asarray(sde.T, dtype)))
    sigma_min = float(edm_sigma(sde, jnp.asarray(eps, dtype)))
  sig = karras_sigmas(sigma_max, sigma_min, num_steps, float(rho), dtype)
  ts = _grid_times(sde, sig, time_of_edm_sigma, eps, dtype)
  mean_coeff = lambda t: sde.mean_coeff_and_std(t)[0]
  churn = s_churn > 0.0

  def d(y, t):
    m, s = sde.mean_coeff_and_std(t)
    return noise_prediction(score_fn, m * y, t, s)

  def step(y, inp, heun):
    sig_cur, sig_next, t_cur, t_next, k = inp
    sig_hat, t_hat = sig_cur, t_cur
    if churn:
      in_range = (sig_cur >= s_tmin) & (sig_cur <= s_tmax)
      gamma = jnp.where(in_range, min(s_churn / num_steps, math.sqrt(2.0) - 1.0), 0.0)
      gamma = jnp.maximum(jnp.minimum(gamma, sigma_max / sig_cur - 1.0), 0.0)  # σ̂ ≤ σ̃(T); 0 if gated off
      sig_hat = sig_cur * (1.0 + gamma)
      t_hat = jnp.where(gamma > 0, time_of_edm_sigma(sde, sig_hat), t_cur)
      z = jax.random.normal(k, y.shape, y.dtype)
      # √(σ̂² − σ̃_i²) = σ̃_i √(γ (2 + γ)): no cancellation, and exactly 0 for γ = 0
      y = y + sig_cur * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise * z
    d_cur = d(y, t_hat)
    y_next = y + (sig_next - sig_hat) * d_cur
    if heun:
      y_next = y + (sig_next - sig_hat) * 0.5 * (d_cur + d(y_next, t_next))
    return y_next

  inputs = (sig[:-1], sig[1:], ts[:-1], ts[1:], noise_keys(key, num_steps))
  y = x / mean_coeff(jnp.asarray(sde.T, dtype))
  y, _ = jax.lax.scan(lambda y, inp: (step(y, inp, solver == "heun"), None), y,
                      jax.tree_util.tree_map(lambda a: a[:-1], inputs))
  y = step(y, jax.tree_util.tree_map(lambda a: a[-1], inputs), heun=False)   # the last step: Euler
  x = mean_coeff(jnp.asarray(eps, dtype)) * y
  nfe = 2 * num_steps - 1 if solver == "heun" else num_steps
  if denoise:
    x, nfe = tweedie_denoise(sde, score_fn, x, eps), nfe + 1
  return x, nfe

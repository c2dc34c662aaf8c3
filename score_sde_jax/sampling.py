"""Samplers: predictor–corrector (Song et al., 2021, Alg. 1–3), annealed Langevin dynamics (NCSN) and the
probability-flow ODE (diffrax).

A predictor advances x from t to t − T/N along the reverse-time SDE; a corrector runs MCMC (Langevin)
steps that target p_t.  Each is a pure function `(key, x, t, sde, score_fn, **options) -> (x, x_mean)`
where `x_mean` is the update without its final noise (used for the noise-free last step).  They are
looked up by name in `PREDICTORS` / `CORRECTORS`.  A whole sampling run is one `lax.scan` (or one diffrax
solve): wrap the call in `jax.jit` (close over nothing large; pass parameters as arguments) to compile it
into one XLA program.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp

from score_sde_jax import checks
from score_sde_jax import fast_sampler_config
from score_sde_jax import ode as ode_lib
from score_sde_jax import sde as sde_lib

Array = jax.Array
batch_mul = sde_lib.batch_mul


# ---------------------------------------------------------------------------------------------------
# Predictors
# ---------------------------------------------------------------------------------------------------
def euler_maruyama(key, x, t, sde, score_fn, probability_flow=False):
  """x ← x − [f − g² s] Δt + g √Δt z  (Δt = T/N), the Euler–Maruyama step of the reverse SDE."""
  dt = -sde.T / sde.N
  drift, diffusion = sde.reverse(score_fn, probability_flow).sde(x, t)
  x_mean = x + drift * dt
  z = jax.random.normal(key, x.shape, x.dtype)
  return x_mean + batch_mul(diffusion * jnp.sqrt(-dt), z), x_mean


def reverse_diffusion(key, x, t, sde, score_fn, probability_flow=False):
  """x ← x − f_i + G_i² s + G_i z: the reverse of the forward discretisation x_{i+1} = x_i + f_i + G_i z
  (Song et al., 2021, Eq. 46) — for VE and VP the SMLD and DDPM chains."""
  rev_f, rev_G = sde.reverse(score_fn, probability_flow).discretize(x, t)
  x_mean = x - rev_f
  z = jax.random.normal(key, x.shape, x.dtype)
  return x_mean + batch_mul(rev_G, z), x_mean


def _vp_discrete_alpha(sde, t):
  """α_i = 1 − β_i of the DDPM chain at the timestep of t (VP and sub-VP share the β ladder)."""
  i = (t * (sde.N - 1) / sde.T).astype(jnp.int32)
  beta_i = (sde.beta_min + i / (sde.N - 1) * (sde.beta_max - sde.beta_min)) / sde.N
  return 1.0 - beta_i


def ancestral_sampling(key, x, t, sde, score_fn, probability_flow=False):
  """Ancestral sampling of the discrete chain the SDE discretises (Ho et al., 2020; Song & Ermon, 2019).

  For a Gaussian step x_i = a x_{i−1} + b z between marginals N(α_{i−1} x₀, σ_{i−1}²) and N(α_i x₀, σ_i²),
  the posterior q(x_{i−1} | x_i, x₀) with x₀ from Tweedie's formula has mean (x + b² s) / a:
    VE (SMLD): a = 1, b² = σ_i² − σ_{i−1}², variance b² σ_{i−1}²/σ_i²  (the official choice);
    VP (DDPM): a = √(1 − β_i), b² = β_i, variance β_i               (the official choice);
    sub-VP:    a, b from the continuous marginals at t and t − T/N, posterior variance b² σ_{i−1}²/σ_i²
               (the official code has no ancestral sampler for sub-VP).
  """
  del probability_flow
  z = jax.random.normal(key, x.shape, x.dtype)
  score = score_fn(x, t)
  if isinstance(sde, sde_lib.VESDE):
    i = sde.timestep_index(t)
    sigmas = sde.discrete_sigmas
    sigma = sigmas[i]
    adjacent = jnp.where(i == 0, 0.0, sigmas[jnp.maximum(i - 1, 0)])
    b2 = sigma ** 2 - adjacent ** 2
    x_mean = x + batch_mul(b2, score)
    std = jnp.sqrt(adjacent ** 2 * b2 / sigma ** 2)
    return x_mean + batch_mul(std, z), x_mean
  if isinstance(sde, sde_lib.VPSDE):
    i = sde.timestep_index(t)
    beta = sde.discrete_betas[i]
    x_mean = batch_mul(1.0 / jnp.sqrt(1.0 - beta), x + batch_mul(beta, score))
    return x_mean + batch_mul(jnp.sqrt(beta), z), x_mean
  # Generic affine-Gaussian SDE (sub-VP).
  t_prev = jnp.maximum(t - sde.T / sde.N, 0.0)
  m, s = sde.mean_coeff_and_std(t)
  m_prev, s_prev = sde.mean_coeff_and_std(t_prev)
  a = m / m_prev
  b2 = jnp.maximum(s ** 2 - a ** 2 * s_prev ** 2, 0.0)
  x_mean = batch_mul(1.0 / a, x + batch_mul(b2, score))
  std = jnp.sqrt(b2 * s_prev ** 2 / s ** 2)
  return x_mean + batch_mul(std, z), x_mean


def none_predictor(key, x, t, sde, score_fn, probability_flow=False):
  """The identity (corrector-only sampling)."""
  return x, x


# ---------------------------------------------------------------------------------------------------
# Correctors
# ---------------------------------------------------------------------------------------------------
def _langevin_alpha(sde, t):
  if isinstance(sde, sde_lib.VESDE):
    return jnp.ones_like(t)
  return _vp_discrete_alpha(sde, t)


def langevin(key, x, t, sde, score_fn, snr=0.16, n_steps=1):
  """Langevin MCMC (Song et al., 2021, Alg. 4): x ← x + ε s + √(2ε) z with the step chosen so that the
  signal-to-noise ratio ‖ε s‖ / ‖√(2ε) z‖ equals `snr` (norms averaged over the batch, as the official
  code): ε = 2 α (snr ‖z‖ / ‖s‖)², α = 1 (VE) or α_i = 1 − β_i (VP, sub-VP)."""
  alpha = _langevin_alpha(sde, t)

  def step(i, carry):
    x, _, key = carry
    key, sub = jax.random.split(key)
    grad = score_fn(x, t)
    noise = jax.random.normal(sub, x.shape, x.dtype)
    grad_norm = jnp.mean(jnp.linalg.norm(grad.reshape(grad.shape[0], -1), axis=-1))
    noise_norm = jnp.mean(jnp.linalg.norm(noise.reshape(noise.shape[0], -1), axis=-1))
    step_size = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha
    x_mean = x + batch_mul(step_size, grad)
    return x_mean + batch_mul(jnp.sqrt(2 * step_size), noise), x_mean, key

  x, x_mean, _ = jax.lax.fori_loop(0, n_steps, step, (x, x, key))
  return x, x_mean


def annealed_langevin(key, x, t, sde, score_fn, snr=0.16, n_steps=1):
  """Annealed Langevin corrector: ε = 2 α (snr · σ(t))², the NCSN step with the marginal std."""
  alpha = _langevin_alpha(sde, t)
  std = sde.mean_coeff_and_std(t)[1]

  def step(i, carry):
    x, _, key = carry
    key, sub = jax.random.split(key)
    grad = score_fn(x, t)
    noise = jax.random.normal(sub, x.shape, x.dtype)
    step_size = (snr * std) ** 2 * 2 * alpha
    x_mean = x + batch_mul(step_size, grad)
    return x_mean + batch_mul(jnp.sqrt(2 * step_size), noise), x_mean, key

  x, x_mean, _ = jax.lax.fori_loop(0, n_steps, step, (x, x, key))
  return x, x_mean


def none_corrector(key, x, t, sde, score_fn, snr=0.16, n_steps=1):
  return x, x


class _Entry(NamedTuple):
  fn: Callable
  nfe: int  # score evaluations per call (per corrector step for correctors)


PREDICTORS: Dict[str, _Entry] = {
    "euler_maruyama": _Entry(euler_maruyama, 1),
    "reverse_diffusion": _Entry(reverse_diffusion, 1),
    "ancestral_sampling": _Entry(ancestral_sampling, 1),
    "none": _Entry(none_predictor, 0),
}
CORRECTORS: Dict[str, _Entry] = {
    "langevin": _Entry(langevin, 1),
    "annealed_langevin": _Entry(annealed_langevin, 1),
    "none": _Entry(none_corrector, 0),
}
ORDERS = ("predictor_first", "corrector_first")


def get_predictor(name: str) -> Callable:
  return PREDICTORS[checks.check_choice("predictor", name, PREDICTORS)].fn


def get_corrector(name: str) -> Callable:
  return CORRECTORS[checks.check_choice("corrector", name, CORRECTORS)].fn


# ---------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------
def pc_sample(key, sde, score_fn, shape, predictor="euler_maruyama", corrector="none", snr=0.16,
              n_corrector_steps=1, denoise=True, eps=1e-3, probability_flow=False,
              order="predictor_first"):
  """Predictor–corrector sampling over the grid t_i = linspace(T, eps, N); returns (x, nfe).

  order='predictor_first' (the paper's Algorithm 1): x ~ prior at T; at each t_i the predictor moves x
  from t_i to t_{i+1}, then the corrector targets p_{t_{i+1}} (at the last step, p_eps).
  order='corrector_first' (the official code): at each t_i the corrector first targets p_{t_i} (so its
  first steps act on the exact prior sample) and the predictor then moves to t_{i+1}.  The orders differ
  only at the ends: the official one spends its first corrector steps on the prior and ends with a
  predictor step, the paper's ends with corrector steps at eps.  With corrector='none' they coincide.

  denoise: return the last update's mean (no final noise), as the official `noise_removal`.
  nfe = N × (predictor's + n_corrector_steps × corrector's score evaluations per step).
  """
  sde_lib.check_sde(sde)
  shape = checks.check_shape("shape", shape)
  predictor = checks.check_choice("predictor", predictor, PREDICTORS)
  corrector = checks.check_choice("corrector", corrector, CORRECTORS)
  predictor_entry, corrector_entry = PREDICTORS[predictor], CORRECTORS[corrector]
  order = checks.check_choice("order", order, ORDERS)
  checks.check_eps(eps, sde.T)
  checks.check_non_negative_int("n_corrector_steps", n_corrector_steps)
  checks.check_positive("snr", snr)
  checks.check_score_fn(score_fn, shape)
  predictor_fn, corrector_fn = predictor_entry.fn, corrector_entry.fn

  timesteps = jnp.linspace(sde.T, eps, sde.N)
  k_prior, k_loop = jax.random.split(key)
  x = sde.prior_sampling(k_prior, shape)
  batch = shape[0]

  def predict(k, x, t):
    return predictor_fn(k, x, jnp.full((batch,), t), sde, score_fn, probability_flow)

  def correct(k, x, t):
    return corrector_fn(k, x, jnp.full((batch,), t), sde, score_fn, snr, n_corrector_steps)

  def body(carry, i):
    x, _, key = carry
    key, k1, k2 = jax.random.split(key, 3)
    t = timesteps[i]
    if order == "predictor_first":
      x, x_mean = predict(k1, x, t)
      if corrector != "none" and n_corrector_steps > 0:
        x, x_mean = correct(k2, x, timesteps[jnp.minimum(i + 1, sde.N - 1)])
    else:
      x, x_mean = correct(k2, x, t)
      x, x_mean = predict(k1, x, t)
    return (x, x_mean, key), None

  (x, x_mean, _), _ = jax.lax.scan(body, (x, x, k_loop), jnp.arange(sde.N))
  nfe = sde.N * (predictor_entry.nfe + n_corrector_steps * corrector_entry.nfe)
  return (x_mean if denoise else x), nfe


ALD_SMALLEST_STD = 0.01   # NCSN's σ_min (CIFAR-10), the level at which its step_lr 2e-5 was tuned


def time_of_std(sde, std: float) -> float:
  """The t ∈ (0, T) at which the marginal std of `sde` equals `std` (the std rises with t), by bisection
  (60 halvings: exact to float precision; concrete even inside the caller's jit)."""
  def std_at(t):
    with jax.ensure_compile_time_eval():
      return float(sde.mean_coeff_and_std(jnp.asarray(t, jnp.float32))[1])
  lo, hi = 0.0, float(sde.T)
  if not std_at(lo) < std < std_at(hi):
    raise ValueError(f"no t in (0, T) has marginal std {std} for {type(sde).__name__}.")
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if std_at(mid) < std else (lo, mid)
  return hi


def annealed_langevin_sample(key, sde, score_fn, shape, n_steps_each=100, step_lr=2e-5,
                             num_scales=None, eps=None, denoise=True):
  """Annealed Langevin dynamics (Song & Ermon, 2019, Alg. 1) over noise levels σ_1 > … > σ_L.

  For a VESDE the levels are the geometric ladder σ_i = σ_max (σ_min/σ_max)^{(i−1)/(L−1)} (t linear in
  [eps, T] maps to σ geometric); for VP/sub-VP the marginal stds at t = linspace(T, eps, L).  At level i,
  `n_steps_each` steps  x ← x + (α_i/2) s(x, t_i) + √α_i z  with  α_i = ε σ_i² / σ_L²  (ε = `step_lr`).
  `denoise` adds the final Tweedie step x + σ_L² s(x, t_L) (Jolicoeur-Martineau et al., 2021).

  The steps are relative to the level's variance: α_i / σ_i² = ε / σ_L² at every level, and a Langevin
  chain on a Gaussian of variance v diverges for α ≥ 4v, so ε / σ_L² < 2 is required (NCSN: 2e-5 / 0.01²
  = 0.2).  eps (VP, sub-VP; default None) is therefore the t whose marginal std is NCSN's smallest level,
  `ALD_SMALLEST_STD` = 0.01 (VP: t ≈ 9.1e-4; sub-VP: t ≈ 0.027, whose std at t = 1e-3 is only 1e-4 and
  would make ε / σ_L² = 2000, a chain that overflows to NaN).  Values that break the bound are refused.
  Returns (x, nfe)."""
  sde_lib.check_sde(sde)
  shape = checks.check_shape("shape", shape)
  num_scales = sde.N if num_scales is None else num_scales
  checks.check_positive_int("num_scales", num_scales)
  checks.check_positive_int("n_steps_each", n_steps_each)
  checks.check_positive("step_lr", step_lr)
  ve = isinstance(sde, sde_lib.VESDE)
  if eps is None:
    eps = 1e-5 if ve else time_of_std(sde, ALD_SMALLEST_STD)
  checks.check_eps(eps, sde.T)
  checks.check_score_fn(score_fn, shape)
  batch = shape[0]
  if ve:
    eps = 0.0  # σ(0) = σ_min: the ladder ends exactly at σ_min
  with jax.ensure_compile_time_eval():   # concrete even inside the caller's jit
    smallest = float(sde.mean_coeff_and_std(jnp.asarray(eps, jnp.float32))[1])
  if not step_lr / smallest ** 2 < 2.0:
    raise ValueError(
        f"annealed Langevin dynamics on {type(sde).__name__} with step_lr={step_lr:g} and eps={eps:g}: the "
        f"smallest noise level σ_L = {smallest:.3g} gives steps α_i = {step_lr / smallest ** 2:.3g} σ_i², "
        f"beyond the stability bound 2 σ_i² (the chain diverges to NaN). Use a larger eps (the default puts "
        f"σ_L at {ALD_SMALLEST_STD}) or step_lr < {2 * smallest ** 2:.3g}.")
  times = jnp.linspace(sde.T, eps, num_scales)
  stds = sde.mean_coeff_and_std(times)[1]
  k_prior, k_loop = jax.random.split(key)
  x = sde.prior_sampling(k_prior, shape)

  def level(carry, inputs):
    x, key = carry
    t, std = inputs
    alpha = step_lr * (std / stds[-1]) ** 2
    vec_t = jnp.full((batch,), t)

    def step(_, c):
      x, key = c
      key, sub = jax.random.split(key)
      z = jax.random.normal(sub, x.shape, x.dtype)
      return x + 0.5 * alpha * score_fn(x, vec_t) + jnp.sqrt(alpha) * z, key

    return jax.lax.fori_loop(0, n_steps_each, step, (x, key)), None

  (x, _), _ = jax.lax.scan(level, (x, k_loop), (times, stds))
  nfe = num_scales * n_steps_each
  if denoise:
    vec_t = jnp.full((batch,), times[-1])
    x = x + stds[-1] ** 2 * score_fn(x, vec_t)
    nfe += 1
  return x, nfe


def probability_flow_drift(sde, score_fn):
  """(t, x) ↦ f(x, t) − ½ g(t)² s(x, t), the probability-flow ODE's vector field at scalar t."""
  rsde = sde.reverse(score_fn, probability_flow=True)

  def drift(t, x):
    return rsde.sde(x, jnp.full((x.shape[0],), t, x.dtype))[0]

  return drift


def ode_sample(key, sde, score_fn, shape, solver=ode_lib.DEFAULT_SOLVER, rtol=1e-5, atol=1e-5,
               eps=1e-3, num_steps=None, denoise=False, max_steps=16384, controller="batch", step_control=None,
               sharding=None):
  """Samples by solving the probability-flow ODE from x(T) ~ prior to t = eps with diffrax
  (adaptive rk45/tsit5/dopri5/bosh3 on rtol/atol, or `num_steps` fixed steps of any solver).  `denoise` adds
  one noise-free reverse-diffusion step at t = eps (the official ODE sampler's `denoise`).
  Returns (x, nfe) with nfe the true number of score evaluations (on the whole batch).

  Sharded over the devices when the caller's `jit` asks for a batch-sharded x (as scripts/sample.py and
  the training snapshots do) or when `sharding` (of the batch axis) is given: every device integrates
  its share of the batch, in lockstep with one step-size controller over the whole batch, so the samples
  do not depend on the device count (see `ode.solve`).  controller='per_example' gives every sample its
  own steps (nfe is then the largest count); step_control (None: the solver's): see `ode.solve`."""
  sde_lib.check_sde(sde)
  shape = checks.check_shape("shape", shape)
  checks.check_eps(eps, sde.T)
  ode_lib.check_solver_args(solver, rtol, atol, num_steps)
  ode_lib.check_controller(controller)
  ode_lib.check_step_control(step_control, solver)
  checks.check_score_fn(score_fn, shape)
  x = sde.prior_sampling(key, shape)
  x, nfe = ode_lib.solve(probability_flow_drift(sde, score_fn), x, sde.T, eps, solver=solver,
                         rtol=rtol, atol=atol, num_steps=num_steps, max_steps=max_steps,
                         controller=controller, step_control=step_control, sharding=sharding)
  if denoise:
    _, x = reverse_diffusion(key, x, jnp.full((shape[0],), eps), sde, score_fn)
    nfe = nfe + 1
  return x, nfe


SAMPLING_METHODS = ("pc", "ode", "ald") + fast_sampler_config.METHODS


def get_sampler(config, sde, shape):
  """`sample_fn(key, score_fn) -> (x, nfe)` for `config.sampling` (method 'pc', 'ode', 'ald', or a fast
  sampler of `fast_sampler_config.METHODS`: DDIM, EDM, DPM-Solver, DPM-Solver++)."""
  s = config.sampling
  method = checks.check_choice("sampling.method", s.method, SAMPLING_METHODS)
  shape = checks.check_shape("shape", shape)
  if method in fast_sampler_config.METHODS:
    return fast_sampler_config.sampler_from_config(config, sde, shape)
  eps = float(s.eps)
  if method == "pc":
    get_predictor(s.predictor), get_corrector(s.corrector)  # validate names now
    return lambda key, score_fn: pc_sample(
        key, sde, score_fn, shape, predictor=s.predictor, corrector=s.corrector, snr=float(s.snr),
        n_corrector_steps=int(s.n_steps_each), denoise=bool(s.noise_removal), eps=eps,
        probability_flow=bool(s.probability_flow), order=s.order)
  if method == "ode":
    num_steps = int(s.ode_num_steps) or None
    solver = ode_lib.check_solver_args(s.ode_solver, s.ode_rtol, s.ode_atol, num_steps)
    controller = ode_lib.check_controller(s.ode_controller)
    return lambda key, score_fn: ode_sample(
        key, sde, score_fn, shape, solver=solver, rtol=float(s.ode_rtol), atol=float(s.ode_atol), eps=eps,
        num_steps=num_steps, denoise=bool(s.noise_removal), controller=controller)
  return lambda key, score_fn: annealed_langevin_sample(
      key, sde, score_fn, shape, n_steps_each=int(s.n_steps_each),
      step_lr=float(s.ald_step_lr), denoise=bool(s.noise_removal))

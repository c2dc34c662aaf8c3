"""DPM-Solver (Lu et al., 2022a; singlestep, orders 1–3, noise prediction) and DPM-Solver++(2M)
(Lu et al., 2022b; multistep, data prediction, optional dynamic thresholding) for VE, VP and sub-VP.

The exact conversion of each SDE (see `fast_samplers`): with x_t = α_t x₀ + σ_t z, take α = m(t) and
σ = s(t) of the SDE's kernel (VE: α = 1, σ = σ(t); VP: α = e^{−B/2}, σ = √(1 − e^{−B}); sub-VP:
α = e^{−B/2}, σ = 1 − e^{−B}), λ = log(α/σ) (VE: −log σ), and the model's predictions from the score:

    ε̂(x, t) = −σ_t ∇log p_t(x),     x̂₀(x, t) = (x + σ_t² ∇log p_t(x)) / α_t.

The diffusion of each is g² = d(σ²)/dt − 2 (d log α/dt) σ² = −2σ² dλ/dt, so the probability-flow ODE
dx/dt = (d log α/dt) x − ½ g² ∇log p_t, written in λ, is the semi-linear dx/dλ = (d log α/dλ) x − σ ε̂,
whose solution from s to t (λ_t > λ_s, h = λ_t − λ_s) is, by variation of constants,

    x_t = (α_t/α_s) x_s − α_t ∫_{λ_s}^{λ_t} e^{−λ} ε̂ dλ                 (noise prediction, DPM-Solver)
        = (σ_t/σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^{λ} x̂₀ dλ                  (data prediction, DPM-Solver++)

and the solvers expand ε̂ or x̂₀ in λ.  None of this depends on which SDE produced α and σ: the only
SDE-specific pieces are α(t), σ(t) and the exact inverse t(λ) (closed form, `fast_samplers.time_of_log_snr`),
which place the intermediate and grid times at the model's own t.

Time steps are uniform in λ between λ(T) and λ(eps) (the papers' 'logSNR' skip type).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from score_sde_jax import checks
from score_sde_jax import fast_samplers as fs

ORDER_SCHEDULES = ("fast", "fixed")


def check_order(order) -> int:
  if isinstance(order, bool) or order not in (1, 2, 3):
    raise ValueError(f"order must be 1, 2 or 3; got {order!r}.")
  return int(order)


def singlestep_orders(num_steps: int, order: int, schedule: str = "fast") -> list:
  """The order of each step for a budget of `num_steps` score evaluations (DPM-Solver's
  `get_orders_and_timesteps_for_singlestep_solver`).

  'fast' (the papers' recommendation, "DPM-Solver-fast"): order 3: K = n//3 + 1 steps with orders
  [3, …, 3, 2, 1] (n ≡ 0 mod 3), [3, …, 3, 1] (n ≡ 1), [3, …, 3, 2] (n ≡ 2); order 2: [2, …, 2] (n even)
  or [2, …, 2, 1] (n odd); order 1: n steps of order 1.  The orders sum to n exactly.
  'fixed' (their 'singlestep_fixed'): n/order steps all of `order` (n must be a multiple of it)."""
  checks.check_positive_int("num_steps", num_steps)
  order = check_order(order)
  schedule = checks.check_choice("order_schedule", schedule, ORDER_SCHEDULES)
  n = num_steps
  if schedule == "fixed":
    if n % order:
      raise ValueError(f"num_steps must be a multiple of order={order} for order_schedule='fixed'; got "
                       f"{n}.")
    return [order] * (n // order)
  if order == 3:
    k = n // 3 + 1
    orders = [3] * (k - 2) + [2, 1] if n % 3 == 0 else [3] * (k - 1) + ([1] if n % 3 == 1 else [2])
  elif order == 2:
    orders = [2] * (n // 2) + ([1] if n % 2 else [])
  else:
    orders = [1] * n
  assert sum(orders) == n, (n, order, orders)
  return orders


def _lambda_grid(sde, eps, num_intervals, dtype):
  """(λ_i, t_i), i = 0..K: λ uniform from λ(T) to λ(eps), t_i = t(λ_i) exact, ends exactly T and eps."""
  lam_T = fs.log_snr(sde, jnp.asarray(sde.T, dtype))
  lam_eps = fs.log_snr(sde, jnp.asarray(eps, dtype))
  lam = jnp.linspace(lam_T, lam_eps, num_intervals + 1).astype(dtype)
  return lam, fs._grid_times(sde, lam, fs.time_of_log_snr, eps, dtype)  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------------
# DPM-Solver (singlestep, noise prediction)
# ---------------------------------------------------------------------------------------------------
def _dpm_step(order, sde, score_fn, x, t_s, t_t, lam_s, lam_t):
  """One DPM-Solver-`order` step from s to t (Lu et al., 2022a, Eq. 3.7 / Alg. 1, 2; r₁ = 1/2 for order
  2, r₁ = 1/3, r₂ = 2/3 for order 3), with α = m, σ = s and φ₁(h) = e^h − 1:

    order 1:  x_t = (α_t/α_s) x − σ_t φ₁(h) ε_s                                     (= DDIM)
    order 2:  u = (α_{s₁}/α_s) x − σ_{s₁} φ₁(r₁h) ε_s,
              x_t = (α_t/α_s) x − σ_t φ₁(h) ε_s − σ_t/(2r₁) φ₁(h) (ε(u, s₁) − ε_s)
    order 3:  u₁ = (α_{s₁}/α_s) x − σ_{s₁} φ₁(r₁h) ε_s,  D₁ = ε(u₁, s₁) − ε_s,
              u₂ = (α_{s₂}/α_s) x − σ_{s₂} φ₁(r₂h) ε_s − σ_{s₂} (r₂/r₁) (φ₁(r₂h)/(r₂h) − 1) D₁,
              D₂ = ε(u₂, s₂) − ε_s,
              x_t = (α_t/α_s) x − σ_t φ₁(h) ε_s − (σ_t/r₂) (φ₁(h)/h − 1) D₂,
  where s_j = t(λ_s + r_j h).  `order` score evaluations."""
  h = lam_t - lam_s
  coeffs = lambda t: sde.mean_coeff_and_std(t)

  def eps_at(x, t):
    return fs.noise_prediction(score_fn, x, t, coeffs(t)[1])

  a_s, _ = coeffs(t_s)
  a_t, s_t = coeffs(t_t)
  e_s = eps_at(x, t_s)
  phi = jnp.expm1(h)
  if order == 1:
    return (a_t / a_s) * x - s_t * phi * e_s
  if order == 2:
    r1 = 0.5
    t_1 = fs.time_of_log_snr(sde, lam_s + r1 * h)
    a_1, s_1 = coeffs(t_1)
    u = (a_1 / a_s) * x - s_1 * jnp.expm1(r1 * h) * e_s
    e_1 = eps_at(u, t_1)
    return (a_t / a_s) * x - s_t * phi * e_s - (s_t / (2.0 * r1)) * phi * (e_1 - e_s)
  r1, r2 = 1.0 / 3.0, 2.0 / 3.0
  t_1 = fs.time_of_log_snr(sde, lam_s + r1 * h)
  t_2 = fs.time_of_log_snr(sde, lam_s + r2 * h)
  a_1, s_1 = coeffs(t_1)
  a_2, s_2 = coeffs(t_2)
  u1 = (a_1 / a_s) * x - s_1 * jnp.expm1(r1 * h) * e_s
  d1 = eps_at(u1, t_1) - e_s
  u2 = ((a_2 / a_s) * x - s_2 * jnp.expm1(r2 * h) * e_s
        - s_2 * (r2 / r1) * (jnp.expm1(r2 * h) / (r2 * h) - 1.0) * d1)
  d2 = eps_at(u2, t_2) - e_s
  return (a_t / a_s) * x - s_t * phi * e_s - (s_t / r2) * (phi / h - 1.0) * d2


def dpm_solver_sample(key, sde, score_fn, shape, *, num_steps, eps=1e-3, denoise=False, order=3,
                      order_schedule="fast"):
  """DPM-Solver (singlestep, noise prediction) with a budget of `num_steps` score evaluations (the
  papers' NFE, their `steps`), split into steps by `singlestep_orders(num_steps, order, order_schedule)`
  on a grid uniform in λ = log(m/s); returns (x, nfe), nfe = num_steps (+1 with denoise).

  The run is one `lax.scan` over the leading steps of the top order and, statically unrolled, the tail
  of at most two lower-order steps of the 'fast' schedule.  Order k is a k-th order solver of the
  probability-flow ODE (global error O(h^k), h the λ-step).  For a budget not divisible by the order the
  'fast' schedule's lower-order tail (at the small-noise end, where σ is small) keeps the total at
  num_steps; order_schedule='fixed' uses order k on every step (num_steps a multiple of k)."""
  shape = fs.check_common(sde, score_fn, shape, num_steps, eps)
  orders = singlestep_orders(num_steps, order, order_schedule)
  x = sde.prior_sampling(key, shape)
  dtype = x.dtype
  lam, ts = _lambda_grid(sde, eps, len(orders), dtype)
  top = orders[0]
  n_top = next((i for i, o in enumerate(orders) if o != top), len(orders))

  def body(x, inp):
    t_s, t_t, lam_s, lam_t = inp
    return _dpm_step(top, sde, score_fn, x, t_s, t_t, lam_s, lam_t), None

  x, _ = jax.lax.scan(body, x, (ts[:n_top], ts[1:n_top + 1], lam[:n_top], lam[1:n_top + 1]))
  for i in range(n_top, len(orders)):      # at most two steps (the 'fast' tail)
    x = _dpm_step(orders[i], sde, score_fn, x, ts[i], ts[i + 1], lam[i], lam[i + 1])
  nfe = num_steps
  if denoise:
    x, nfe = fs.tweedie_denoise(sde, score_fn, x, eps), nfe + 1
  return x, nfe


# ---------------------------------------------------------------------------------------------------
# DPM-Solver++(2M) (multistep, data prediction)
# ---------------------------------------------------------------------------------------------------
def dynamic_threshold(x0, clip, ratio=0.995):
  """Dynamic thresholding (Saharia et al., 2022; DPM-Solver++ Sec. 5) of x̂₀ for data in [lo, hi]:
  with u = (x̂₀ − c)/w (c, w the range's centre and half-width, so the data range is [−1, 1]), per
  example q = max(quantile_ratio(|u|), 1), u ← clip(u, −q, q)/q, x̂₀ = c + w u.  Predictions inside the
  range (q = 1) are only clipped to it; far-out ones are pulled back in proportionally."""
  lo, hi = clip
  c, w = 0.5 * (lo + hi), 0.5 * (hi - lo)
  u = (x0 - c) / w
  q = jnp.quantile(jnp.abs(u).reshape(u.shape[0], -1), ratio, axis=1)
  q = jnp.maximum(q, 1.0).reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype)
  return c + w * (jnp.clip(u, -q, q) / q)


def _check_clip(clip, ratio):
  if clip is None:
    return None
  try:
    lo, hi = (float(v) for v in clip)
    ok = math.isfinite(lo) and math.isfinite(hi) and lo < hi
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"clip must be None or the data range (lo, hi) with finite lo < hi; got {clip!r}.")
  if not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) <= 1.0):
    raise ValueError(f"threshold_ratio must lie in (0, 1]; got {ratio!r}.")
  return lo, hi


def dpm_solver_pp_sample(key, sde, score_fn, shape, *, num_steps, eps=1e-3, denoise=False, clip=None,
                         threshold_ratio=0.995):
  """DPM-Solver++(2M) (Lu et al., 2022b, Alg. 2): multistep, data prediction, on a grid t_0 = T > … >
  t_K = eps uniform in λ (K = num_steps); returns (x, nfe), nfe = num_steps (+1 with denoise).

  With h_i = λ_{t_i} − λ_{t_{i−1}}, r_i = h_{i−1}/h_i and x̂₀ᵢ = x̂₀(x_{t_i}, t_i):

      i = 1:   x_{t_1} = (σ_{t_1}/σ_{t_0}) x_{t_0} − α_{t_1} (e^{−h_1} − 1) x̂₀₀                (1st order)
      i ≥ 2:   D_i = (1 + 1/(2r_i)) x̂₀_{i−1} − 1/(2r_i) x̂₀_{i−2},
               x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) x_{t_{i−1}} − α_{t_i} (e^{−h_i} − 1) D_i,
  one score evaluation per step (the previous x̂₀ is reused): a 2nd-order solver of the ODE.

  clip=(lo, hi): the data range, when known (e.g. (−1, 1) for centred images): every x̂₀ (the final
  denoising one too) is dynamically thresholded (`dynamic_threshold`, quantile `threshold_ratio`).  The
  sampler then solves a modified ODE; leave it None (default) when the range is unknown or for toy data."""
  shape = fs.check_common(sde, score_fn, shape, num_steps, eps)
  clip = _check_clip(clip, threshold_ratio)
  x = sde.prior_sampling(key, shape)
  dtype = x.dtype
  lam, ts = _lambda_grid(sde, eps, num_steps, dtype)
  alpha, sigma = sde.mean_coeff_and_std(ts)

  def x0_at(x, i):
    x0 = fs.data_prediction(score_fn, x, ts[i], alpha[i], sigma[i])
    return x0 if clip is None else dynamic_threshold(x0, clip, threshold_ratio)

  x0_prev = x0_at(x, 0)
  h1 = lam[1] - lam[0]
  x = (sigma[1] / sigma[0]) * x - alpha[1] * jnp.expm1(-h1) * x0_prev

  def body(carry, i):
    x, x0_prevprev, h_prev = carry
    x0_p = x0_at(x, i - 1)
    h = lam[i] - lam[i - 1]
    r = h_prev / h
    d = (1.0 + 0.5 / r) * x0_p - (0.5 / r) * x0_prevprev
    x = (sigma[i] / sigma[i - 1]) * x - alpha[i] * jnp.expm1(-h) * d
    return (x, x0_p, h), None

  (x, _, _), _ = jax.lax.scan(body, (x, x0_prev, h1), jnp.arange(2, num_steps + 1))
  nfe = num_steps
  if denoise:
    m, s = sde.mean_coeff_and_std(jnp.asarray(eps, dtype))
    x0 = fs.data_prediction(score_fn, x, eps, m, s)
    x, nfe = (x0 if clip is None else dynamic_threshold(x0, clip, threshold_ratio)), nfe + 1
  return x, nfe

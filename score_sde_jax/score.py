"""Turning a network's output into the score function s(x, t) ≈ ∇ₓ log p_t(x).

A *model function* here is `model_fn(x, labels) -> output` (parameters already bound).  What the network
is fed (`labels`) and what its output means follow the official score_sde conventions:

* VE, continuous: labels = σ(t); the network predicts the score directly.  With `scale_by_sigma`
  (NCSN++), it predicts σ(t)·s and the score is output / σ(t).
* VE, discrete (SMLD): labels = round((T − t)(N − 1)/T), the index into the noise ladder reversed so
  that label 0 is the largest σ (as NCSN); the network predicts the score.
* VP / sub-VP, continuous: labels = 999·t; the network predicts the noise ε of x(t) = m(t) x(0) + σ(t) ε,
  and since ∇ log p_{0t}(x(t)|x(0)) = −ε/σ(t), the score is  s = −output / σ(t).
* VP, discrete (DDPM): labels = t (N − 1) (the timestep index); s = −output / √(1 − ᾱ_i).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from score_sde_jax import checks
from score_sde_jax import sde as sde_lib

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

PARAMETERIZATIONS = ("score", "noise")


def time_labels(sde: sde_lib.SDE, t: Array, continuous: bool = True) -> Array:
  """What the network is conditioned on at time t (official conventions, see module docstring)."""
  if isinstance(sde, sde_lib.VESDE):
    if continuous:
      return sde.mean_coeff_and_std(t)[1]
    return jnp.round((sde.T - t) * (sde.N - 1) / sde.T).astype(jnp.int32)
  if continuous:
    return t * 999.0
  if isinstance(sde, sde_lib.VPSDE):
    return t * (sde.N - 1)
  raise ValueError(f"Discrete (continuous=False) labels are defined for VESDE (SMLD) and VPSDE (DDPM) "
                   f"only; got {type(sde).__name__}. Use continuous=True.")


def score_from_score_head(output: Array, std: Array, scale_by_sigma: bool = False) -> Array:
  """s = output, or s = output / σ(t) when the network predicts σ(t)·s (`scale_by_sigma`)."""
  return sde_lib.batch_mul(1.0 / std, output) if scale_by_sigma else output


def score_from_noise_head(output: Array, std: Array) -> Array:
  """s = −ε̂ / σ(t) for a network ε̂ that predicts the noise of x(t) = m(t) x(0) + σ(t) ε."""
  return sde_lib.batch_mul(-1.0 / std, output)


def noise_from_score(score: Array, std: Array) -> Array:
  """The inverse map ε̂ = −σ(t) s (VP ↔ DDPM)."""
  return sde_lib.batch_mul(-std, score)


def make_score_fn(sde: sde_lib.SDE, model_fn: ModelFn, *, parameterization: str | None = None,
                  continuous: bool = True, scale_by_sigma: bool = False) -> Callable[[Array, Array], Array]:
  """Wraps `model_fn(x, labels)` into `score_fn(x, t)`.

  parameterization: 'score' (network predicts the score; default for VE) or 'noise' (network predicts
  ε; default for VP and sub-VP, as in DDPM/DDPM++).
  """
  if parameterization is None:
    parameterization = "score" if isinstance(sde, sde_lib.VESDE) else "noise"
  parameterization = checks.check_choice("parameterization", parameterization, PARAMETERIZATIONS)
  if not continuous and not isinstance(sde, (sde_lib.VESDE, sde_lib.VPSDE)):
    raise ValueError("continuous=False needs a VESDE (SMLD) or VPSDE (DDPM); got "
                     f"{type(sde).__name__}.")

  def score_fn(x, t):
    checks.check_x_t(x, t)
    labels = time_labels(sde, t, continuous)
    output = model_fn(x, labels)
    checks.check_score_output(output, x)
    if parameterization == "score":
      std = sde.mean_coeff_and_std(t)[1]
      return score_from_score_head(output, std, scale_by_sigma)
    if continuous:
      std = sde.mean_coeff_and_std(t)[1]
    else:
      std = sde.sqrt_1m_alphas_cumprod[labels.astype(jnp.int32)]
    return score_from_noise_head(output, std)

  return score_fn

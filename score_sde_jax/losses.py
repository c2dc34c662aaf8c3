"""Score-matching objectives.

Every builder returns `loss_fn(key, params, batch) -> (loss, aux)`, pure and differentiable in `params`
with `jax.grad`; `batch['image']` is the data in model space, `[B, *D]`.

Continuous denoising score matching (Song et al., 2021, Eq. 7), with t ~ U(eps, T), x(t) = m(t) x(0) + σ(t) z:

    L(θ) = E_t E_{x(0)} E_z [ λ(t) ‖ s_θ(x(t), t) + z / σ(t) ‖² ],

  weighting 'sigma2'      λ(t) = σ(t)²  (default; ‖σ s + z‖²),
            'likelihood'  λ(t) = g(t)²  (Song et al., 2021b: then L bounds the negative log-likelihood),
            'none'        λ(t) = 1.
  With `importance_sampling` (likelihood weighting only) t is drawn from q(t) ∝ g(t)²/σ(t)² on [eps, T] by
  inverting its CDF in closed form (`SDE.weight_integral`), and each term is reweighted by
  λ(t) / (q(t) (T − eps)) = Z σ(t)² / (T − eps), Z = F(T) − F(eps), so the estimator has the same
  expectation as with uniform t and lower variance.

Discrete objectives: SMLD (NCSN, Song & Ermon 2019) and DDPM (Ho et al., 2020, L_simple).

For low-dimensional data, explicit (Hyvärinen, 2005) and sliced (Song et al., 2019) score matching on the
perturbed data x(t), with the same λ(t):

    explicit:    λ(t) [ ½ ‖s‖² + tr(∂s/∂x) ]                         (exact Jacobian trace)
    sliced:      λ(t) [ ½ (vᵀ s)² + vᵀ (∂s/∂x) v ],   v ~ N(0, I)
    sliced (VR): λ(t) [ ½ ‖s‖² + vᵀ (∂s/∂x) v ]                      (variance-reduced form)

They equal the DSM objective up to a constant independent of θ.  The constant is not added, so they can be
negative.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from score_sde_jax import checks
from score_sde_jax import divergence
from score_sde_jax import score as score_lib
from score_sde_jax import sde as sde_lib

Array = jax.Array

WEIGHTINGS = ("sigma2", "likelihood", "none")
LOSSES = ("dsm", "esm", "ssm", "ssm_vr", "smld", "ddpm")


def _reduce(x: Array, reduce_mean: bool) -> Array:
  """Sum (or mean) over the non-batch dimensions."""
  flat = x.reshape(x.shape[0], -1)
  return jnp.mean(flat, axis=-1) if reduce_mean else jnp.sum(flat, axis=-1)


def sample_time(key: Array, sde: sde_lib.SDE, batch_size: int, eps: float,
                importance_sampling: bool = False):
  """t ∈ [eps, T] and the per-example weight correction.

  Uniform: t ~ U(eps, T), correction 1.  Importance sampling: t ~ q ∝ g²/σ², drawn as
  t = F⁻¹(F(eps) + u (F(T) − F(eps))), with correction (F(T) − F(eps)) σ(t)² / (g(t)² (T − eps)), so that
  λ(t)·correction·ℓ(t) has the same expectation under q as λ(t)·ℓ(t) under U(eps, T).
  """
  u = jax.random.uniform(key, (batch_size,))
  if not importance_sampling:
    return u * (sde.T - eps) + eps, jnp.ones((batch_size,))
  f_lo, f_hi = sde.weight_integral(jnp.asarray(eps)), sde.weight_integral(jnp.asarray(sde.T))
  t = sde.weight_integral_inverse(f_lo + u * (f_hi - f_lo))
  t = jnp.clip(t, eps, sde.T)
  _, std = sde.mean_coeff_and_std(t)
  g2 = sde.sde(jnp.zeros((batch_size, 1)), t)[1] ** 2
  return t, (f_hi - f_lo) * std ** 2 / (g2 * (sde.T - eps))


def _weight(sde, t, std, weighting):
  if weighting == "sigma2":
    return std ** 2
  if weighting == "likelihood":
    return sde.sde(jnp.zeros((t.shape[0], 1)), t)[1] ** 2
  return jnp.ones_like(t)


def _check_common(sde, eps, weighting, importance_sampling):
  sde_lib.check_sde(sde)
  checks.check_eps(eps, sde.T)
  weighting = checks.check_choice("weighting", weighting, WEIGHTINGS)
  if importance_sampling and weighting != "likelihood":
    raise ValueError("importance_sampling=True samples t from g²/σ² and is defined for "
                     f"weighting='likelihood' only; got weighting={weighting!r}.")


def dsm_loss(key: Array, score_fn, x: Array, sde: sde_lib.SDE, *, weighting: str = "sigma2",
             importance_sampling: bool = False, reduce_mean: bool = True, eps: float = 1e-5):
  """Per-example continuous DSM losses [B] for a given `score_fn(x, t)` (see module docstring)."""
  _check_common(sde, eps, weighting, importance_sampling)
  k_t, k_z = jax.random.split(key)
  t, correction = sample_time(k_t, sde, x.shape[0], eps, importance_sampling)
  z = jax.random.normal(k_z, x.shape, x.dtype)
  mean, std = sde.marginal_prob(x, t)
  perturbed = mean + sde_lib.batch_mul(std, z)
  score = score_fn(perturbed, t)
  if weighting == "sigma2":   # written as ‖σ s + z‖², the numerically safe form of σ²‖s + z/σ‖²
    per_dim = jnp.square(sde_lib.batch_mul(std, score) + z)
    return _reduce(per_dim, reduce_mean) * correction
  per_dim = jnp.square(score + sde_lib.batch_mul(1.0 / std, z))
  return _reduce(per_dim, reduce_mean) * _weight(sde, t, std, weighting) * correction


def explicit_sm_loss(key, score_fn, x, sde, *, weighting="sigma2", reduce_mean=True, eps=1e-5,
                     sliced=False, variance_reduced=False):
  """Per-example explicit or sliced score matching on x(t) ~ p_t (see module docstring)."""
  k_t, k_z, k_v = jax.random.split(key, 3)
  t, _ = sample_time(k_t, sde, x.shape[0], eps, False)
  z = jax.random.normal(k_z, x.shape, x.dtype)
  mean, std = sde.marginal_prob(x, t)
  xt = mean + sde_lib.batch_mul(std, z)
  fn = lambda y: score_fn(y, t)
  d = x[0].size
  if not sliced:
    s = fn(xt)
    trace = divergence.exact_divergence(fn, xt)
    half_norm = 0.5 * jnp.sum(s.reshape(s.shape[0], -1) ** 2, axis=-1)
  else:
    v = jax.random.normal(k_v, x.shape, x.dtype)
    s, jv = jax.jvp(fn, (xt,), (v,))
    trace = jnp.sum((v * jv).reshape(x.shape[0], -1), axis=-1)
    if variance_reduced:
      half_norm = 0.5 * jnp.sum(s.reshape(s.shape[0], -1) ** 2, axis=-1)
    else:
      half_norm = 0.5 * jnp.sum((v * s).reshape(x.shape[0], -1), axis=-1) ** 2
  per_example = half_norm + trace
  if reduce_mean:
    per_example = per_example / d
  return per_example * _weight(sde, t, std, weighting)


def smld_loss(key, model_fn, x, sde: sde_lib.VESDE, *, reduce_mean=False):
  """NCSN loss: σ_i² ‖ s_θ(x + σ_i z, i) + z/σ_i ‖², i ~ U{0..N−1} over the ladder in decreasing order
  (label 0 = σ_max).  `model_fn(x, labels)` returns the score."""
  if not isinstance(sde, sde_lib.VESDE):
    raise ValueError(f"The SMLD loss needs a VESDE; got {type(sde).__name__}.")
  k_l, k_z = jax.random.split(key)
  labels = jax.random.choice(k_l, sde.N, shape=(x.shape[0],))
  sigmas = jnp.flip(sde.discrete_sigmas)[labels]
  noise = sde_lib.batch_mul(sigmas, jax.random.normal(k_z, x.shape, x.dtype))
  score = model_fn(x + noise, labels)
  target = -sde_lib.batch_mul(1.0 / sigmas ** 2, noise)
  return _reduce(jnp.square(score - target), reduce_mean) * sigmas ** 2


def ddpm_loss(key, model_fn, x, sde: sde_lib.VPSDE, *, reduce_mean=True):
  """DDPM L_simple: ‖ ε_θ(√ᾱ_i x + √(1−ᾱ_i) ε, i) − ε ‖², i ~ U{0..N−1}.  `model_fn` predicts ε."""
  if not isinstance(sde, sde_lib.VPSDE):
    raise ValueError(f"The DDPM loss needs a VPSDE; got {type(sde).__name__}.")
  k_l, k_z = jax.random.split(key)
  labels = jax.random.choice(k_l, sde.N, shape=(x.shape[0],))
  noise = jax.random.normal(k_z, x.shape, x.dtype)
  perturbed = (sde_lib.batch_mul(sde.sqrt_alphas_cumprod[labels], x)
               + sde_lib.batch_mul(sde.sqrt_1m_alphas_cumprod[labels], noise))
  return _reduce(jnp.square(model_fn(perturbed, labels) - noise), reduce_mean)


def loss_name_from_config(config) -> str:
  """'dsm'/'esm'/'ssm'/'ssm_vr' from `training.loss` when continuous, else 'smld' (VE) / 'ddpm' (VP)."""
  t = config.training
  if not t.continuous:
    name = checks.normalize_name(t.sde)
    if name in ("vesde", "ve"):
      return "smld"
    if name in ("vpsde", "vp"):
      return "ddpm"
    raise ValueError(f"training.continuous=False is defined for vesde (SMLD) and vpsde (DDPM) only; "
                     f"got training.sde={t.sde!r}.")
  loss = checks.check_choice("training.loss", t.loss, ("dsm", "esm", "ssm", "ssm_vr"))
  return loss


def weighting_from_config(config) -> str:
  t = config.training
  weighting = checks.check_choice("training.weighting", t.weighting, WEIGHTINGS)
  if t.likelihood_weighting:
    if weighting not in ("sigma2", "likelihood"):
      raise ValueError(f"training.likelihood_weighting=True conflicts with training.weighting="
                       f"{weighting!r}; set one of them.")
    weighting = "likelihood"
  return weighting


def get_per_example_loss_fn(sde: sde_lib.SDE, apply_fn: Callable, config, train: bool = True, *,
                            eps: float = 1e-5):
  """`losses_fn(key, params, batch) -> [B]`: the per-example losses of the objective the config
  selects (for masked evaluation of padded batches); see `get_loss_fn`."""
  loss_name = loss_name_from_config(config)
  weighting = weighting_from_config(config)
  importance_sampling = bool(config.training.importance_sampling)
  reduce_mean = bool(config.training.reduce_mean)
  continuous = loss_name not in ("smld", "ddpm")
  if continuous:
    _check_common(sde, eps, weighting, importance_sampling)
  parameterization = "score" if isinstance(sde, sde_lib.VESDE) else "noise"

  num_classes, p_uncond = int(config.model.num_classes), float(config.training.label_dropout)

  def losses_fn(key, params, batch):
    x = batch["image"]
    k_drop, k_loss = jax.random.split(key)
    kwargs = {}
    if num_classes > 0:
      # Class-conditional s_θ(x, t, y): in training, each label is replaced by the null class ∅ =
      # num_classes with probability training.label_dropout, so that one network also learns the
      # unconditional score s_θ(x, t, ∅) of classifier-free guidance (Ho & Salimans 2022).
      y = jnp.asarray(batch["label"], jnp.int32)
      if train and p_uncond > 0:
        k_drop, k_y = jax.random.split(k_drop)
        y = jnp.where(jax.random.uniform(k_y, y.shape) < p_uncond, num_classes, y)
      kwargs["class_labels"] = y

    def model_fn(y, labels):
      rngs = {"dropout": k_drop} if train else {}
      return apply_fn(params, y, labels, train=train, rngs=rngs, **kwargs)

    if loss_name == "smld":
      return smld_loss(k_loss, model_fn, x, sde, reduce_mean=reduce_mean)
    if loss_name == "ddpm":
      return ddpm_loss(k_loss, model_fn, x, sde, reduce_mean=reduce_mean)
    score_fn = score_lib.make_score_fn(sde, model_fn, parameterization=parameterization)
    if loss_name == "dsm":
      return dsm_loss(k_loss, score_fn, x, sde, weighting=weighting,
                      importance_sampling=importance_sampling, reduce_mean=reduce_mean, eps=eps)
    return explicit_sm_loss(k_loss, score_fn, x, sde, weighting=weighting, reduce_mean=reduce_mean,
                            eps=eps, sliced=loss_name != "esm", variance_reduced=loss_name == "ssm_vr")

  return losses_fn


def get_loss_fn(sde: sde_lib.SDE, apply_fn: Callable, config, train: bool = True, *,
                eps: float = 1e-5):
  """`loss_fn(key, params, batch) -> (loss, aux)` for the objective the config selects.

  `apply_fn(params, x, labels, train=..., rngs=...)` is a Flax `model.apply`; `params` is the whole
  variables pytree.  The network's output is turned into a score with the official conventions
  (`score_sde_jax.score.make_score_fn`: VE networks output the score, VP/sub-VP networks the noise).
  Continuous objectives: 'dsm' (weighting from `training.weighting` / `training.likelihood_weighting`,
  `training.importance_sampling`), 'esm', 'ssm', 'ssm_vr' (`training.loss`); discrete
  (`training.continuous=False`): SMLD for VE, DDPM for VP.
  aux = {'loss': mean loss, 'loss_std': std of the per-example losses}.
  """
  losses_fn = get_per_example_loss_fn(sde, apply_fn, config, train, eps=eps)

  def loss_fn(key, params, batch):
    losses = losses_fn(key, params, batch)
    loss = jnp.mean(losses)
    return loss, {"loss": loss, "loss_std": jnp.std(losses)}

  return loss_fn

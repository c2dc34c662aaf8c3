"""Controllable generation (Song et al., ICLR 2021, Sec. 5 and App. I): class guidance, inpainting and
colourisation with an unconditional score model.

Guidance is a transformation of score functions: `classifier_guided_score_fn` and
`classifier_free_score_fn` return an ordinary `score_fn(x, t)`, so every sampler of `sampling`
(`pc_sample`, `ode_sample`, `annealed_langevin_sample`) and the likelihood take it unchanged.

Inpainting and colourisation are the official PC samplers `get_pc_inpainter` / `get_pc_colorizer`
(score_sde, controllable_generation.py): the predictors and correctors of `sampling.PREDICTORS` /
`sampling.CORRECTORS`, each update followed by replacing the known part of x with a fresh sample of the
forward process at that time, x_known ← m(t) x_known(0) + σ(t) z.  A run is one `lax.scan` over the N
steps, pure and jit-/vmap-able, with the PRNG key threaded; the reported NFE is the true number of score
evaluations, N × (predictor's + n_steps × corrector's), as `sampling.pc_sample`.

The replacement method samples the unknown part from p(x_unknown | x_known) exactly (up to the sampler's
discretisation) when the two parts are independent under p_t for every t; otherwise it is the paper's
approximation (the known part's noisy copy only reaches the unknown part through the score).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from score_sde_jax import checks
from score_sde_jax import sampling
from score_sde_jax import sde as sde_lib

Array = jax.Array
batch_mul = sde_lib.batch_mul


# ---------------------------------------------------------------------------------------------------
# Guidance: transformations of score functions
# ---------------------------------------------------------------------------------------------------
def _check_labels(y) -> Array:
  y = jnp.asarray(y)
  if y.ndim != 1 or not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f"labels y must be an int array shaped [B]; got dtype {y.dtype}, shape {y.shape}.")
  return y


def _check_weight(param: str, value, allow_negative: bool):
  """A Python float after checking it (finite; >= 0 unless allow_negative), or a traced scalar left
  as is (so that the weight can be an argument of a jitted or vmapped sampler)."""
  if isinstance(value, jax.core.Tracer):
    if jnp.ndim(value) != 0:
      raise ValueError(f"{param} must be a scalar; got shape {jnp.shape(value)}.")
    return value
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{param} must be a finite number; got {value!r}.") from None
  if not np.isfinite(value) or (not allow_negative and value < 0):
    raise ValueError(f"{param} must be a finite number{'' if allow_negative else ' >= 0'}; got {value!r}.")
  return value


def classifier_guided_score_fn(score_fn: Callable, classifier_log_prob_fn: Callable, y,
                               scale: float = 1.0) -> Callable[[Array, Array], Array]:
  """The class-conditional score by Bayes' rule from an unconditional score and a noise-conditional
  classifier (Song et al., 2021, Eq. 48; Dhariwal & Nichol, 2021, with a guidance scale):

      ∇ₓ log p_t(x | y) = ∇ₓ log p_t(x) + ∇ₓ log p_t(y | x),      p_t(x | y) = p_t(y | x) p_t(x) / p(y),

  returned as  (x, t) ↦ s(x, t) + scale · ∇ₓ log p_t(y | x).  scale = 1 is the exact conditional
  score (for an exact classifier); scale = 0 the unconditional one; scale > 1 samples (approximately)
  from p_t(x) p_t(y | x)^scale, sharper in the class.

  classifier_log_prob_fn(x, t) returns log-probabilities [B, num_classes] (logits are accepted as well:
  they are normalised with log_softmax, a no-op on log-probabilities); y is an int array [B].  The
  gradient is jax.grad of Σ_b log p_t(y_b | x_b), which is the per-example gradient because example b's
  log-probability depends on x_b only (per-example independence of the classifier: no batch norm in
  training mode, no cross-example attention).  `scale` may be a traced scalar (an argument of the
  caller's jit/vmap); concrete values must be finite.
  """
  y = _check_labels(y)
  scale = _check_weight("scale", scale, allow_negative=True)

  def selected_log_prob(x, t):
    log_p = jax.nn.log_softmax(classifier_log_prob_fn(x, t), axis=-1)
    if log_p.ndim != 2 or log_p.shape[0] != x.shape[0]:
      raise ValueError(f"classifier_log_prob_fn(x, t) must return [B, num_classes] with B = {x.shape[0]}; "
                       f"got shape {log_p.shape}.")
    return jnp.sum(jnp.take_along_axis(log_p, y[:, None].astype(jnp.int32), axis=1))

  classifier_grad = jax.grad(selected_log_prob)

  def guided_score_fn(x, t):
    if y.shape[0] != x.shape[0]:
      raise ValueError(f"labels y have batch {y.shape[0]} but x has batch {x.shape[0]}.")
    return score_fn(x, t) + scale * classifier_grad(x, t)

  return guided_score_fn


def classifier_free_score_fn(cond_score_fn: Callable, y, guidance_weight: float,
                             null_label: int) -> Callable[[Array, Array], Array]:
  """Classifier-free guidance (Ho & Salimans, 2021):

      s̃(x, t) = (1 + w) s(x, t, y) − w s(x, t, ∅) = s(x, t, y) + w [s(x, t, y) − s(x, t, ∅)],

  the score of p_t(x | y) p_t(y | x)^w up to normalisation (the implicit classifier is
  ∇ log p_t(y | x) = s(x, t, y) − s(x, t, ∅)).  w = 0 gives the conditional score; w > 0 sharpens.
  cond_score_fn(x, t, labels) is a conditional score network trained with label dropout to
  `null_label` (the unconditional score).  Each call evaluates cond_score_fn twice (one for y, one for
  ∅; once when w is the concrete 0), so a sampler's reported NFE counts guided-score evaluations, each
  two network passes.  guidance_weight may be a traced scalar (an argument of the caller's jit/vmap).
  """
  y = _check_labels(y)
  w = _check_weight("guidance_weight", guidance_weight, allow_negative=False)
  null = jnp.full_like(y, int(null_label))

  def guided_score_fn(x, t):
    cond = cond_score_fn(x, t, y)
    if isinstance(w, float) and w == 0:
      return cond   # the conditional score itself, one network pass
    return (1.0 + w) * cond - w * cond_score_fn(x, t, null)

  return guided_score_fn


# ---------------------------------------------------------------------------------------------------
# Inpainting and colourisation: PC sampling with the known part replaced after every update
# ---------------------------------------------------------------------------------------------------
# The official colour transform (score_sde, controllable_generation.get_pc_colorizer), a 3×3 orthogonal
# matrix whose first column is the grey direction (1, 1, 1)/√3, written exactly: columns
# (1, 1, 1)/√3, (−2, 1, 1)/√6, (0, 1, −1)/√2.  decouple(x) = x @ M (channels last), couple(y) = y @ Mᵀ.
COLOR_MATRIX = np.array([[1 / np.sqrt(3), -2 / np.sqrt(6), 0.0],
                         [1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)],
                         [1 / np.sqrt(3), 1 / np.sqrt(6), -1 / np.sqrt(2)]])


def decouple(x: Array) -> Array:
  """RGB (channels last) → the decoupled colour space, channel 0 = (R + G + B)/√3 = √3 · grey."""
  return jnp.einsum("...i,ij->...j", x, jnp.asarray(COLOR_MATRIX, x.dtype))


def couple(y: Array) -> Array:
  """The inverse of `decouple` (M is orthogonal: M⁻¹ = Mᵀ)."""
  return jnp.einsum("...j,ij->...i", y, jnp.asarray(COLOR_MATRIX, y.dtype))


def grey(x: Array) -> Array:
  """The grey channel the colouriser keeps: the channel mean (R + G + B)/3, shaped [..., 1] — the
  official equal-weight convention (decouple(x)[..., 0] / √3), not an ITU luma."""
  return jnp.mean(x, axis=-1, keepdims=True)


def _check_mask(mask, data) -> Array:
  try:
    mask = jnp.broadcast_to(jnp.asarray(mask, data.dtype), data.shape)
  except (ValueError, TypeError):
    raise ValueError(f"mask must broadcast to data's shape {tuple(data.shape)}; got shape "
                     f"{getattr(mask, 'shape', None)}.") from None
  if not isinstance(mask, jax.core.Tracer):
    values = np.unique(np.asarray(mask))
    if not np.all(np.isin(values, (0.0, 1.0))):
      raise ValueError(f"mask must hold 0 (unknown) and 1 (known) only; got values {values[:8]}.")
  return mask


def _projected_pc(key, sde, score_fn, shape, known, mask, to_latent, from_latent, predictor, corrector,
                  snr, n_steps, probability_flow, eps, denoise):
  """PC sampling (the official order: corrector then predictor at each t_i = linspace(T, eps, N)) in
  which after every update the known latent coordinates (mask == 1 in the space of `to_latent`) are
  replaced by a sample of the forward marginal N(m(t) known, σ(t)² I) at the update's t.  Returns the
  final latent state (mean of the last update when `denoise`) and the NFE."""
  sde_lib.check_sde(sde)
  shape = checks.check_shape("shape", shape)
  predictor = checks.check_choice("predictor", predictor, sampling.PREDICTORS)
  corrector = checks.check_choice("corrector", corrector, sampling.CORRECTORS)
  checks.check_eps(eps, sde.T)
  checks.check_non_negative_int("n_steps", n_steps)
  checks.check_positive("snr", snr)
  checks.check_score_fn(score_fn, shape)
  predictor_entry, corrector_entry = sampling.PREDICTORS[predictor], sampling.CORRECTORS[corrector]
  batch = shape[0]
  timesteps = jnp.linspace(sde.T, eps, sde.N)

  def predict(k, x, vec_t):
    return predictor_entry.fn(k, x, vec_t, sde, score_fn, probability_flow)

  def correct(k, x, vec_t):
    return corrector_entry.fn(k, x, vec_t, sde, score_fn, snr, n_steps)

  def replace_known(update_fn, key, x, vec_t):
    k_update, k_noise = jax.random.split(key)
    x, x_mean = update_fn(k_update, x, vec_t)
    known_mean, std = sde.marginal_prob(known, vec_t)
    known_noisy = known_mean + batch_mul(std, jax.random.normal(k_noise, shape, known.dtype))
    x = from_latent(to_latent(x) * (1.0 - mask) + known_noisy * mask)
    # The official code writes x (already noised) into x_mean's unknown part, so its `denoise` returns
    # the noisy unknown pixels; here x_mean keeps the update's noise-free mean there.
    x_mean = from_latent(to_latent(x_mean) * (1.0 - mask) + known_mean * mask)
    return x, x_mean

  k_prior, k_loop = jax.random.split(key)
  # The unknown latent coordinates start from the prior (M is orthogonal and the prior isotropic, so a
  # prior sample in the latent space is one in data space).
  x = from_latent(known * mask + to_latent(sde.prior_sampling(k_prior, shape)) * (1.0 - mask))

  def body(carry, t):
    x, _, key = carry
    key, k_corr, k_pred = jax.random.split(key, 3)
    vec_t = jnp.full((batch,), t)
    x, x_mean = replace_known(correct, k_corr, x, vec_t)
    x, x_mean = replace_known(predict, k_pred, x, vec_t)
    return (x, x_mean, key), None

  (x, x_mean, _), _ = jax.lax.scan(body, (x, x, k_loop), timesteps)
  nfe = sde.N * (predictor_entry.nfe + n_steps * corrector_entry.nfe)
  return to_latent(x_mean if denoise else x), nfe


def inpaint(key, sde, score_fn, data, mask, *, predictor="reverse_diffusion", corrector="langevin",
            snr=0.16, n_steps=1, probability_flow=False, eps=1e-3, denoise=True):
  """Fills in the entries of `data` where mask == 0 by PC sampling from the unconditional score model
  (the official `get_pc_inpainter`): x starts as data·mask + prior·(1 − mask); at each t_i =
  linspace(T, eps, N) the corrector and then the predictor update x, and after each update the known
  part is replaced by a sample of the forward process,

      x ← x·(1 − mask) + (m(t_i)·data + σ(t_i)·z)·mask,   z ~ N(0, I).

  data: [B, *D]; mask: 1 = known, 0 = to fill, broadcastable to data's shape.  Returns (x, nfe) with
  x equal to `data` bit for bit where mask == 1 and the last update's mean (denoise=True) or sample
  elsewhere.  predictor / corrector: names in `sampling.PREDICTORS` / `sampling.CORRECTORS`.

  Differences from the official code, none in the sampling dynamics: eps defaults to this package's
  1e-3 (official 1e-5); the returned mean (denoise=True) has the last update's noise-free mean in the
  unknown part (the official `x_mean = x * (1 - mask) + ...` reuses the already-noised x there, so its
  "denoised" output keeps the last noise); the known part of the output is `data` exactly (the
  official output has the forward mean m(eps)·data there, or its noisy copy without denoise).
  """
  data = jnp.asarray(data)
  mask = _check_mask(mask, data)
  identity = lambda v: v
  x, nfe = _projected_pc(key, sde, score_fn, data.shape, data, mask, identity, identity, predictor,
                         corrector, snr, n_steps, probability_flow, eps, denoise)
  return jnp.where(mask == 1, data, x), nfe


def colorize(key, sde, score_fn, gray, *, predictor="reverse_diffusion", corrector="langevin", snr=0.16,
             n_steps=1, probability_flow=False, eps=1e-3, denoise=True):
  """Colours grey images by PC sampling from an unconditional RGB score model (the official
  `get_pc_colorizer`): inpainting in the decoupled colour space y = x M (`decouple`), where the grey
  image occupies channel 0 (y₀ = √3 · grey) and channels 1, 2 (orthogonal to grey) are filled in.

  gray: [B, ..., 3] with equal channels (as the official input) or [B, ..., 1]; the value kept is its
  `grey` (channel mean).  Returns (x, nfe) with x [B, ..., 3] whose `grey(x)` equals `grey(gray)` to
  float32 round-off (it is set exactly in the decoupled space and mapped back by Mᵀ).

  M (`COLOR_MATRIX`) is the official matrix written exactly (the official float32 entries agree to
  3e-7; its third column is (0, 1, −1)/√2 — the opposite sign, (0, −1, 1)/√2, is equally valid and gives
  the same sampler: the updates only project onto the grey direction and its orthogonal complement).  Differences from the official code, besides those listed for
  `inpaint`: the unknown channels start from a prior sample in the decoupled space (the official code
  zeroes the R channel of the prior sample in RGB before decoupling, which shrinks the initial colour
  channels' variance; the first update overwrites the grey channel either way).
  """
  gray = jnp.asarray(gray)
  if gray.ndim < 2 or gray.shape[-1] not in (1, 3):
    raise ValueError(f"gray must be shaped [B, ..., 3] or [B, ..., 1] (channels last); got {gray.shape}.")
  if gray.shape[-1] == 1:
    gray = jnp.repeat(gray, 3, axis=-1)
  known = decouple(gray)
  mask = jnp.broadcast_to(jnp.asarray([1.0, 0.0, 0.0], gray.dtype), gray.shape)
  y, nfe = _projected_pc(key, sde, score_fn, gray.shape, known, mask, decouple, couple, predictor,
                         corrector, snr, n_steps, probability_flow, eps, denoise)
  return couple(jnp.where(mask == 1, known, y)), nfe

"""Forward SDEs of score-based generative modelling (Song et al., ICLR 2021, Sec. 3.4 and App. B).

Every SDE here is an Itô SDE   dx = f(x, t) dt + g(t) dw,   t ∈ [0, T],
whose perturbation kernel p_{0t}(x(t) | x(0)) = N(x(t); m(t) x(0), σ(t)² I) is Gaussian and known in
closed form (`marginal_prob` returns (m(t) x(0), σ(t))).  The reverse-time SDE (Anderson, 1982) is

    dx = [f(x, t) - g(t)² ∇ₓ log p_t(x)] dt + g(t) dw̄,

and the probability-flow ODE, which shares the marginals p_t, is

    dx/dt = f(x, t) - ½ g(t)² ∇ₓ log p_t(x).

The classes are frozen dataclasses whose fields are static pytree metadata: an SDE can be closed over,
passed to `jax.jit` as a static argument (it is hashable) or passed through `jax.jit`/`vmap` as a pytree
with no leaves.  All methods are pure and jit-/vmap-able.  Shapes: `x` is `[B, *D]`, `t` is `[B]`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from score_sde_jax import checks

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


def batch_mul(a: Array, b: Array) -> Array:
  """Multiplies a per-example `[B]` array into a `[B, *D]` array."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (jnp.ndim(b) - jnp.ndim(a))) * b


def _sum_except_batch(x: Array) -> Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def _static_dataclass(cls):
  """A frozen, hashable dataclass registered as a pytree whose fields are all static metadata."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  fields = tuple(f.name for f in dataclasses.fields(cls))
  jax.tree_util.register_dataclass(cls, data_fields=[], meta_fields=list(fields))
  return cls


class SDE:
  """Interface shared by the forward SDEs.  Subclasses define the methods below."""

  N: int

  @property
  def T(self) -> float:
    return 1.0

  # -- to be provided by subclasses --------------------------------------------------------------
  def sde(self, x: Array, t: Array) -> Tuple[Array, Array]:
    """Returns (f(x, t), g(t)): the drift shaped like x and the diffusion shaped `[B]`."""
    raise NotImplementedError

  def marginal_prob(self, x: Array, t: Array) -> Tuple[Array, Array]:
    """Returns the mean m(t)·x(0) (shaped like x) and std σ(t) (shaped `[B]`) of p_{0t}(x(t) | x(0))."""
    raise NotImplementedError

  def prior_sampling(self, key: Array, shape) -> Array:
    raise NotImplementedError

  def prior_logp(self, z: Array) -> Array:
    raise NotImplementedError

  def mean_coeff_and_std(self, t: Array) -> Tuple[Array, Array]:
    """(m(t), σ(t)) of the perturbation kernel, both shaped like t."""
    raise NotImplementedError

  def weight_integral(self, t: Array) -> Array:
    """An antiderivative F(t) of g(t)²/σ(t)², the density (up to normalisation) that importance
    sampling of t for the likelihood weighting draws from (Song et al., 2021b, "ScoreFlow")."""
    raise NotImplementedError

  def weight_integral_inverse(self, v: Array) -> Array:
    """The inverse of `weight_integral`: t such that F(t) = v."""
    raise NotImplementedError

  # -- shared ------------------------------------------------------------------------------------
  def _check_batch(self, x: Array, t: Array) -> None:
    checks.check_x_t(x, t)

  def discretize(self, x: Array, t: Array) -> Tuple[Array, Array]:
    """Euler–Maruyama discretisation x_{i+1} = x_i + f_i + G_i z_i with step Δt = T/N:
    f_i = f(x, t) Δt, G_i = g(t) √Δt.  VE and VP override it with the SMLD and DDPM chains."""
    dt = self.T / self.N
    drift, diffusion = self.sde(x, t)
    return drift * dt, diffusion * jnp.sqrt(dt)

  def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
    """The reverse-time SDE (or, with `probability_flow=True`, the probability-flow ODE) of this SDE
    for the score model `score_fn(x, t)`."""
    return ReverseSDE(self, score_fn, bool(probability_flow))


@dataclasses.dataclass(frozen=True)
class ReverseSDE:
  """Reverse-time SDE  dx = [f - g² s(x, t)] dt + g dw̄  (probability_flow=False), or the ODE
  dx/dt = f - ½ g² s(x, t)  (probability_flow=True), where s is `score_fn`."""

  forward: SDE
  score_fn: ScoreFn
  probability_flow: bool = False

  @property
  def N(self) -> int:
    return self.forward.N

  @property
  def T(self) -> float:
    return self.forward.T

  def sde(self, x: Array, t: Array) -> Tuple[Array, Array]:
    drift, diffusion = self.forward.sde(x, t)
    score = self.score_fn(x, t)
    scale = 0.5 if self.probability_flow else 1.0
    drift = drift - batch_mul(diffusion ** 2 * scale, score)
    diffusion = jnp.zeros_like(diffusion) if self.probability_flow else diffusion
    return drift, diffusion

  def discretize(self, x: Array, t: Array) -> Tuple[Array, Array]:
    """Reverse of the forward discretisation: rev_f = f - G² s (× ½ for the ODE), rev_G = G (0)."""
    f, G = self.forward.discretize(x, t)
    scale = 0.5 if self.probability_flow else 1.0
    rev_f = f - batch_mul(G ** 2 * scale, self.score_fn(x, t))
    rev_G = jnp.zeros_like(G) if self.probability_flow else G
    return rev_f, rev_G


def _gaussian_logp(z: Array, std: float) -> Array:
  """log N(z; 0, std² I) summed over the non-batch dimensions."""
  d = math.prod(z.shape[1:])
  return -0.5 * d * math.log(2 * math.pi * std ** 2) - _sum_except_batch(z ** 2) / (2 * std ** 2)


@_static_dataclass
class VESDE(SDE):
  """Variance-exploding SDE (continuous limit of SMLD/NCSN):

      dx = √(d[σ²(t)]/dt) dw,   σ(t) = σ_min (σ_max/σ_min)^t,
      g(t) = σ(t) √(2 log(σ_max/σ_min)),   p_{0t} = N(x(0), σ(t)² I).

  As in the official code, σ(t) (not √(σ(t)² − σ_min²)) is the kernel's std: the data at t = 0 is
  taken as already perturbed by N(0, σ_min²), which is what the SMLD noise ladder assumes.
  `discretize` gives the SMLD chain x_i = x_{i-1} + √(σ_i² − σ_{i-1}²) z over the geometric ladder
  σ_i = exp(linspace(log σ_min, log σ_max, N)), with σ_{-1} = 0.
  """

  sigma_min: float = 0.01
  sigma_max: float = 50.0
  N: int = 1000

  def __post_init__(self):
    checks.check_positive("sigma_min", self.sigma_min)
    checks.check_positive("sigma_max", self.sigma_max)
    if not self.sigma_max > self.sigma_min:
      raise ValueError(f"sigma_max must exceed sigma_min; got sigma_min={self.sigma_min}, "
                       f"sigma_max={self.sigma_max}.")
    checks.check_positive_int("N", self.N)

  @property
  def discrete_sigmas(self) -> Array:
    return jnp.exp(jnp.linspace(np.log(self.sigma_min), np.log(self.sigma_max), self.N))

  def _log_ratio(self) -> float:
    return math.log(self.sigma_max / self.sigma_min)

  def mean_coeff_and_std(self, t):
    t = jnp.asarray(t)
    return jnp.ones_like(t), self.sigma_min * (self.sigma_max / self.sigma_min) ** t

  def sde(self, x, t):
    self._check_batch(x, t)
    sigma = self.mean_coeff_and_std(t)[1]
    diffusion = sigma * math.sqrt(2 * self._log_ratio())
    return jnp.zeros_like(x), diffusion

  def marginal_prob(self, x, t):
    self._check_batch(x, t)
    return x, self.mean_coeff_and_std(t)[1]

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape) * self.sigma_max

  def prior_logp(self, z):
    return _gaussian_logp(z, self.sigma_max)

  def timestep_index(self, t: Array) -> Array:
    """Index i of the discrete noise level for continuous t (the official convention)."""
    return (t * (self.N - 1) / self.T).astype(jnp.int32)

  def discretize(self, x, t):
    """SMLD chain: f = 0, G = √(σ_i² − σ_{i-1}²)."""
    self._check_batch(x, t)
    i = self.timestep_index(t)
    sigmas = self.discrete_sigmas
    sigma = sigmas[i]
    adjacent = jnp.where(i == 0, 0.0, sigmas[jnp.maximum(i - 1, 0)])
    return jnp.zeros_like(x), jnp.sqrt(sigma ** 2 - adjacent ** 2)

  def weight_integral(self, t):
    # g²/σ² = 2 log(σ_max/σ_min) is constant: importance sampling of t reduces to uniform sampling.
    return 2 * self._log_ratio() * jnp.asarray(t)

  def weight_integral_inverse(self, v):
    return jnp.asarray(v) / (2 * self._log_ratio())


class _VPFamily(SDE):
  """Shared pieces of VP and sub-VP: β(t) = β_min + t(β_max − β_min), B(t) = ∫₀ᵗ β(s) ds."""

  beta_min: float
  beta_max: float

  def _check_params(self):
    checks.check_positive("beta_min", self.beta_min)
    checks.check_positive("beta_max", self.beta_max)
    if not self.beta_max >= self.beta_min:
      raise ValueError(f"beta_max must be >= beta_min; got beta_min={self.beta_min}, "
                       f"beta_max={self.beta_max}.")
    checks.check_positive_int("N", self.N)

  def beta(self, t):
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def integrated_beta(self, t):
    """B(t) = β_min t + ½ (β_max − β_min) t²."""
    return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2

  def _integrated_beta_inverse(self, b):
    """Positive root t of ½ (β_max − β_min) t² + β_min t − b = 0 (stable for β_max → β_min)."""
    a = 0.5 * (self.beta_max - self.beta_min)
    return 2 * b / (self.beta_min + jnp.sqrt(self.beta_min ** 2 + 4 * a * b))

  def log_mean_coeff(self, t):
    return -0.5 * self.integrated_beta(t)

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape)

  def prior_logp(self, z):
    return _gaussian_logp(z, 1.0)


@_static_dataclass
class VPSDE(_VPFamily):
  """Variance-preserving SDE (continuous limit of DDPM):

      dx = −½ β(t) x dt + √β(t) dw,   β(t) = β_min + t (β_max − β_min),
      p_{0t} = N(e^{−B(t)/2} x(0), (1 − e^{−B(t)}) I),   B(t) = ∫₀ᵗ β.

  `discretize` gives the DDPM chain x_i = √(1 − β_i) x_{i-1} + √β_i z with β_i = linspace(β_min/N,
  β_max/N, N)."""

  beta_min: float = 0.1
  beta_max: float = 20.0
  N: int = 1000

  def __post_init__(self):
    self._check_params()

  @property
  def discrete_betas(self) -> Array:
    return jnp.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)

  @property
  def alphas(self) -> Array:
    return 1.0 - self.discrete_betas

  @property
  def alphas_cumprod(self) -> Array:
    return jnp.cumprod(self.alphas)

  @property
  def sqrt_alphas_cumprod(self) -> Array:
    return jnp.sqrt(self.alphas_cumprod)

  @property
  def sqrt_1m_alphas_cumprod(self) -> Array:
    return jnp.sqrt(1.0 - self.alphas_cumprod)

  def mean_coeff_and_std(self, t):
    t = jnp.asarray(t)
    lmc = self.log_mean_coeff(t)
    return jnp.exp(lmc), jnp.sqrt(-jnp.expm1(2 * lmc))

  def sde(self, x, t):
    self._check_batch(x, t)
    beta_t = self.beta(t)
    return -0.5 * batch_mul(beta_t, x), jnp.sqrt(beta_t)

  def marginal_prob(self, x, t):
    self._check_batch(x, t)
    coeff, std = self.mean_coeff_and_std(t)
    return batch_mul(coeff, x), std

  def timestep_index(self, t: Array) -> Array:
    return (t * (self.N - 1) / self.T).astype(jnp.int32)

  def discretize(self, x, t):
    """DDPM chain: f = (√(1 − β_i) − 1) x, G = √β_i."""
    self._check_batch(x, t)
    i = self.timestep_index(t)
    beta = self.discrete_betas[i]
    alpha = self.alphas[i]
    return batch_mul(jnp.sqrt(alpha), x) - x, jnp.sqrt(beta)

  def weight_integral(self, t):
    # g²/σ² = β(t) / (1 − e^{−B(t)}) = d/dt log(e^{B(t)} − 1).
    b = self.integrated_beta(jnp.asarray(t))
    return jnp.log(jnp.expm1(b))

  def weight_integral_inverse(self, v):
    # e^{B} − 1 = e^{v}  ⇒  B = softplus(v).
    return self._integrated_beta_inverse(jax.nn.softplus(v))


@_static_dataclass
class SubVPSDE(_VPFamily):
  """Sub-VP SDE (Song et al., 2021, Eq. 29):

      dx = −½ β(t) x dt + √(β(t) (1 − e^{−2B(t)})) dw,
      p_{0t} = N(e^{−B(t)/2} x(0), (1 − e^{−B(t)})² I).

  Its variance is bounded by the VP one at every t; `discretize` is Euler–Maruyama."""

  beta_min: float = 0.1
  beta_max: float = 20.0
  N: int = 1000

  def __post_init__(self):
    self._check_params()

  def mean_coeff_and_std(self, t):
    t = jnp.asarray(t)
    lmc = self.log_mean_coeff(t)
    return jnp.exp(lmc), -jnp.expm1(2 * lmc)

  def sde(self, x, t):
    self._check_batch(x, t)
    beta_t = self.beta(t)
    discount = -jnp.expm1(-2 * self.integrated_beta(t))
    return -0.5 * batch_mul(beta_t, x), jnp.sqrt(beta_t * discount)

  def marginal_prob(self, x, t):
    self._check_batch(x, t)
    coeff, std = self.mean_coeff_and_std(t)
    return batch_mul(coeff, x), std

  def weight_integral(self, t):
    # g²/σ² = β (1 + e^{−B}) / (1 − e^{−B}) = d/dt [2 log(e^{B} − 1) − B] = d/dt log(4 sinh²(B/2)).
    b = self.integrated_beta(jnp.asarray(t))
    return 2 * jnp.log(jnp.expm1(b)) - b

  def weight_integral_inverse(self, v):
    # 4 sinh²(B/2) = e^{v}  ⇒  B = 2 asinh(e^{v/2} / 2).
    return self._integrated_beta_inverse(2 * jnp.arcsinh(0.5 * jnp.exp(0.5 * v)))


SDES = {"vesde": VESDE, "vpsde": VPSDE, "subvpsde": SubVPSDE}


def check_sde(sde) -> None:
  """A clear error when `sde` is not one of this module's SDEs (the samplers and losses take any of them)."""
  if not isinstance(sde, SDE):
    raise ValueError(f"sde must be a VESDE, VPSDE or SubVPSDE instance; got {type(sde).__name__}.")


def get_sde(name: str, **kwargs) -> SDE:
  """Builds an SDE by name ('vesde', 'vpsde', 'subvpsde'; case-insensitive, 've'/'vp'/'subvp' too)."""
  key = checks.normalize_name(name)
  aliases = {"ve": "vesde", "vp": "vpsde", "subvp": "subvpsde", "sub_vp": "subvpsde",
             "sub_vpsde": "subvpsde"}
  key = aliases.get(key, key)
  checks.check_choice("sde", key, SDES)
  return SDES[key](**kwargs)


def sde_from_config(config) -> SDE:
  """The SDE selected by `config.training.sde` with its parameters from `config.model`
  (official field names: sigma_min, sigma_max, beta_min, beta_max, num_scales)."""
  name = checks.normalize_name(config.training.sde)
  m = config.model
  if name in ("vesde", "ve"):
    return VESDE(sigma_min=float(m.sigma_min), sigma_max=float(m.sigma_max), N=int(m.num_scales))
  if name in ("vpsde", "vp"):
    return VPSDE(beta_min=float(m.beta_min), beta_max=float(m.beta_max), N=int(m.num_scales))
  if name in ("subvpsde", "subvp"):
    return SubVPSDE(beta_min=float(m.beta_min), beta_max=float(m.beta_max), N=int(m.num_scales))
  checks.check_choice("training.sde", name, SDES)
  raise AssertionError("unreachable")

"""Low-dimensional toy data: Gaussian mixtures with exact densities and scores, and 2-D shapes.

A Gaussian mixture p₀ = Σ_k w_k N(μ_k, Σ_k) pushed through an SDE's Gaussian perturbation kernel
p_{0t}(x_t | x_0) = N(m(t) x_0, σ(t)² I) is again a Gaussian mixture,

    p_t = Σ_k w_k N(m(t) μ_k, m(t)² Σ_k + σ(t)² I),

so every perturbed marginal has an exact log-density and score:

    ∇ log p_t(x) = Σ_k r_k(x) C_k⁻¹ (m μ_k − x),   r_k = w_k N(x; m μ_k, C_k) / p_t(x),  C_k = m² Σ_k + σ² I.

These are the ground truth the tests compare samplers, the probability-flow ODE and the likelihood with.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from score_sde_jax import checks, config_defaults

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
  """Σ_k w_k N(μ_k, Σ_k) in D dimensions: weights [K], means [K, D], covs [K, D, D]."""

  weights: np.ndarray
  means: np.ndarray
  covs: np.ndarray
  name: str = "mixture"

  def __post_init__(self):
    w = np.asarray(self.weights, np.float64)
    mu = np.asarray(self.means, np.float64)
    cov = np.asarray(self.covs, np.float64)
    if mu.ndim != 2 or w.shape != (mu.shape[0],) or cov.shape != mu.shape + (mu.shape[1],):
      raise ValueError(f"GaussianMixture needs weights [K], means [K, D], covs [K, D, D]; got "
                       f"{w.shape}, {mu.shape}, {cov.shape}.")
    if np.any(w <= 0) or abs(w.sum() - 1) > 1e-6:
      raise ValueError(f"mixture weights must be positive and sum to 1; got {w}.")
    object.__setattr__(self, "weights", w / w.sum())
    object.__setattr__(self, "means", mu)
    object.__setattr__(self, "covs", cov)

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  @property
  def num_components(self) -> int:
    return self.means.shape[0]

  def sample(self, key: Array, n: int) -> Array:
    k1, k2 = jax.random.split(key)
    comp = jax.random.choice(k1, self.num_components, (n,), p=jnp.asarray(self.weights))
    chol = jnp.asarray(np.linalg.cholesky(self.covs), jnp.float32)
    z = jax.random.normal(k2, (n, self.dim))
    return jnp.asarray(self.means, jnp.float32)[comp] + jnp.einsum("nij,nj->ni", chol[comp], z)

  def sample_with_components(self, key: Array, n: int):
    k1, k2 = jax.random.split(key)
    comp = jax.random.choice(k1, self.num_components, (n,), p=jnp.asarray(self.weights))
    chol = jnp.asarray(np.linalg.cholesky(self.covs), jnp.float32)
    z = jax.random.normal(k2, (n, self.dim))
    return jnp.asarray(self.means, jnp.float32)[comp] + jnp.einsum("nij,nj->ni", chol[comp], z), comp

  # -- exact perturbed marginals ------------------------------------------------------------------
  def _perturbed_components(self, mean_coeff: Array, std: Array):
    """Per-example component means [B, K, D] and covariances [B, K, D, D] of p_t."""
    mu = jnp.asarray(self.means, jnp.float32)
    cov = jnp.asarray(self.covs, jnp.float32)
    eye = jnp.eye(self.dim, dtype=jnp.float32)
    m = mean_coeff[:, None, None]
    means = m * mu[None]
    covs = (mean_coeff ** 2)[:, None, None, None] * cov[None] + (std ** 2)[:, None, None, None] * eye
    return means, covs

  @property
  def isotropic_variances(self):
    """c_k when every Σ_k = c_k I (then a cheap elementwise path is used), else None."""
    d = self.dim
    c = self.covs[:, 0, 0]
    if np.allclose(self.covs, c[:, None, None] * np.eye(d)[None]):
      return c
    return None

  def _log_prob_and_score_isotropic(self, x, mean_coeff, std, c):
    mu = jnp.asarray(self.means, jnp.float32)                           # [K, D]
    var = mean_coeff[:, None] ** 2 * jnp.asarray(c, jnp.float32)[None] + std[:, None] ** 2  # [B, K]
    diff = x[:, None, :] - mean_coeff[:, None, None] * mu[None]           # [B, K, D]
    maha = jnp.sum(diff ** 2, axis=-1) / var
    log_comp = (jnp.log(jnp.asarray(self.weights, jnp.float32))[None]
                - 0.5 * (maha + self.dim * jnp.log(2 * math.pi * var)))
    logp = jax.scipy.special.logsumexp(log_comp, axis=1)
    resp = jax.nn.softmax(log_comp, axis=1)
    score = -jnp.sum((resp / var)[..., None] * diff, axis=1)
    return logp, score

  def _log_prob_and_score(self, x: Array, mean_coeff: Array, std: Array):
    c = self.isotropic_variances
    if c is not None:
      return self._log_prob_and_score_isotropic(x, mean_coeff, std, c)
    means, covs = self._perturbed_components(mean_coeff, std)
    chol = jnp.linalg.cholesky(covs)                                     # [B, K, D, D]
    diff = x[:, None, :] - means                                         # [B, K, D]
    sol = jax.scipy.linalg.solve_triangular(chol, diff[..., None], lower=True)[..., 0]
    maha = jnp.sum(sol ** 2, axis=-1)                                    # [B, K]
    logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    log_comp = (jnp.log(jnp.asarray(self.weights, jnp.float32))[None]
                - 0.5 * (maha + logdet + self.dim * math.log(2 * math.pi)))
    logp = jax.scipy.special.logsumexp(log_comp, axis=1)
    resp = jax.nn.softmax(log_comp, axis=1)                              # [B, K]
    prec_diff = jax.scipy.linalg.solve_triangular(
        jnp.swapaxes(chol, -1, -2), sol[..., None], lower=False)[..., 0]  # C⁻¹ (x − m μ)
    score = -jnp.sum(resp[..., None] * prec_diff, axis=1)
    return logp, score

  def log_prob(self, x: Array) -> Array:
    """log p₀(x) of the unperturbed mixture, [B]."""
    b = x.shape[0]
    return self._log_prob_and_score(x.reshape(b, -1), jnp.ones(b), jnp.zeros(b))[0]

  def score(self, x: Array) -> Array:
    b = x.shape[0]
    return self._log_prob_and_score(x.reshape(b, -1), jnp.ones(b), jnp.zeros(b))[1].reshape(x.shape)

  def perturbed_log_prob_fn(self, sde) -> Callable[[Array, Array], Array]:
    """(x, t) ↦ log p_t(x), the exact log-density of the marginal at time t under `sde`."""

    def log_prob(x, t):
      checks.check_x_t(x, t)
      m, s = sde.mean_coeff_and_std(t)
      return self._log_prob_and_score(x.reshape(x.shape[0], -1), m, s)[0]

    return log_prob

  def perturbed_score_fn(self, sde) -> Callable[[Array, Array], Array]:
    """(x, t) ↦ ∇ₓ log p_t(x), the exact score of the marginal at time t under `sde`."""

    def score_fn(x, t):
      checks.check_x_t(x, t)
      m, s = sde.mean_coeff_and_std(t)
      return self._log_prob_and_score(x.reshape(x.shape[0], -1), m, s)[1].reshape(x.shape)

    return score_fn


def _isotropic(means, std, weights=None) -> tuple:
  means = np.asarray(means, np.float64)
  k, d = means.shape
  weights = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, np.float64)
  covs = np.tile(np.eye(d) * std ** 2, (k, 1, 1))
  return weights, means, covs


def mixture1d(weights=(0.3, 0.7), std: float = 0.5) -> GaussianMixture:
  """The 1-D two-mode mixture at ±2 (unequal weights so that samplers must get them right)."""
  return GaussianMixture(*_isotropic([[-2.0], [2.0]], std, weights), name="mixture1d")


def ring8(radius: float = 2.0, std: float = 0.25) -> GaussianMixture:
  """Eight equally weighted isotropic Gaussians on a circle."""
  angles = 2 * np.pi * np.arange(8) / 8
  means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  return GaussianMixture(*_isotropic(means, std), name="ring8")


@dataclasses.dataclass(frozen=True)
class SampledToy:
  """A 2-D distribution known only through a sampler (no closed-form density)."""

  name: str
  sampler: Callable[[Array, int], Array]
  dim: int = 2

  def sample(self, key: Array, n: int) -> Array:
    return self.sampler(key, n)


def _checkerboard(key, n):
  """Uniform on the black squares of a 4×4 board over [−2, 2]²."""
  k1, k2, k3 = jax.random.split(key, 3)
  x1 = jax.random.uniform(k1, (n,), minval=-2, maxval=2)
  x2 = jax.random.uniform(k2, (n,), minval=0, maxval=1) - jax.random.randint(k3, (n,), 0, 2) * 2.0
  x2 = x2 + jnp.floor(x1) % 2
  return jnp.stack([x1, x2], axis=1) * 1.0


def _moons(key, n, noise=0.05):
  k1, k2, k3 = jax.random.split(key, 3)
  u = jax.random.uniform(k1, (n,)) * jnp.pi
  upper = jax.random.bernoulli(k2, 0.5, (n,))
  x = jnp.where(upper, jnp.cos(u), 1 - jnp.cos(u))
  y = jnp.where(upper, jnp.sin(u), 0.5 - jnp.sin(u))
  pts = jnp.stack([x - 0.5, y - 0.25], axis=1) * 2.0
  return pts + noise * 2.0 * jax.random.normal(k3, (n, 2))


def _swissroll(key, n, noise=0.25):
  k1, k2 = jax.random.split(key)
  u = 1.5 * jnp.pi * (1 + 2 * jax.random.uniform(k1, (n,)))
  pts = jnp.stack([u * jnp.cos(u), u * jnp.sin(u)], axis=1)
  pts = pts + noise * jax.random.normal(k2, (n, 2))
  return pts / 5.0


_TOY = {
    "mixture1d": mixture1d,
    "ring8": ring8,
    "checkerboard": lambda: SampledToy("checkerboard", _checkerboard),
    "moons": lambda: SampledToy("moons", _moons),
    "swissroll": lambda: SampledToy("swissroll", _swissroll),
}

if tuple(_TOY) != config_defaults.TOY_DATASETS:   # the names live in the config defaults
  raise ImportError(f"datasets/toy.py builds {tuple(_TOY)} but config_defaults.TOY_DATASETS names "
                    f"{config_defaults.TOY_DATASETS}")


def get_toy_dataset(name: str):
  """A toy distribution by name: 'mixture1d', 'ring8' (exact mixtures), 'checkerboard', 'moons',
  'swissroll' (sample-only)."""
  key = checks.check_choice("data.dataset", name, _TOY)
  return _TOY[key]()

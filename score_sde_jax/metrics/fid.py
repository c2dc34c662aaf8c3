"""Sample-quality metrics on classifier features: FID, KID, Inception Score; statistics files; a streaming
feature accumulator.

Everything here is numpy in float64 (features arrive as float32 from the network; the moments, the
matrix square root and the kernel sums are where precision matters, and JAX's float64 would need the
global `jax_enable_x64` switch, which would change the rest of the program).

- `frechet_distance(mu1, sigma1, mu2, sigma2)`: FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2).
  The trace of the matrix square root is computed in the symmetric form
  tr((S1 S2)^1/2) = sum_i sqrt(lambda_i(S1^1/2 S2 S1^1/2)), with S1^1/2 from `eigh` of S1 (eigenvalues
  clipped at 0) and the eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2 from `eigvalsh` (clipped at
  0).  S1 S2 is similar to S1^1/2 S2 S1^1/2, so their eigenvalues, and the traces of the principal square
  roots, agree.  Why not `scipy.linalg.sqrtm(S1 @ S2)` as pytorch-fid does: S1 S2 is not symmetric,
  its Schur-based square root can come back complex or inaccurate when the covariances are singular (any
  covariance from fewer samples than dimensions, e.g. 2048-d features of < 2049 images), which pytorch-fid
  patches by adding eps * I; the symmetric eigenvalue route uses only backward-stable symmetric
  eigensolvers, is real by construction, and handles singular (PSD) covariances as they are.
- `kernel_inception_distance(x, y)`: KID (Binkowski et al. 2018) = unbiased MMD^2 with the cubic polynomial
  kernel k(a, b) = (a.b / d + 1)^3, averaged over random subsets (default 100 subsets of 1000, each drawn
  without replacement, as tf-gan and clean-fid), returned as (mean, std over subsets).
- `inception_score(logits=... | probs=...)`: IS = exp(E_x KL(p(y|x) || p(y))), over `splits` contiguous
  equal parts (default 10, the remainder dropped, as the original code of Salimans et al.), returned as
  (mean, std).  With the FID Inception the logits have 1008 entries (1000 ImageNet classes, a background
  class and 7 unused ones); the softmax here is over all of them, as the original IS code (the same 2015
  TF graph) and tfgan's `classifier_score_from_logits` used by the official score_sde evaluation.  (That
  evaluation reports splits=1: one score over all 50k samples.)
- `FeatureStats`: running mean and covariance in float64 (Chan et al.'s pairwise update of the mean and
  the centred sum of squares, so there is no E[x x^T] - mu mu^T cancellation), `merge` for shards, and
  optionally a uniform reservoir of `keep` features for KID; 50k samples never sit in memory together.
- Statistics files: `save_stats`/`load_stats` read and write pytorch-fid's `.npz` (`mu`, `sigma`);
  `load_stats` and `load_official_features` also read the official score_sde format (`pool_3`: the raw
  (N, 2048) features, and `logits` (N, 1008) when present; e.g. `assets/stats/cifar10_stats.npz`, or the
  `statistics_*.npz` that its evaluation writes per sampling round).
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Optional, Tuple, Union

import numpy as np

__all__ = [
    "frechet_distance", "fid_from_features", "fid_from_stats", "mmd2_unbiased", "kernel_inception_distance",
    "inception_score", "FeatureStats", "save_stats", "load_stats", "load_official_features", "stats_from_files",
]


def _matrix(a, name: str, d: Optional[int] = None) -> np.ndarray:
  a = np.asarray(a, np.float64)
  if a.ndim != 2 or a.shape[0] != a.shape[1] or (d is not None and a.shape[0] != d):
    raise ValueError(f"{name} must be a square ({d or 'd'}, {d or 'd'}) covariance, got shape {a.shape}")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} has non-finite entries")
  return a


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  """Symmetric PSD square root via `eigh` (of the symmetrised matrix; eigenvalues clipped at 0)."""
  w, v = np.linalg.eigh((s + s.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> float:
  """tr((sigma1 sigma2)^1/2) for PSD covariances, as sum sqrt(eig(sigma1^1/2 sigma2 sigma1^1/2))."""
  s1 = _psd_sqrt(np.asarray(sigma1, np.float64))
  m = s1 @ np.asarray(sigma2, np.float64) @ s1
  return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 (see the module docstring)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  if mu1.ndim != 1 or mu1.shape != mu2.shape:
    raise ValueError(f"means must be vectors of one length, got shapes {mu1.shape} and {mu2.shape}")
  if not (np.all(np.isfinite(mu1)) and np.all(np.isfinite(mu2))):
    raise ValueError("the means have non-finite entries")
  d = mu1.shape[0]
  sigma1, sigma2 = _matrix(sigma1, "sigma1", d), _matrix(sigma2, "sigma2", d)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def _features(x, name: str, dtype=np.float64) -> np.ndarray:
  x = np.asarray(x, dtype)
  if x.ndim != 2:
    raise ValueError(f"{name} must be (N, d) features, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} has non-finite entries")
  return x


def fid_from_features(x, y) -> float:
  """FID between two (N, d) feature sets (means and ddof=1 covariances, as pytorch-fid and tf-gan)."""
  return fid_from_stats(FeatureStats.from_features(x), FeatureStats.from_features(y))


def fid_from_stats(a: Union["FeatureStats", Tuple], b: Union["FeatureStats", Tuple]) -> float:
  """FID between two `FeatureStats` or (mu, sigma) pairs (e.g. from `load_stats`)."""
  def moments(s):
    return (s.mean, s.cov) if isinstance(s, FeatureStats) else s
  return frechet_distance(*moments(a), *moments(b))


# ---------------------------------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------------------------------
def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
  """Unbiased MMD^2 of the sets x (m, d) and y (n, d) with k(a, b) = (a.b / d + 1)^3:
  mean of k over distinct pairs within x, plus the same within y, minus twice the mean over x-y pairs."""
  x, y = _features(x, "x"), _features(y, "y")
  m, n = x.shape[0], y.shape[0]
  if x.shape[1] != y.shape[1] or m < 2 or n < 2:
    raise ValueError(f"need >= 2 samples of one dimension in each set, got {x.shape} and {y.shape}")
  kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
  return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
               - 2.0 * kxy.mean())


def kernel_inception_distance(x, y, *, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> Tuple[float, float]:
  """KID: (mean, std) of `mmd2_unbiased` over `num_subsets` random subsets of `min(subset_size, len(x),
  len(y))` features of each set (each subset without replacement, subsets drawn independently).

  Every subset estimate is unbiased, so the mean is too; `std` (ddof=0, as clean-fid) is the spread of one
  subset estimate, an upper bound on the standard error of the mean (the subsets overlap).  The sets keep
  their dtype (50k x 2048 float32 features stay 400 MB); each subset is computed in float64."""
  x, y = _features(x, "x", dtype=None), _features(y, "y", dtype=None)
  m = min(subset_size, x.shape[0], y.shape[0])
  if num_subsets < 1 or m < 2:
    raise ValueError(f"need num_subsets >= 1 and >= 2 features per set, got {num_subsets} and {m}")
  rng = np.random.default_rng(seed)
  values = np.array([mmd2_unbiased(x[rng.choice(x.shape[0], m, replace=False)],
                                   y[rng.choice(y.shape[0], m, replace=False)]) for _ in range(num_subsets)])
  return float(values.mean()), float(values.std())


# ---------------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------------
def inception_score(logits=None, *, probs=None, splits: int = 10) -> Tuple[float, float]:
  """IS (mean, std over `splits` contiguous parts of len // splits samples each) from (N, C) `logits`
  (softmax over all C, in float64) or class probabilities `probs` (rows summing to 1).  Per part:
  exp(mean_i sum_c p_ic (log p_ic - log pbar_c)), pbar the part's mean prediction, 0 log 0 = 0."""
  if (logits is None) == (probs is None):
    raise ValueError("give exactly one of logits or probs")
  if logits is not None:
    z = _features(logits, "logits")
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(logp)
  else:
    p = _features(probs, "probs")
    if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
      raise ValueError("probs must be non-negative rows summing to 1")
    p = p / p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
      logp = np.log(p)
  n = p.shape[0] // splits
  if splits < 1 or n < 1:
    raise ValueError(f"need at least `splits` ({splits}) samples, got {p.shape[0]}")
  scores = []
  for k in range(splits):
    pk, logpk = p[k * n:(k + 1) * n], logp[k * n:(k + 1) * n]
    pbar = pk.mean(axis=0)
    with np.errstate(divide="ignore"):
      log_pbar = np.log(pbar)
    # p > 0 implies pbar > 0; where p == 0 the term is 0 (xlogy convention).
    kl = (pk * np.where(pk > 0, logpk - log_pbar, 0.0)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------------
# Streaming statistics
# ---------------------------------------------------------------------------------------------------
_CHUNK = 4096


class FeatureStats:
  """Running mean and covariance (ddof=1) of feature vectors, in float64, batch by batch.

  Each `update(features)` folds one (N, d) batch in with Chan et al.'s pairwise formulas: with the batch's
  own mean m_b and centred sum of squares M_b, n = n_a + n_b, delta = m_b - m_a,
  mean = m_a + delta n_b / n, M = M_a + M_b + delta delta^T n_a n_b / n; cov = M / (n - 1).  `merge`
  applies the same to another accumulator (shards of one set, e.g. per host).

  `keep > 0` also keeps a uniform random sample of `keep` of the features seen (reservoir sampling,
  float32) for `kernel_inception_distance`; merged reservoirs stay uniform over the union.
  """

  def __init__(self, dim: Optional[int] = None, *, keep: int = 0, seed: int = 0):
    self.dim = dim
    self.n = 0
    self._mean = None if dim is None else np.zeros(dim)
    self._m2 = None if dim is None else np.zeros((dim, dim))
    if keep < 0:
      raise ValueError(f"keep must be >= 0, got {keep}")
    self.keep = int(keep)
    self._rng = np.random.default_rng(seed)
    self.kept = None if dim is None else np.zeros((0, dim), np.float32)

  def _init(self, d: int):
    if self.dim is None:
      self.dim = d
      self._mean, self._m2 = np.zeros(d), np.zeros((d, d))
      self.kept = np.zeros((0, d), np.float32)
    elif d != self.dim:
      raise ValueError(f"FeatureStats of dimension {self.dim} got features of dimension {d}")

  def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray):
    n = self.n + n_b
    delta = mean_b - self._mean
    self._mean = self._mean + delta * (n_b / n)
    self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.n * n_b / n)
    self.n = n

  def update(self, features) -> "FeatureStats":
    """Adds a (N, d) batch (numpy or jax array), in float64 chunks of at most 4096 rows (so a large float32
    array is never copied to float64 whole)."""
    x = np.asarray(features)
    if x.ndim != 2:
      raise ValueError(f"features must be (N, d), got shape {x.shape}")
    self._init(x.shape[1])
    for start in range(0, x.shape[0], _CHUNK):
      self._update_chunk(_features(x[start:start + _CHUNK], "features"))
    return self

  def _update_chunk(self, x: np.ndarray):
    mean_b = x.mean(axis=0)
    xc = x - mean_b
    n_before = self.n
    self._combine(x.shape[0], mean_b, xc.T @ xc)
    if self.keep:
      self._reservoir(x.astype(np.float32), n_before)

  def _reservoir(self, x: np.ndarray, n_before: int):
    room = max(0, min(self.keep - self.kept.shape[0], x.shape[0]))
    if room:
      self.kept = np.concatenate([self.kept, x[:room]])
    # Algorithm R: the t-th feature (0-based) replaces a random slot with probability keep / (t + 1).
    for i in range(room, x.shape[0]):
      j = self._rng.integers(0, n_before + i + 1)
      if j < self.keep:
        self.kept[j] = x[i]

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """Folds `other` (features of the same set seen elsewhere) into this accumulator."""
    if other.n == 0:
      return self
    self._init(other.dim)
    n_self = self.n
    if self.keep:
      if len(other.kept) < min(self.keep, other.n):
        raise ValueError(f"cannot merge: this FeatureStats keeps {self.keep} features, the other kept only "
                         f"{len(other.kept)} of its {other.n} (give both the same `keep`)")
      self.kept = self._merge_reservoirs(n_self, other)
    self._combine(other.n, other._mean, other._m2)
    return self

  def _merge_reservoirs(self, n_self: int, other: "FeatureStats") -> np.ndarray:
    # A uniform k-subset of the union: how many come from each side is hypergeometric; a uniform subset
    # of a uniform reservoir is uniform.
    k = min(self.keep, n_self + other.n)
    from_self = int(self._rng.hypergeometric(n_self, other.n, k)) if n_self else 0
    from_other = k - from_self
    a = self.kept[self._rng.choice(len(self.kept), from_self, replace=False)]
    b = other.kept[self._rng.choice(len(other.kept), from_other, replace=False)]
    return np.concatenate([a, b]).astype(np.float32)

  @classmethod
  def from_features(cls, features, **kwargs) -> "FeatureStats":
    return cls(**kwargs).update(features)

  @property
  def mean(self) -> np.ndarray:
    if self.n == 0:
      raise ValueError("FeatureStats has seen no features")
    return self._mean.copy()

  @property
  def cov(self) -> np.ndarray:
    """Sample covariance (ddof=1, as np.cov, pytorch-fid and tf-gan)."""
    if self.n < 2:
      raise ValueError(f"a covariance needs >= 2 features, FeatureStats has seen {self.n}")
    m2 = self._m2 / (self.n - 1)
    return (m2 + m2.T) / 2

  def save(self, path) -> None:
    """pytorch-fid's statistics file (`mu`, `sigma`)."""
    save_stats(path, self.mean, self.cov)


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------
def save_stats(path, mu, sigma) -> None:
  """Writes pytorch-fid's statistics `.npz` (`mu` (d,), `sigma` (d, d)), as `np.savez_compressed`."""
  mu = np.asarray(mu, np.float64)
  sigma = _matrix(sigma, "sigma", mu.shape[0] if mu.ndim == 1 else None)
  with open(os.fspath(path), "wb") as f:  # an open file: savez would otherwise append '.npz' to the name
    np.savez_compressed(f, mu=mu, sigma=sigma)


def _open_npz(path):
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such statistics file")
  try:
    return np.load(path, allow_pickle=False)
  except Exception as e:  # not an npz / corrupt
    raise ValueError(f"{path}: not a readable .npz statistics file: {e}") from e


def load_official_features(path) -> Dict[str, np.ndarray]:
  """The official score_sde statistics file: {"pool_3": (N, 2048)} and "logits" (N, 1008) when present."""
  with _open_npz(path) as z:
    if "pool_3" not in z.files:
      raise ValueError(f"{path}: no 'pool_3' array (keys: {sorted(z.files)}); not an official score_sde "
                       "statistics file")
    out = {k: np.asarray(z[k]) for k in ("pool_3", "logits") if k in z.files}
  if out["pool_3"].ndim != 2:
    raise ValueError(f"{path}: 'pool_3' must be (N, d), got shape {out['pool_3'].shape}")
  return out


def load_stats(path) -> Tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) in float64 from pytorch-fid's `.npz` (`mu`, `sigma`) or the official score_sde format
  (`pool_3` features: their mean and ddof=1 covariance)."""
  with _open_npz(path) as z:
    files = set(z.files)
    if {"mu", "sigma"} <= files:
      mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
      if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
      return mu, sigma
  if "pool_3" in files:
    stats = FeatureStats.from_features(load_official_features(path)["pool_3"])
    return stats.mean, stats.cov
  raise ValueError(f"{path}: neither pytorch-fid statistics ('mu', 'sigma') nor official score_sde "
                   f"features ('pool_3'); keys: {sorted(files)}")


def stats_from_files(paths: Iterable, *, keep: int = 0) -> FeatureStats:
  """A `FeatureStats` over the `pool_3` features of several official-format files (e.g. the
  `statistics_*.npz` of each sampling round), read one at a time."""
  stats = FeatureStats(keep=keep)
  for p in paths:
    stats.update(load_official_features(p)["pool_3"])
  return stats

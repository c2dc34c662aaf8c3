"""FID, KID, Inception Score and the statistics helpers (`score_sde_jax.metrics.fid`) against closed forms.

Inputs are fresh random draws each run; every tolerance says where it comes from.  Rounding tolerances are
float64 (~1e-16 relative per operation, a few hundred operations).  Sampling tolerances are 4 standard
errors, or a bound that holds for every draw.
"""
import numpy as np
import pytest
import scipy.linalg

from score_sde_jax.metrics import fid as M


def _spd(rng, d, scale=1.0):
  a = rng.standard_normal((d, 2 * d))
  return scale * (a @ a.T) / (2 * d) + 0.1 * np.eye(d)


# --- FID ---------------------------------------------------------------------------------------------

def test_fid_diagonal_covariances_closed_form():
  """Commuting (diagonal) covariances: tr(S1 + S2 - 2 (S1 S2)^1/2) = sum_i (sqrt a_i - sqrt b_i)^2."""
  rng = np.random.default_rng()
  d = 32
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_fid_2x2_non_commuting_closed_form():
  """2x2: the eigenvalues l1, l2 of S1 S2 are positive, so tr (S1 S2)^1/2 = sqrt(l1) + sqrt(l2)
  = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)); no matrix square root involved."""
  rng = np.random.default_rng()
  for _ in range(5):
    s1, s2 = _spd(rng, 2), _spd(rng, 2)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = rng.standard_normal(2), rng.standard_normal(2)
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_fid_non_commuting_matches_scipy_sqrtm():
  """d = 64, well-conditioned non-commuting covariances: the symmetric-eigenvalue route equals
  tr sqrtm(S1^1/2 S2 S1^1/2) and pytorch-fid's tr sqrtm(S1 S2) (Schur method) to 1e-9 relative."""
  rng = np.random.default_rng()
  d = 64
  s1, s2 = _spd(rng, d), _spd(rng, d, scale=2.0)
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  r1 = scipy.linalg.sqrtm(s1).real
  sym = np.trace(scipy.linalg.sqrtm(r1 @ s2 @ r1).real)
  pfid = np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
  base = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
  got = M.frechet_distance(mu1, s1, mu2, s2)
  for tr_sqrt in (sym, pfid):
    assert got == pytest.approx(base - 2 * tr_sqrt, rel=1e-9)
  assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(M.frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_fid_singular_covariance():
  """Covariances of fewer samples than dimensions (rank 20 in 64-d) are handled as they are: FID of a
  Gaussian with itself is 0 up to the clipped roundoff eigenvalues (each ~1e-8 lambda_max after the square
  root; 64 of them: bound 1e-6 tr S), and the result agrees with a full-rank perturbation's limit."""
  rng = np.random.default_rng()
  x = rng.standard_normal((21, 64))
  s = np.cov(x, rowvar=False)
  mu = rng.standard_normal(64)
  assert np.linalg.matrix_rank(s) == 20
  assert abs(M.frechet_distance(mu, s, mu, s)) <= 1e-6 * np.trace(s)
  s2 = np.cov(rng.standard_normal((21, 64)), rowvar=False)
  eps = 1e-9
  near = M.frechet_distance(mu, s + eps * np.eye(64), mu, s2 + eps * np.eye(64))
  # Perturbing by eps I moves tr S by 64 eps each and the root term by at most ~64 sqrt(eps) lambda^1/2.
  assert M.frechet_distance(mu, s, mu, s2) == pytest.approx(near, abs=64 * np.sqrt(eps) * 10)


def test_fid_from_samples_converges_to_closed_form():
  """sqrt(FID) is the 2-Wasserstein distance between Gaussians, a metric, so for every draw
  |sqrt(FID_hat) - sqrt(FID)| <= sqrt(FID(hat1, true1)) + sqrt(FID(hat2, true2)) =: e (checked exactly).
  A priori, for N samples E FID(hat, true) ~ (tr S + lambda_max(S) d(d+1)/4) / N (mean error tr S / N;
  covariance error |E|_F^2 / 4 with |E|_F^2 ~ d(d+1) lambda_max^2 / N); with a 3x margin on e that gives
  |FID_hat - FID| <= e (2 sqrt(FID) + e), which shrinks like N^-1/2."""
  rng = np.random.default_rng()
  d = 8
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  s1, s2 = _spd(rng, d), _spd(rng, d, scale=2.0)
  true = M.frechet_distance(mu1, s1, mu2, s2)
  for n in (2000, 32000):
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    est = M.fid_from_features(x, y)
    h1, h2 = M.FeatureStats.from_features(x), M.FeatureStats.from_features(y)
    e_draw = np.sqrt(M.fid_from_stats(h1, (mu1, s1))) + np.sqrt(M.fid_from_stats(h2, (mu2, s2)))
    assert abs(np.sqrt(est) - np.sqrt(true)) <= e_draw + 1e-12
    e = 3 * sum(np.sqrt((np.trace(s) + np.linalg.eigvalsh(s)[-1] * d * (d + 1) / 4) / n) for s in (s1, s2))
    assert abs(est - true) <= e * (2 * np.sqrt(true) + e), (n, est, true, e)
  assert true > 1.0


def test_fid_rejects_bad_shapes():
  with pytest.raises(ValueError, match="sigma2"):
    M.frechet_distance(np.ones(3), np.eye(3), np.ones(3), np.eye(4))
  with pytest.raises(ValueError, match="non-finite"):
    M.frechet_distance(np.ones(2), np.eye(2), np.array([1.0, np.nan]), np.eye(2))


# --- KID ---------------------------------------------------------------------------------------------

def _expected_poly_kernel(a, b, d):
  """E (x.y / d + 1)^3 for independent x ~ N(a, I), y ~ N(b, I): with s = x.y, c = a.b,
  E s = c, E s^2 = c^2 + |a|^2 + |b|^2 + d, E s^3 = c^3 + 3 c (|a|^2 + |b|^2 + d + 2)."""
  c, aa, bb = a @ b, a @ a, b @ b
  es, es2, es3 = c, c ** 2 + aa + bb + d, c ** 3 + 3 * c * (aa + bb + d + 2)
  return 1 + 3 * es / d + 3 * es2 / d ** 2 + es3 / d ** 3


def _mmd2_population(a, b, d):
  return (_expected_poly_kernel(a, a, d) + _expected_poly_kernel(b, b, d)
          - 2 * _expected_poly_kernel(a, b, d))


def test_mmd2_unbiased_is_the_pairwise_formula():
  rng = np.random.default_rng()
  x, y = rng.standard_normal((7, 3)), rng.standard_normal((9, 3)) + 0.3
  k = lambda u, v: (u @ v / 3 + 1) ** 3
  xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
  yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
  xy = sum(k(x[i], y[j]) for i in range(7) for j in range(9)) / (7 * 9)
  assert M.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_mmd2_unbiased_mean_matches_population_value(shift):
  """Independent draws of the unbiased estimator average to the population MMD^2 (closed form above): within
  4 standard errors of the mean of 200 draws.  Identical distributions: population value 0; shifted by 0.3
  per dimension: > 0 and > 10 standard errors away from 0."""
  rng = np.random.default_rng()
  d, n, reps = 8, 100, 200
  a, b = rng.standard_normal(d) * 0.5, None
  b = a + shift
  values = np.array([M.mmd2_unbiased(rng.standard_normal((n, d)) + a, rng.standard_normal((n, d)) + b)
                     for _ in range(reps)])
  se = values.std(ddof=1) / np.sqrt(reps)
  expected = _mmd2_population(a, b, d)
  assert abs(values.mean() - expected) <= 4 * se, (values.mean(), expected, se)
  if shift:
    assert expected > 10 * se
  else:
    assert expected == pytest.approx(0.0, abs=1e-12)


def test_kid_identical_and_shifted_sets():
  """KID's mean over subsets is unbiased; the std of one subset estimate bounds the standard error of that
  mean (the subsets overlap), so identical distributions give |mean| <= 4 std, and a shift of 0.3 per
  dimension gives the population value within 4 std and a mean clearly above 0."""
  rng = np.random.default_rng()
  d, n = 8, 2000
  a = 0.5 * rng.standard_normal(d)
  x = rng.standard_normal((n, d)) + a
  same = rng.standard_normal((n, d)) + a
  shifted = rng.standard_normal((n, d)) + a + 0.3
  mean, std = M.kernel_inception_distance(x, same, num_subsets=50, subset_size=500, seed=1)
  assert std > 0 and abs(mean) <= 4 * std
  mean_s, std_s = M.kernel_inception_distance(x, shifted, num_subsets=50, subset_size=500, seed=1)
  assert abs(mean_s - _mmd2_population(a, a + 0.3, d)) <= 4 * std_s
  assert mean_s > 4 * std_s and mean_s > 10 * abs(mean)
  # subset_size larger than the sets: subsets are whole sets (permuted), every estimate the same.
  m_all, s_all = M.kernel_inception_distance(x[:50], same[:50], num_subsets=3, subset_size=1000)
  assert m_all == pytest.approx(M.mmd2_unbiased(x[:50], same[:50]), rel=1e-9, abs=1e-12)
  assert s_all <= 1e-9 * abs(m_all) + 1e-12


# --- Inception Score -----------------------------------------------------------------------------------

def _reference_is(p, splits):
  """The original Inception Score code (Salimans et al. 2016), in numpy."""
  scores = []
  n = p.shape[0] // splits
  for k in range(splits):
    part = p[k * n:(k + 1) * n]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return np.mean(scores), np.std(scores)


def test_inception_score_uniform_is_one():
  rng = np.random.default_rng()
  logits = np.repeat(rng.standard_normal((200, 1)), 1008, axis=1)  # each row constant: uniform softmax
  mean, std = M.inception_score(logits)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
  mean, std = M.inception_score(probs=np.full((50, 7), 1 / 7), splits=5)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_diverse_is_number_of_classes():
  """One-hot predictions with every class equally often in each split: KL = log C per sample, IS = C.
  From logits with a margin of 60 the softmax is one-hot to exp(-60) ~ 1e-26."""
  rng = np.random.default_rng()
  c, splits = 13, 10
  labels = np.concatenate([rng.permutation(np.repeat(np.arange(c), 3)) for _ in range(splits)])
  probs = np.eye(c)[labels]
  mean, std = M.inception_score(probs=probs, splits=splits)
  assert mean == pytest.approx(c, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
  logits = rng.standard_normal(probs.shape) + 60.0 * probs
  assert M.inception_score(logits, splits=splits)[0] == pytest.approx(c, rel=1e-9)


def test_inception_score_matches_original_code():
  """Random softmax predictions, 1008 classes, N not a multiple of the splits (remainder dropped): equal to
  the original code to float64 rounding; logits and their probabilities give the same score."""
  rng = np.random.default_rng()
  logits = 3 * rng.standard_normal((1003, 1008))
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  ref = _reference_is(p, 10)
  assert M.inception_score(logits) == pytest.approx(ref, rel=1e-10)
  assert M.inception_score(probs=p) == pytest.approx(ref, rel=1e-10)
  assert M.inception_score(logits, splits=1)[1] == 0.0
  with pytest.raises(ValueError, match="exactly one"):
    M.inception_score()
  with pytest.raises(ValueError, match="summing to 1"):
    M.inception_score(probs=p * 2)


# --- streaming statistics ------------------------------------------------------------------------------

def test_feature_stats_equals_batch_np_cov():
  """Batches of uneven sizes (one of a single row), features offset by 1e4: mean and covariance equal
  np.mean / np.cov (which centre the whole array first) to 1e-9 relative; a naive E[xx^T] - mu mu^T in
  float64 would lose ~(1e4)^2 * 1e-16 / var ~ 1e-8 of the variance per op and fail visibly worse."""
  rng = np.random.default_rng()
  d = 16
  x = rng.standard_normal((1000, d)) @ rng.standard_normal((d, d)) + 1e4
  stats = M.FeatureStats()
  for chunk in np.split(x, [1, 300, 301, 777]):
    stats.update(chunk.astype(np.float64))
  assert stats.n == 1000 and stats.dim == d
  np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
  ref = np.cov(x, rowvar=False)
  np.testing.assert_allclose(stats.cov, ref, rtol=0, atol=1e-9 * np.abs(ref).max())
  # float32 (jax-like) inputs are accepted and accumulated in float64; one large batch is folded in chunks
  big = rng.standard_normal((10001, 4)).astype(np.float32) * 2 + 3
  s32 = M.FeatureStats().update(big)
  assert s32.cov.dtype == np.float64 and s32.n == 10001
  np.testing.assert_allclose(s32.cov, np.cov(big.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError, match="non-finite"):
    M.FeatureStats().update(np.array([[1.0, np.inf]]))


def test_feature_stats_merge_equals_whole():
  rng = np.random.default_rng()
  x = rng.standard_normal((500, 6)) * 3 + rng.standard_normal(6)
  shards = [M.FeatureStats().update(p) for p in np.split(x, [123, 124, 400])]
  merged = M.FeatureStats()
  for s in shards:
    merged.merge(s)
  merged.merge(M.FeatureStats())  # empty: no-op
  np.testing.assert_allclose(merged.mean, x.mean(0), rtol=1e-12, atol=1e-13)
  np.testing.assert_allclose(merged.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError, match="dimension"):
    merged.update(np.ones((2, 7)))
  with pytest.raises(ValueError, match="seen no"):
    _ = M.FeatureStats().mean


def test_feature_stats_reservoir_is_uniform():
  """keep=10 of 50 items fed in batches (and, half the time, via merging two shards): each item is kept with
  probability 1/5; over 2000 runs each count is Binomial(2000, 0.2) (mean 400, sd 17.9): within 5 sd."""
  rng = np.random.default_rng()
  n, keep, reps = 50, 10, 2000
  counts = np.zeros(n)
  items = np.arange(n, dtype=np.float64)[:, None] * np.ones((1, 2))
  for r in range(reps):
    seed = int(rng.integers(2**31))
    if r % 2:
      a = M.FeatureStats(keep=keep, seed=seed).update(items[:7]).update(items[7:30])
      b = M.FeatureStats(keep=keep, seed=seed + 1).update(items[30:])
      s = a.merge(b)
    else:
      s = M.FeatureStats(keep=keep, seed=seed).update(items[:3]).update(items[3:])
    assert s.kept.shape == (keep, 2) and len(np.unique(s.kept[:, 0])) == keep
    counts[s.kept[:, 0].astype(int)] += 1
  assert np.all(np.abs(counts - reps * keep / n) <= 5 * np.sqrt(reps * 0.2 * 0.8)), counts


# --- files ---------------------------------------------------------------------------------------------

def test_stats_npz_round_trip_and_pytorch_fid_format(tmp_path):
  rng = np.random.default_rng()
  x = rng.standard_normal((300, 5))
  stats = M.FeatureStats.from_features(x)
  path = tmp_path / "stats.npz"
  stats.save(path)
  mu, sigma = M.load_stats(path)
  np.testing.assert_array_equal(mu, stats.mean)
  np.testing.assert_array_equal(sigma, stats.cov)
  with np.load(path) as z:
    assert sorted(z.files) == ["mu", "sigma"]
  # a file as pytorch-fid writes it (`np.savez_compressed(path, mu=mu, sigma=sigma)`, float32 or float64)
  pf = tmp_path / "pytorch_fid.npz"
  np.savez_compressed(pf, mu=x.mean(0).astype(np.float32), sigma=np.cov(x, rowvar=False).astype(np.float32))
  mu2, sigma2 = M.load_stats(pf)
  assert mu2.dtype == np.float64
  assert M.fid_from_stats((mu, sigma), (mu2, sigma2)) == pytest.approx(0.0, abs=1e-5)
  # save_stats writes exactly the given path (np.savez would append '.npz' to other names)
  other = tmp_path / "stats.bin"
  M.save_stats(other, mu, sigma)
  assert other.exists()


def test_official_score_sde_stats_format(tmp_path):
  """The official files: `np.savez_compressed(f, pool_3=..., logits=...)` (per-round statistics) or pool_3
  only (dataset statistics, e.g. cifar10_stats.npz)."""
  rng = np.random.default_rng()
  pools = [rng.random((40, 12)).astype(np.float32) for _ in range(3)]
  logits = [rng.standard_normal((40, 1008)).astype(np.float32) for _ in range(3)]
  paths = []
  for i, (p, lg) in enumerate(zip(pools, logits)):
    paths.append(str(tmp_path / f"statistics_{i}.npz"))
    with open(paths[-1], "wb") as f:
      np.savez_compressed(f, pool_3=p, logits=lg)
  data = tmp_path / "cifar10_stats.npz"
  with open(data, "wb") as f:
    np.savez_compressed(f, pool_3=pools[0])
  feats = M.load_official_features(paths[1])
  np.testing.assert_array_equal(feats["pool_3"], pools[1])
  np.testing.assert_array_equal(feats["logits"], logits[1])
  assert set(M.load_official_features(data)) == {"pool_3"}
  mu, sigma = M.load_stats(data)
  np.testing.assert_allclose(mu, pools[0].astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(pools[0].astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-14)
  all_pools = np.concatenate(pools).astype(np.float64)
  streamed = M.stats_from_files(paths)
  assert streamed.n == 120
  np.testing.assert_allclose(streamed.cov, np.cov(all_pools, rowvar=False), rtol=1e-9, atol=1e-14)
  with pytest.raises(ValueError, match="neither"):
    bad = tmp_path / "bad.npz"
    np.savez(bad, samples=np.ones(3))
    M.load_stats(bad)
  with pytest.raises(FileNotFoundError):
    M.load_stats(tmp_path / "missing.npz")
  with pytest.raises(ValueError, match="not a readable"):
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    M.load_stats(tmp_path / "junk.npz")

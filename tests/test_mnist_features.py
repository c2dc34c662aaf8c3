"""The FID-MNIST feature network (`score_sde_jax.metrics.mnist_features`): shapes, modes and use with the
FID statistics.  It is untrained here, so only structure is tested, not values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde_jax.metrics import fid, mnist_features as mf


def test_shapes_and_inference_is_deterministic():
  rng = np.random.default_rng()
  variables = mf.init_mnist_classifier(jax.random.PRNGKey(int(rng.integers(2**31))))
  assert set(variables) == {"params"}
  images = jnp.asarray(rng.random((5, 28, 28, 1)), jnp.float32)
  out = mf.mnist_features(variables, images)
  assert out["features"].shape == (5, 128) and out["logits"].shape == (5, 10)
  assert out["features"].dtype == jnp.float32 and bool(jnp.all(out["features"] >= 0))  # after ReLU
  np.testing.assert_array_equal(mf.mnist_features(variables, images)["logits"], out["logits"])
  # per-sample: a batch gives each image's own output (no cross-batch mixing; float32 reordering only)
  single = mf.mnist_features(variables, images[2:3])
  np.testing.assert_allclose(single["features"][0], out["features"][2], rtol=1e-5, atol=1e-6)
  # training mode applies dropout (needs an rng) and changes the logits; features are before dropout
  model = mf.MNISTClassifier()
  train = model.apply(variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  np.testing.assert_allclose(train["features"], out["features"], rtol=1e-6, atol=1e-6)
  assert not np.allclose(train["logits"], out["logits"])
  # feature statistics for FID-MNIST
  stats = fid.FeatureStats().update(out["features"])
  assert stats.cov.shape == (128, 128)


def test_other_sizes_and_bad_input():
  variables = mf.init_mnist_classifier(jax.random.PRNGKey(0), feature_dim=32, num_classes=7)
  images = jnp.asarray(np.random.default_rng().random((3, 28, 28, 1)), jnp.float32)
  out = mf.mnist_features(variables, images, feature_dim=32, num_classes=7)
  assert out["features"].shape == (3, 32) and out["logits"].shape == (3, 7)
  with pytest.raises(ValueError, match=r"\(B, 28, 28, 1\)"):
    mf.MNISTClassifier().apply(mf.init_mnist_classifier(jax.random.PRNGKey(0)), jnp.ones((2, 32, 32, 1)))

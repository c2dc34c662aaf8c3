"""Labels through the pipeline, class-conditional score training with label dropout, and classifiers
trained by the project's trainer (`training.task`), against exact answers.

Ground truth: the component index of a Gaussian mixture is its class label, and the noise-conditional
classifier p_t(y | x) of the perturbed mixture is exact (datasets/toy_labels.py).  A noise-conditional
classifier trained by `train()` on the labelled mixture must reproduce it: its mean KL divergence from
the exact posterior over x(t) ~ p_t, t ∈ {0.05, 0.3, 0.6, 0.9}, is below 0.02 nats, and its accuracy is
within 0.02 of the Bayes accuracy.  Why these numbers: the two classes of mixture1d are separated by
4 / 0.5 = 8 stds at t = 0, so the exact posterior is a smooth logistic curve in x at every t that a
64-wide MLP fits closely in 600 steps (measured, raw weights: KL 0.0006 to 0.009, accuracy gap ≤ 0.002); the
evaluation uses 4,000 points per t, so the Monte-Carlo error of a mean KL of 0.005 is ~2e-4 and of an
accuracy ≤ 0.008 (2 SE of a proportion at 0.5).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde_jax import classifier as classifier_lib
from score_sde_jax import config_defaults, datasets, losses, models
from score_sde_jax import sde as sde_lib
from score_sde_jax.datasets import toy, toy_labels
from score_sde_jax.run import config_utils


def _fresh_key():
  return jax.random.PRNGKey(int(np.random.default_rng().integers(1 << 30)))


def _noise_classifier_config(n_iters=600):
  config = config_defaults.toy_config("vpsde", "mixture1d")
  config.training.task = "noise_classifier"
  config.training.n_iters = n_iters
  config.training.batch_size = 256
  config.training.snapshot_freq = n_iters
  config.training.snapshot_freq_for_preemption = n_iters
  config.training.log_freq = 100
  config.training.eval_freq = 0
  config.model.name = "classifier_mlp"
  config.model.num_classes = 2
  config.model.nf = 64
  config.model.num_layers = 2
  config.data.num_train = 20000
  config.optim.lr = 3e-3
  config.model.ema_rate = 0.95     # the EMA weights are evaluated: a 20-step window suits 600 steps
  return config


# ---------------------------------------------------------------------------------------------------------
# labels through the data pipeline


def test_toy_mixture_labels_are_the_components_and_leave_the_points_unchanged():
  config = config_defaults.toy_config("vpsde", "ring8")
  config.data.num_train = 4000
  assert "label" not in next(datasets.get_train_iterator(config, batch_size=8, seed=0))  # not asked for
  config.model.num_classes = 8
  batch = next(datasets.get_train_iterator(config, batch_size=512, seed=int(np.random.default_rng().integers(1000))))
  x, y = np.asarray(batch["image"]), np.asarray(batch["label"])
  assert y.dtype == np.int32 and y.shape == (512,) and set(np.unique(y)) <= set(range(8))
  # each point's label is its component: with std 0.25 and neighbouring means 1.53 apart, the nearest
  # mean is the component for all but a ~1e-3 fraction (a 3-std excursion towards a neighbour)
  means = np.asarray(toy.ring8().means)
  nearest = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
  assert np.mean(nearest == y) > 0.99
  # the points are what the unlabelled sampler draws from the same key (the stream did not change)
  data, labels = datasets.images._toy_sample("ring8", 64, 3, 0)  # pylint: disable=protected-access
  key = jax.random.fold_in(jax.random.PRNGKey(3), 0)
  np.testing.assert_array_equal(data, np.asarray(toy.ring8().sample(key, 64), np.float32))
  assert labels.shape == (64,)
  ev = next(iter(datasets.get_eval_iterator(config, "test", batch_size=100)))
  assert ev["label"].shape == (100,) and ev["mask"].all()


def test_sampled_toys_have_no_labels_and_a_conditional_config_on_them_is_refused():
  config = config_defaults.toy_config("vpsde", "checkerboard")
  config.model.num_classes = 4
  batch = next(datasets.get_train_iterator(config, batch_size=8, seed=1))
  assert "label" not in batch
  with pytest.raises(config_utils.ConfigError, match="has no class labels"):
    config_utils.validate_config(config)


@pytest.mark.parametrize("field, value, message", [
    ("training.task", "segmentation", "allowed values"),
    ("training.label_dropout", 0.2, "needs a class-conditional score model"),
    ("training.label_dropout", 1.0, r"must lie in \[0, 1\)"),
    ("model.num_classes", -1, "model.num_classes=-1"),
])
def test_label_settings_are_validated_up_front(field, value, message):
  config = config_defaults.toy_config("vpsde", "mixture1d")
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(config_utils.ConfigError, match=message):
    config_utils.validate_config(config)


def test_a_classifier_needs_classes():
  config = _noise_classifier_config()
  config.model.num_classes = 0
  with pytest.raises(config_utils.ConfigError, match="at least 2 classes"):
    config_utils.validate_config(config)


# ---------------------------------------------------------------------------------------------------------
# class-conditional score training: label dropout


def test_label_dropout_replaces_labels_by_the_null_class_at_its_rate_in_training_only():
  """The fraction of labels the network receives as ∅ = num_classes is p_uncond = 0.3: with 20,000 labels
  its standard error is √(0.21 / 20000) = 0.0032, so ±0.015 is 4.6 SE; in evaluation no label drops."""
  config = config_defaults.toy_config("vpsde", "mixture1d")
  config.model.num_classes = 2
  config.training.label_dropout = 0.3
  seen = {}

  def apply_fn(params, x, labels, train=False, rngs=None, class_labels=None):  # noqa: ARG001
    seen["labels"] = class_labels
    return jnp.zeros_like(x) + params

  n = 20000
  rng = np.random.default_rng()
  batch = {"image": jnp.asarray(rng.normal(size=(n, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 2, n), jnp.int32)}
  sde = sde_lib.VPSDE()
  fn = losses.get_per_example_loss_fn(sde, apply_fn, config, train=True)
  fn(_fresh_key(), jnp.float32(0.1), batch)
  got = np.asarray(seen["labels"])
  dropped = got == 2
  assert abs(dropped.mean() - 0.3) < 0.015
  np.testing.assert_array_equal(got[~dropped], np.asarray(batch["label"])[~dropped])
  losses.get_per_example_loss_fn(sde, apply_fn, config, train=False)(_fresh_key(), jnp.float32(0.1), batch)
  np.testing.assert_array_equal(np.asarray(seen["labels"]), np.asarray(batch["label"]))


def test_class_conditional_mlp_trains_through_train(tmp_path):
  """A class-conditional MLP score model with label dropout trains through `train()` on labelled data,
  and its null-class output differs from its class outputs (the embedding was learned)."""
  from score_sde_jax.train import loop
  config = config_defaults.toy_config("vpsde", "mixture1d")
  config.model.num_classes = 2
  config.training.label_dropout = 0.2
  config.model.nf = 16
  config.training.n_iters = 60
  config.training.batch_size = 128
  config.training.snapshot_freq = 60
  config.training.snapshot_freq_for_preemption = 60
  config.training.eval_freq = 0
  config.training.snapshot_sampling = False
  config.data.num_train = 2000
  result = loop.train(config, str(tmp_path / "cond"), progress=False, async_checkpoint=False,
                      handle_signals=False, report=lambda *_: None)
  assert result.step == 60
  model = models.get_model(config)
  x = jnp.asarray(np.random.default_rng().normal(size=(8, 1)), jnp.float32)
  t = jnp.full((8,), 300.0)
  outs = [model.apply(result.state.params, x, t, class_labels=jnp.full((8,), k, jnp.int32)) for k in range(3)]
  assert all(np.all(np.isfinite(np.asarray(o))) for o in outs)
  assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[2]))
  assert not np.allclose(np.asarray(outs[1]), np.asarray(outs[2]))


# ---------------------------------------------------------------------------------------------------------
# a noise-conditional classifier trained by train() reproduces the exact p_t(y | x)


@pytest.fixture(scope="module")
def trained_noise_classifier(tmp_path_factory):
  from score_sde_jax.train import loop
  config = _noise_classifier_config()
  result = loop.train(config, str(tmp_path_factory.mktemp("clf")), progress=False, async_checkpoint=False,
                      handle_signals=False, report=lambda *_: None)
  return config, result


def test_noise_conditional_classifier_matches_the_exact_posterior(trained_noise_classifier):
  config, result = trained_noise_classifier
  assert result.step == int(config.training.n_iters)
  sde = sde_lib.sde_from_config(config)
  model = models.get_model(config)
  learned = classifier_lib.log_prob_fn(sde, model, result.state.ema_params, config)
  mix = toy.mixture1d()
  exact = toy_labels.noise_conditional_log_prob_fn(mix, sde)
  key = _fresh_key()
  for i, t_val in enumerate((0.05, 0.3, 0.6, 0.9)):
    k0, k1 = jax.random.split(jax.random.fold_in(key, i))
    x0, y = mix.sample_with_components(k0, 4000)
    t = jnp.full((4000,), t_val)
    xt = classifier_lib.perturb(k1, sde, x0, t)
    lp_exact, lp_learned = exact(xt, t), learned(xt, t)
    kl = float(jnp.mean(jnp.sum(jnp.exp(lp_exact) * (lp_exact - lp_learned), axis=-1)))
    bayes = float(jnp.mean(jnp.argmax(lp_exact, -1) == y))
    acc = float(jnp.mean(jnp.argmax(lp_learned, -1) == y))
    assert kl < 0.02, (t_val, kl)
    assert acc >= bayes - 0.02, (t_val, acc, bayes)


def test_classifier_accuracy_is_logged_against_t(trained_noise_classifier):
  """The snapshot writes eval/accuracy_t<t> for every t of the curve; accuracy falls as t grows (the
  classes merge under the noise: Bayes accuracy 1.0 at t = 1e-3, ~0.7 at t = 1 for mixture1d's weights)."""
  import os
  from score_sde_jax.run import metric_writer
  _, result = trained_noise_classifier
  events = [f for f in os.listdir(result.log_dir) if f.startswith("events.out.tfevents")]
  scalars = metric_writer.read_scalars(os.path.join(result.log_dir, events[0]))
  acc = {tag: v for _, tag, v in scalars if tag.startswith("eval/accuracy_t")}
  assert set(acc) == {f"eval/accuracy_t{t:g}" for t in classifier_lib.ACCURACY_TIMES}
  assert acc["eval/accuracy_t0.001"] > 0.99
  assert acc["eval/accuracy_t1"] < acc["eval/accuracy_t0.25"]

"""Noise-conditional classifiers (classifier_mlp, classifier_cnn, wideresnet_noise_conditional) and
class-conditional score networks (the null class ∅ of classifier-free guidance): shapes, dtypes and
finiteness on fresh random inputs, time and class conditioning change the output, logits are per example,
the Wide ResNet carries the official parameter names and loads a Flax msgpack of them (with a clear error
for a wrong tree), and the unconditional MLP keeps exactly its parameter tree.

Everything is tiny (widths 8-16, batch 4) and compiled once per module, for 2 loaded CPU cores."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde_jax import config_defaults, image_configs, models
from score_sde_jax.models import wideresnet

B = 4
# XLA's CPU backend compiles conv nets much faster without LLVM optimisation (as tests/test_models.py).
cjit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
# Two float32 evaluations of the same program on the same inputs agree to rounding (~1e-6 relative);
# a conditioning input that matters moves freshly initialised logits by O(0.1).  Differences must exceed
# MATTERS, far above rounding; equalities (per-example logits) hold to SAME.
MATTERS = 1e-4
SAME = dict(rtol=1e-5, atol=1e-5)


def _set(config, **fields):
  with config.unlocked():
    for k, v in fields.items():
      section, name = k.split(".")
      config[section][name] = v
  return config


def toy_classifier_config(sde="vesde", continuous=True):
  c = config_defaults.toy_config(sde, "ring8")
  return _set(c, **{"model.name": "classifier_mlp", "model.nf": 16, "model.num_layers": 2,
                    "model.num_classes": 4, "model.dropout": 0.1, "training.continuous": continuous})


def cnn_config(sde="vpsde"):
  c = config_defaults.base_config()
  _set(c, **{"training.sde": sde, "training.continuous": True, "model.name": "classifier_cnn",
             "model.nf": 8, "model.num_classes": 10, "model.dropout": 0.1,
             "model.embedding_type": "fourier" if sde == "vesde" else "positional"})
  return c


def wrn_config(blocks_per_group=1, channel_multiplier=1):
  c = config_defaults.base_config()
  return _set(c, **{"training.sde": "vesde", "training.continuous": True,
                    "model.name": "wideresnet_noise_conditional", "model.num_classes": 10,
                    "model.blocks_per_group": blocks_per_group,
                    "model.channel_multiplier": channel_multiplier})


def random_labels(config, key, n=B):
  """Fresh time labels of `score.time_labels`' kind for the config."""
  t = config.training
  if not t.continuous:
    return jax.random.randint(key, (n,), 0, int(config.model.num_scales))
  if t.sde == "vesde":
    return jnp.exp(jax.random.uniform(key, (n,), minval=np.log(0.01), maxval=np.log(10.0)))
  return jax.random.uniform(key, (n,), minval=1e-3, maxval=1.0) * 999.0


CASES = {
    "mlp_ve": (lambda: toy_classifier_config("vesde"), (B, 2)),
    "mlp_ve_discrete": (lambda: toy_classifier_config("vesde", continuous=False), (B, 2)),
    "mlp_vp": (lambda: toy_classifier_config("vpsde"), (B, 2)),
    "cnn_vp": (lambda: cnn_config("vpsde"), (B, 28, 28, 1)),
    "cnn_ve": (lambda: cnn_config("vesde"), (B, 28, 28, 1)),
    "wrn": (wrn_config, (B, 8, 8, 3)),
}


@functools.lru_cache(maxsize=None)
def built(name):
  """(config, model, variables, compiled eval-mode apply, input shape) of one classifier, initialised as
  run/state.init_variables does; built once per test session."""
  make_config, shape = CASES[name]
  config = make_config()
  model = models.get_model(config)
  # One compiled init (eager init compiles every convolution separately: slow on loaded CPUs).
  variables = cjit(lambda k: model.init({"params": k, "dropout": k}, jnp.zeros((1,) + shape[1:]),
                                        jnp.ones((1,)), train=False))(jax.random.PRNGKey(0))
  apply = cjit(lambda v, x, y: model.apply(v, x, y, train=False))
  return config, model, variables, apply, shape


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
  return built(request.param)


def test_logits_shape_dtype_finite_and_time_conditioned(case):
  config, model, variables, apply, shape = case
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
  x = jax.random.normal(k1, shape)
  y1, y2 = random_labels(config, k2), random_labels(config, k3)
  a = apply(variables, x, y1)
  assert a.shape == (B, int(config.model.num_classes)) and a.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(a)))
  b = apply(variables, x, y2)
  assert float(jnp.min(jnp.max(jnp.abs(a - b), axis=-1))) > MATTERS   # every example sees its t
  # Per example: changing the other rows of the batch leaves row 0 unchanged.
  x_other = x.at[1:].set(jax.random.normal(k3, x[1:].shape))
  np.testing.assert_allclose(apply(variables, x_other, y1)[0], a[0], **SAME)


@pytest.mark.parametrize("name", ["mlp_ve", "cnn_vp"])
def test_train_mode_with_dropout(name):
  """train=True applies model.dropout (the Wide ResNet has none): finite logits that differ from the
  evaluation-mode ones."""
  make_config, shape = CASES[name]
  config = make_config()
  model = models.get_model(config)
  x = jax.random.normal(jax.random.PRNGKey(3), shape)
  t = random_labels(config, jax.random.PRNGKey(4))

  @cjit
  def both(key):
    variables = model.init({"params": key}, x, t, train=False)
    return (model.apply(variables, x, t, train=False),
            model.apply(variables, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(5)}))

  evaluated, trained = both(jax.random.PRNGKey(0))
  assert trained.shape == (B, int(config.model.num_classes)) and bool(jnp.all(jnp.isfinite(trained)))
  assert float(jnp.max(jnp.abs(trained - evaluated))) > MATTERS


def test_classifier_needs_classes_and_image_shapes():
  c = _set(toy_classifier_config(), **{"model.num_classes": 0})
  with pytest.raises(ValueError, match="num_classes"):
    models.get_model(c).init(jax.random.PRNGKey(0), jnp.ones((1, 2)), jnp.ones((1,)))
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    models.get_model(cnn_config()).init(jax.random.PRNGKey(0), jnp.ones((1, 784)), jnp.ones((1,)))
  with pytest.raises(ValueError, match="RGB"):
    models.get_model(wrn_config()).init(jax.random.PRNGKey(0), jnp.ones((1, 28, 28, 1)), jnp.ones((1,)))


# ------------------------------------------------------------------------------------------------
# the official Wide ResNet: names and loading
# ------------------------------------------------------------------------------------------------
def _shapes(tree):
  return {"/".join(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_wideresnet_official_parameter_names():
  """WRN-28-10 (the official classifier): paths and shapes read off the official
  models/wideresnet_noise_conditional.py (auto-named Dense_k, explicit init_conv / init_bn / conv1 / bn_2
  / conv2 / pre-pool-bn; GroupNorm scale + bias; convolutions without bias)."""
  shapes = _shapes(wideresnet.expected_shapes(wrn_config(4, 10)))
  expected = {
      "params/GaussianFourierProjection_0/W": (128,),
      "params/Dense_0/kernel": (256, 512), "params/Dense_1/kernel": (512, 512),
      "params/init_conv/kernel": (3, 3, 3, 16),
      "params/WideResnetGroup_0/WideResnetBlock_0/init_bn/scale": (16,),
      "params/WideResnetGroup_0/WideResnetBlock_0/conv1/kernel": (3, 3, 16, 160),
      "params/WideResnetGroup_0/WideResnetBlock_0/Dense_0/kernel": (512, 160),
      "params/WideResnetGroup_0/WideResnetBlock_0/bn_2/bias": (160,),
      "params/WideResnetGroup_0/WideResnetBlock_0/conv2/kernel": (3, 3, 160, 160),
      "params/WideResnetGroup_1/WideResnetBlock_0/conv1/kernel": (3, 3, 160, 320),
      "params/WideResnetGroup_2/WideResnetBlock_3/conv2/kernel": (3, 3, 640, 640),
      "params/pre-pool-bn/scale": (640,),
      "params/Dense_2/kernel": (640, 10), "params/Dense_2/bias": (10,),
  }
  assert {k: shapes.get(k) for k in expected} == expected
  # 10 top-level leaves + 12 blocks x 8 leaves (init_bn 2, conv1 1, Dense_0 2, bn_2 2, conv2 1).
  assert len(shapes) == 10 + 12 * 8


@pytest.fixture(scope="module")
def wrn():
  config, _, variables, apply, _ = built("wrn")
  variables = flax.core.unfreeze(variables)
  x = jax.random.uniform(jax.random.PRNGKey(8), (B, 8, 8, 3))
  sigma = random_labels(config, jax.random.PRNGKey(9))
  return config, variables, apply, x, sigma


def test_wideresnet_msgpack_round_trip(wrn, tmp_path):
  """to_bytes → load_official_classifier gives the same arrays, hence identical logits (tolerance 0),
  whether the msgpack holds {'params': tree} or the bare tree (as the official checkpoints), from bytes
  or from a file."""
  config, variables, apply, x, sigma = wrn
  ref = apply(variables, x, sigma)
  path = tmp_path / "checkpoint_1"
  path.write_bytes(flax.serialization.to_bytes(variables["params"]))
  for source in (flax.serialization.to_bytes(variables), str(path)):
    loaded = wideresnet.load_official_classifier(source, config)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(variables)
    np.testing.assert_array_equal(apply(loaded, x, sigma), ref)


def test_wideresnet_loader_errors(wrn, tmp_path):
  config, variables, _, _, _ = wrn
  params = dict(variables["params"])
  params["conv_init"] = params.pop("init_conv")
  with pytest.raises(ValueError, match="conv_init/kernel"):
    wideresnet.load_official_classifier(flax.serialization.to_bytes(params), config)
  # Built for channel_multiplier 2 the last layer reads 128 features, not 64 (the first path in sorted
  # order whose shape differs).
  with pytest.raises(ValueError, match=r"Dense_2/kernel has shape \(64, 10\).*expects \(128, 10\)"):
    wideresnet.load_official_classifier(flax.serialization.to_bytes(variables), wrn_config(1, 2))
  with pytest.raises(ValueError, match="not a Flax msgpack"):
    wideresnet.load_official_classifier(b"\xc1 not msgpack", config)
  with pytest.raises(ValueError, match="no file"):
    wideresnet.load_official_classifier(str(tmp_path / "missing"), config)


# ------------------------------------------------------------------------------------------------
# class-conditional score networks: the null class ∅ = num_classes
# ------------------------------------------------------------------------------------------------
# The MLP's parameters for toy_config('vesde' | 'vpsde'), nf = 8, num_layers = 2, x in R², recorded from
# the code before class conditioning was added: num_classes = 0 must keep them (checkpoints restore).
# Dense_0, Dense_1: time embedding (Fourier features 2·nf wide for VE, sinusoidal nf for VP); Dense_2:
# input; Dense_3..8: two residual blocks of three Dense layers; Dense_9: output.
_MLP_SHARED = {
    "params/Dense_0/bias": (8,),
    "params/Dense_1/bias": (8,), "params/Dense_1/kernel": (8, 8),
    "params/Dense_2/bias": (8,), "params/Dense_2/kernel": (2, 8),
    "params/Dense_3/bias": (8,), "params/Dense_3/kernel": (8, 8),
    "params/Dense_4/bias": (8,), "params/Dense_4/kernel": (8, 8),
    "params/Dense_5/bias": (8,), "params/Dense_5/kernel": (8, 8),
    "params/Dense_6/bias": (8,), "params/Dense_6/kernel": (8, 8),
    "params/Dense_7/bias": (8,), "params/Dense_7/kernel": (8, 8),
    "params/Dense_8/bias": (8,), "params/Dense_8/kernel": (8, 8),
    "params/Dense_9/bias": (2,), "params/Dense_9/kernel": (8, 2),
}
MLP_PARAMS = {
    "vesde": {**_MLP_SHARED, "params/Dense_0/kernel": (16, 8), "params/GaussianFourierProjection_0/W": (8,)},
    "vpsde": {**_MLP_SHARED, "params/Dense_0/kernel": (8, 8)},
}


def mlp_config(sde, num_classes):
  c = config_defaults.toy_config(sde, "ring8")
  return _set(c, **{"model.nf": 8, "model.num_layers": 2, "model.num_classes": num_classes})


@pytest.mark.parametrize("sde", ["vesde", "vpsde"])
def test_unconditional_mlp_parameters_unchanged(sde):
  model = models.get_model(mlp_config(sde, 0))
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, jnp.ones((B, 2)),
                                             jnp.ones((B,))))
  assert _shapes(shapes) == MLP_PARAMS[sde]
  with pytest.raises(ValueError, match="num_classes is 0"):
    model.init(jax.random.PRNGKey(0), jnp.ones((B, 2)), jnp.ones((B,)),
               class_labels=jnp.zeros((B,), jnp.int32))


def test_class_conditional_mlp_and_null_class():
  k = 3
  config = mlp_config("vpsde", k)
  model = models.get_model(config)
  kx, kt = jax.random.split(jax.random.PRNGKey(11))
  x = jax.random.normal(kx, (B, 2))
  t = random_labels(config, kt)
  variables = model.init({"params": jax.random.PRNGKey(0)}, x, t, class_labels=jnp.zeros((B,), jnp.int32))
  shapes = _shapes(variables)
  assert shapes["params/class_embed/embedding"] == (k + 1, 8)           # k classes + the null class
  assert {p: s for p, s in shapes.items() if "class_embed" not in p} == MLP_PARAMS["vpsde"]
  apply = jax.jit(lambda v, x, t, c: model.apply(v, x, t, class_labels=c))
  a = apply(variables, x, t, jnp.array([0, 1, 2, 0]))
  b = apply(variables, x, t, jnp.array([1, 1, 0, k]))                    # k = ∅
  assert a.shape == x.shape and bool(jnp.all(jnp.isfinite(b)))
  diff = jnp.max(jnp.abs(a - b), axis=-1)
  assert float(diff[1]) == 0.0                                         # same label, same output
  assert float(jnp.min(diff[jnp.array([0, 2, 3])])) > MATTERS          # other class / ∅ differ
  with pytest.raises(ValueError, match="class_labels"):
    model.apply(variables, x, t)


def test_ncsnpp_class_table_has_the_null_row():
  c = image_configs.ncsnpp(image_configs.cifar10_config(), "vesde", continuous=True)
  m = c.model
  m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.num_classes = 8, (1, 2), 1, (4,), 3
  c.data.image_size = 8
  model = models.get_model(c)
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, jnp.ones((1, 8, 8, 3)),
                                             jnp.ones((1,)), class_labels=jnp.zeros((1,), jnp.int32)))
  assert _shapes(shapes)["params/class_embed/embedding"] == (4, 4 * 8)

"""Our Flax models compute the official functions: outputs of the official PyTorch models (fixtures made by
running score_sde_pytorch on small configs with perturbed random weights) are reproduced after converting
their state dicts, both the raw network output and the score of `get_score_fn`.

`official_torch_matrix/` covers every architecture switch of NCSN++/DDPM++ and DDPM pairwise (plus the
paper's configurations, rare settings, `patched/` combinations the PyTorch port crashes on, and `jaxsem/`
NCSN/NCSNv2 fixtures of the port switched to the official JAX maths); each one is checked here, those of
`official_matrix.DEFAULT` (every switch value) in the default run and the pairwise rest with -m slow."""
import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections

from score_sde_jax import config_defaults
import numpy as np
import pytest

from score_sde_jax.models import convert_torch_state_dict, get_model, get_score_fn
from score_sde_jax.models import convert as convert_lib
from score_sde_jax.sde import sde_from_config

import official_matrix  # tests/official_matrix.py
from official_matrix import MATRIX, MATRIX_DIR

FIXTURES = ("ncsnpp_ve_continuous_small", "ddpmpp_vp_continuous_small", "ddpm_vp_small")
PARAM_COUNTS = {"ncsnpp_ve_continuous_small": 461427, "ddpmpp_vp_continuous_small": 446051,
                "ddpm_vp_small": 1508643}
TOL = 1e-4
# XLA's CPU backend compiles these conv nets ~2.5x faster without LLVM optimisation.
cjit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _rel(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


_CACHE = {}


def _load(shared_dir, name):
  if name in _CACHE:
    return _CACHE[name]
  path = os.path.join(shared_dir, "fixtures", "official_torch", f"{name}.npz")
  if not os.path.exists(path):
    pytest.skip(f"{path} is missing")
  d = np.load(path)
  config = ml_collections.ConfigDict(json.loads(str(d["config_json"])))
  config_defaults.complete(config)   # an official config: the fields it predates get their defaults
  sd = {k[3:]: d[k] for k in d.files if k.startswith("sd/")}
  arrays = {k: d[k] for k in d.files if not k.startswith("sd/") and k != "config_json"}
  model = get_model(config)
  variables = convert_torch_state_dict(config, sd)
  _CACHE[name] = (config, sd, arrays, model, variables)
  return _CACHE[name]


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


@pytest.mark.parametrize("rel", official_matrix.params(MATRIX))
def test_official_matrix(rel):
  """Every fixture of the covering matrix: converted weights reproduce the official output (and the
  official `get_score_fn` score, where the fixture has one) within relative L2 1e-4 — the fixtures' own
  criterion; float32 reorderings give ~1e-6 (measured 5e-7 … 1.7e-6 over the matrix).  The default run
  checks `official_matrix.DEFAULT`, the rest runs with -m slow."""
  d = np.load(os.path.join(MATRIX_DIR, rel))
  config = ml_collections.ConfigDict(json.loads(str(d["config_json"])))
  config_defaults.complete(config)   # an official config: the fields it predates get their defaults
  sd = {k[3:]: d[k] for k in d.files if k.startswith("sd/")}
  model = get_model(config)
  variables = convert_torch_state_dict(config, sd)
  x = jnp.asarray(_nhwc(d["x"]))
  labels = jnp.asarray(d["labels"])
  has_score = "score" in d.files
  if has_score:
    sde = sde_from_config(config)
    t = jnp.asarray(d["t"])

  def run(v, x, labels):
    out = model.apply(v, x, labels, train=False)
    if not has_score:
      return out, None
    return out, get_score_fn(sde, model, v, continuous=bool(config.training.continuous))(x, t)

  out, score = cjit(run)(variables, x, labels)
  err = _rel(out, _nhwc(d["model_out"]))
  assert err < TOL, f"{rel}: model_out relative L2 error {err:.3e}"
  if has_score:
    err = _rel(score, _nhwc(d["score"]))
    assert err < TOL, f"{rel}: score relative L2 error {err:.3e}"


@pytest.mark.skipif(not MATRIX, reason=f"{MATRIX_DIR} is not present")
def test_default_matrix_covers_every_switch_value():
  """Every value of every switch that some matrix fixture has (architecture switches, model, SDE,
  continuous/discrete, activation, channels, fixture group, score or not) is in a fixture of the default
  run, so the default run exercises each code path and -m slow adds only the pairwise interactions."""
  assert set(official_matrix.DEFAULT) <= set(MATRIX), sorted(set(official_matrix.DEFAULT) - set(MATRIX))
  default = set().union(*(official_matrix.switch_values(r) for r in official_matrix.DEFAULT))
  missing = {}
  for rel in MATRIX:
    for v in official_matrix.switch_values(rel) - default:
      missing.setdefault(v, rel)
  assert not missing, ("values only in slow fixtures (add one such fixture to official_matrix.DEFAULT): "
                       f"{sorted(missing.items(), key=str)}")


@pytest.mark.parametrize("name", FIXTURES)
def test_model_output_matches_official(shared_dir, name):
  config, sd, arrays, model, variables = _load(shared_dir, name)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))
  assert n_params == PARAM_COUNTS[name]
  x = jnp.asarray(_nhwc(arrays["x"]))
  labels = jnp.asarray(arrays["labels"])
  out = cjit(lambda v, x, y: model.apply(v, x, y, train=False))(variables, x, labels)
  err = _rel(out, _nhwc(arrays["model_out"]))
  print(f"{name}: model_out relative L2 error {err:.3e}")
  assert err < TOL, err


@pytest.mark.parametrize("name", [f for f in FIXTURES if f != "ddpm_vp_small"])
def test_score_matches_official(shared_dir, name):
  config, sd, arrays, model, variables = _load(shared_dir, name)
  sde = sde_from_config(config)
  score_fn = get_score_fn(sde, model, variables, continuous=True)
  x = jnp.asarray(_nhwc(arrays["x"]))
  score = cjit(score_fn)(x, jnp.asarray(arrays["t"]))
  err = _rel(score, _nhwc(arrays["score"]))
  print(f"{name}: score relative L2 error {err:.3e}")
  assert err < TOL, err


def test_checkpoint_layouts_convert_the_same(shared_dir):
  """Raw dict, `module.` prefix, {'model': …} checkpoints and the EMA shadow list give the same
  variables."""
  config, sd, arrays, model, variables = _load(shared_dir, "ncsnpp_ve_continuous_small")
  same = lambda a, b: jax.tree.all(jax.tree.map(lambda p, q: bool(np.array_equal(p, q)), a, b))
  prefixed = {"module." + k: v for k, v in sd.items()}
  assert same(convert_torch_state_dict(config, prefixed), variables)
  ckpt = {"model": prefixed, "step": 3}
  assert same(convert_torch_state_dict(config, ckpt), variables)
  # EMA as stored by the official ExponentialMovingAverage: trainable params in parameters() order
  # (state-dict order without the 'sigmas' buffer and the frozen Fourier W).
  trainable = [k for k in sd if k != "sigmas" and k != "all_modules.0.W"]
  shadow = [sd[k] * 0.5 for k in trainable]
  ckpt = {"model": prefixed, "ema": {"decay": 0.999, "num_updates": 1, "shadow_params": shadow}}
  ema_vars = convert_torch_state_dict(config, ckpt, use_ema=True)
  halved = jax.tree.map(lambda a: a * 0.5, variables)
  halved["params"]["GaussianFourierProjection_0"] = variables["params"]["GaussianFourierProjection_0"]
  assert same(ema_vars, halved)
  # A named EMA dict under 'ema' works as well.
  assert same(convert_torch_state_dict(config, {"ema": prefixed}), variables)


def test_converter_rejects_mismatched_config(shared_dir):
  config, sd, arrays, model, variables = _load(shared_dir, "ddpmpp_vp_continuous_small")
  wrong = ml_collections.ConfigDict(config.to_dict())
  wrong.model.nf = 32
  with pytest.raises(ValueError, match="shape mismatch"):
    convert_torch_state_dict(wrong, sd)
  missing = dict(sd)
  missing.pop("all_modules.3.Conv_0.weight")
  with pytest.raises(ValueError, match="missing"):
    convert_torch_state_dict(config, missing)
  extra = dict(sd)
  extra["all_modules.99.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match="unexpected"):
    convert_torch_state_dict(config, extra)


def test_export_inverts_convert(shared_dir):
  config, sd, arrays, model, variables = _load(shared_dir, "ncsnpp_ve_continuous_small")
  exported = convert_lib.export_torch_state_dict(config, variables)
  for k, v in exported.items():
    np.testing.assert_array_equal(v, sd[k])
  assert set(sd) - set(exported) == {"sigmas"}

"""Every official score_sde config exists here under the same path with the same hyperparameters.

`tests/data/official_configs.json` holds, for each file of the official JAX code's `configs/` tree, the
resolved values (its default_*_configs base applied) and where they were read (see its `_source`).  For
each one the project's file at the same relative path must load with `load_config_file` and carry every
official field with an equal value.  Fields the project adds are not checked; the few official fields
that are not carried or deliberately differ are listed below with the reason.  Configs only: no model is
built, except that `test_official_config_validates` traces each model's shapes (as `validate_config` does).
"""
import json
import math
import os

import pytest

from score_sde_jax.run import config_utils

from tiers import default_or_slow  # tests/tiers.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data", "official_configs.json")

with open(DATA) as _f:
  OFFICIAL = json.load(_f)
CONFIGS = OFFICIAL["configs"]

# Official fields this project does not carry (any config), with the reason.
NOT_CARRIED = {
    "data.tfrecords_path": "machine-specific path to the official TFRecords files; datasets here are "
                           "built by score_sde_jax.datasets (data.tfds_data_dir)",
    "optim.amsgrad": "never read by the official optimizers (flax Adam / torch Adam get beta1, eps, "
                     "weight_decay only); the project's Adam has no AMSGrad switch either",
    "model.sigma_begin": "set only by ve/celeba_ncsnpp.py and read by no official model (sigma_max = 90 "
                         "from the CelebA defaults is the value used)",
    "training.continuouse": "typo in ve/ncsnv2/bedroom.py (see DIFFERENT)",
}

# (config, field) -> (the project's value, reason): official values this project deliberately differs from.
DIFFERENT = {
    ("ve/ncsn/celeba.py", "training.loss"): (
        "dsm", "the official file sets training.loss = 'vesde' where every sibling sets training.sde; here "
               "training.sde = 'vesde' and training.loss keeps its meaning (the continuous objective)"),
    ("ve/ncsnv2/bedroom.py", "training.continuous"): (
        False, "the official file's typo `training.continuouse = False` leaves the default True; NCSNv2 is "
               "trained with the discrete SMLD objective over its 1086 noise levels, as the other "
               "NCSN/NCSNv2 configs"),
}

# Values the project spells differently (field -> {official: project}).
VALUE_ALIASES = {
    "sampling.corrector": {"ald": "annealed_langevin"},
}

_MISSING = object()


def _norm(v):
  if isinstance(v, (tuple, list)):
    return [_norm(x) for x in v]
  return v


def _equal(a, b) -> bool:
  a, b = _norm(a), _norm(b)
  if isinstance(a, bool) or isinstance(b, bool):
    return isinstance(a, bool) and isinstance(b, bool) and a == b
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
  return type(a) is type(b) and a == b


def _get(config, key):
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return _MISSING
    node = node[part]
  return node


def _flatten(values, prefix=""):
  out = {}
  for k, v in values.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def test_data_file_is_complete():
  assert len(CONFIGS) == 39
  with_ckpt = sorted(k for k, v in CONFIGS.items() if v["released_checkpoint"])
  assert len(with_ckpt) == 16, with_ckpt
  for rel, entry in CONFIGS.items():
    assert entry["official_path"] == "configs/" + rel
    assert entry["read_from"], rel
    assert {"training", "sampling", "model", "optim", "data"} <= set(entry["values"]), rel
  for (rel, key) in DIFFERENT:
    assert key in _flatten(CONFIGS[rel]["values"]), (rel, key)


@pytest.mark.parametrize("rel", sorted(CONFIGS))
def test_official_config_matches(rel):
  entry = CONFIGS[rel]
  path = os.path.join(REPO, entry["official_path"])
  assert os.path.isfile(path), f"{entry['official_path']}: missing (official config, " \
                               f"checkpoint {entry['released_checkpoint']})"
  config = config_utils.load_config_file(path)
  problems = []
  for key, official in sorted(_flatten(entry["values"]).items()):
    if key in NOT_CARRIED:
      continue
    ours = _get(config, key)
    if (rel, key) in DIFFERENT:
      expected, _ = DIFFERENT[(rel, key)]
      if ours is _MISSING or not _equal(ours, expected):
        problems.append(f"{entry['official_path']}: {key} = {ours!r}; the listed deliberate value is "
                        f"{expected!r} (official {official!r})")
      continue
    official = VALUE_ALIASES.get(key, {}).get(official, official) if isinstance(official, str) else official
    if ours is _MISSING:
      problems.append(f"{entry['official_path']}: {key} missing (official {official!r})")
    elif not _equal(ours, official):
      problems.append(f"{entry['official_path']}: {key} = {ours!r}, official {official!r}")
  assert not problems, "\n".join(problems)


# Validation builds the model's shapes (~0.4-1.5 s of tracing per config on 2 cores).  The default run
# validates every config with a released checkpoint (what users load) and the NCSN/NCSNv2 families' own
# (ncsn, ncsnv2_64, ncsnv2_128); the other 20 run with -m slow.
VALIDATE_BY_DEFAULT = {"ve/ncsn/cifar10.py", "ve/ncsnv2/cifar10.py", "ve/ncsnv2/bedroom.py"}


@pytest.mark.parametrize("rel", default_or_slow(
    sorted(CONFIGS), [rel for rel in CONFIGS if CONFIGS[rel]["released_checkpoint"] or rel in VALIDATE_BY_DEFAULT]))
def test_official_config_validates(rel):
  """The project's file passes the project's own config checks (no typo'd or mistyped keys)."""
  config = config_utils.load_config_file(os.path.join(REPO, CONFIGS[rel]["official_path"]))
  config_utils.validate_config(config, num_devices=1)

"""One place for each setting: the config defaults (`score_sde_jax/config_defaults.py`).

* No library module or script reads a config section with `.get(key, default)` (a second, possibly
  disagreeing default): an AST scan of every `.get(` call whose receiver is a config or a name bound to
  part of one in the same function.
* An old or partial config is completed by `config_defaults.complete`, which fills exactly what is
  missing with the defaults and says what it filled; a complete config is left unchanged.
"""
import ast
import os
import random
import re

import ml_collections
import pytest

from score_sde_jax import config_defaults, image_configs
from score_sde_jax.run import config_utils

CONFIG_CHAIN = re.compile(r"^(self\.|FLAGS\.)?\w*config\w*(\.\w+|\[[^]]+\])*$")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources():
  for top in ("score_sde_jax", "scripts"):
    for root, _, files in os.walk(os.path.join(REPO, top)):
      for f in files:
        if f.endswith(".py"):
          yield os.path.join(root, f)


def _config_get_calls(path):
  """(line, source) of every `X.get(...)` where X mentions a config (`config…`, `self.config…`,
  `FLAGS.config…`) or is a name bound to such a chain (`t = config.training`) in the same function."""
  text = open(path).read()
  tree = ast.parse(text)
  found = []
  scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] + [tree]
  for scope in scopes:
    aliases = set()
    for node in ast.walk(scope):
      if isinstance(node, ast.Assign) and CONFIG_CHAIN.match(ast.unparse(node.value)):
        for target in node.targets:
          for name in ast.walk(target):
            if isinstance(name, (ast.Name, ast.Tuple)) and isinstance(name, ast.Name):
              aliases.add(name.id)
    for node in ast.walk(scope):
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        receiver = ast.unparse(node.func.value)
        root = receiver.split(".")[0].split("[")[0]
        if "config" in receiver.lower() or root in aliases:
          found.append((node.lineno, ast.unparse(node)))
  return sorted(set(found))


def test_no_config_get_with_a_default():
  offenders = []
  for path in _sources():
    for line, src in _config_get_calls(path):
      offenders.append(f"{os.path.relpath(path, REPO)}:{line}: {src}")
  assert not offenders, ("config sections read with .get (the default belongs in config_defaults; read "
                         "config.a.b):\n" + "\n".join(offenders))


def test_the_scan_finds_a_config_get(tmp_path):
  """The scan itself: it flags both shapes of the forbidden read (so the test above can fail)."""
  p = tmp_path / "m.py"
  p.write_text("def f(config):\n  s = config.sampling\n  a = s.get('eps', 1e-3)\n"
               "  return a, config.model.get('nf', 1)\n\ndef g(d):\n  return d.get('x', 1)\n")
  assert [line for line, _ in _config_get_calls(str(p))] == [3, 4]


@pytest.mark.parametrize("make", [image_configs.cifar10_config, lambda: config_defaults.toy_config("vpsde", "moons")],
                         ids=["image", "toy"])
def test_complete_fills_exactly_what_is_missing(make):
  full = make()
  partial = make()
  keys = sorted(config_utils.flatten(full))
  rng = random.Random()
  dropped = rng.sample([k for k in keys if k != "data.dataset" and k != "training.sde"], 6)
  for key in dropped:
    *path, last = key.split(".")
    node = partial
    for p in path:
      node = node[p]
    with node.unlocked():
      del node[last]
  filled = config_defaults.complete(partial)
  assert sorted(f.split("=")[0] for f in filled) == sorted(dropped)
  # Dropped fields come back with their defaults (a preset's own value, e.g. CIFAR-10's n_jitted_steps=5,
  # is the preset's, not a default); every other field is untouched.
  defaults = config_utils.flatten(config_defaults.defaults_for(full))
  want = dict(config_utils.flatten(full), **{k: defaults[k] for k in dropped})
  assert config_utils.flatten(partial) == want
  assert config_defaults.complete(partial) == []       # complete: nothing more to fill
  msgs = []
  old = ml_collections.ConfigDict({"data": {"dataset": "ring8"}, "training": {"sde": "vpsde"}})
  config_utils.complete_config(old, msgs.append)
  assert len(msgs) == 1 and "filled in from the defaults" in msgs[0]
  assert config_utils.flatten(old) == config_utils.flatten(config_defaults.toy_config("vpsde", "ring8"))

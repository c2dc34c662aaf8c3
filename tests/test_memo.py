"""`memo.per_config`: one trace per config content, never a stale or shared result."""
import ml_collections
import numpy as np

from score_sde_jax import config_defaults, memo
from score_sde_jax.run import state


def test_per_config_keys_on_content_and_hands_out_copies():
  calls = []

  @memo.per_config
  def shapes(config):
    calls.append(config.model.nf)
    return {"params": {"b": [config.model.nf, (1, 2)], "a": {"w": "leaf"}}}

  rng = np.random.default_rng()
  nf = int(rng.integers(1, 1000))
  c = ml_collections.ConfigDict({"model": {"nf": nf, "ch_mult": (1, 2)}})
  same = ml_collections.ConfigDict({"model": {"ch_mult": (1, 2), "nf": nf}})   # other insertion order
  first = shapes(c)
  assert shapes(same) == first and calls == [nf]                               # content, not identity
  assert list(first["params"]) == ["b", "a"]                                   # dict order kept
  first["params"]["b"].append("edited")                                        # a caller's edit ...
  assert shapes(c)["params"]["b"] == [nf, (1, 2)]                              # ... is not the cache's
  c.model.nf = nf + 1                                                          # any field change: new entry
  assert shapes(c)["params"]["b"][0] == nf + 1 and calls == [nf, nf + 1]


def test_variables_shapes_equal_a_fresh_trace():
  c = config_defaults.toy_config("vpsde", "ring8")
  c.model.nf = int(np.random.default_rng().integers(8, 64))
  got = state.variables_shapes(c)
  fresh = state.variables_shapes.__wrapped__(c)
  assert got == fresh
  c.model.num_layers += 1
  assert state.variables_shapes(c) != got

"""The covering matrix of official-model fixtures (`../shared/fixtures/official_torch_matrix/`) and its
default-run subset.  Shared by tests/test_official_fixtures.py and tests/test_checkpoints.py.

The matrix covers every *pair* of architecture-switch values (46 fixtures, ~95 s of compiles on 2 cores).
The default run checks `DEFAULT`, 11 fixtures in which every single value of every switch appears
(`test_default_matrix_covers_every_switch_value` proves it from the fixtures' own configs, so a fixture
added with a new value fails until one with it is added here); the other 35 pairwise interactions run
with `-m slow`.  The subset was chosen greedily: most uncovered values first, then the cheapest fixture."""
import glob
import json
import os
import re

import numpy as np
import pytest

from tiers import default_or_slow  # tests/tiers.py

MATRIX_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "shared", "fixtures", "official_torch_matrix")
MATRIX = sorted(os.path.relpath(p, MATRIX_DIR)
                for p in glob.glob(os.path.join(MATRIX_DIR, "**", "*.npz"), recursive=True))

DEFAULT = (
    "ddpm_vp_continuous.npz",
    "ddpm_vp_discrete_nrb2_noconv.npz",
    "jaxsem/jaxsem_ncsn.npz",
    "jaxsem/jaxsem_ncsnv2_256.npz",
    "jaxsem/jaxsem_ncsnv2_64_gray28.npz",
    "odd_fir1331_ddpmblocks_elu_iskip_cat.npz",
    "patched/patched_interp_res_nofir.npz",
    "pw01_subvpc_out-oskip_in-iskip-cat_fir_ddpm_four_uncond_nosbs_a0_r2_rnoconv_sr.npz",
    "pw14_ved_out-oskip_in-iskip-sum_fir_biggan_pos_cond_nosbs_a2_r1_nosr.npz",
    "pw21_ved_out-none_in-none_fir_ddpm_pos_cond_sbs_a1_r1_rnoconv_sr.npz",
    "rep_ve_cifar10_ncsnpp_discrete.npz",
)

# NCSN++/DDPM++ switches (model.<name>); DDPM has only the ones in _DDPM_SWITCHES.
_NCSNPP_SWITCHES = ("fir", "fir_kernel", "resblock_type", "progressive", "progressive_input",
                    "progressive_combine", "embedding_type", "conditional", "scale_by_sigma",
                    "num_res_blocks", "resamp_with_conv", "skip_rescale")
_DDPM_SWITCHES = ("num_res_blocks", "resamp_with_conv", "conditional")


def switch_values(rel):
  """{(switch, value)} of one fixture: model, SDE, continuous/discrete, activation, channels, the fixture
  group (rep/pw/odd/ddpm/patched/jaxsem), whether it has a score, and the family's architecture switches
  (with the number of attention resolutions)."""
  d = np.load(os.path.join(MATRIX_DIR, rel))
  c = json.loads(str(d["config_json"]))
  m = c["model"]
  values = {("name", m["name"]), ("sde", c["training"]["sde"]), ("continuous", c["training"]["continuous"]),
            ("nonlinearity", m["nonlinearity"]), ("num_channels", c["data"]["num_channels"]),
            ("group", re.match(r"[a-z]+", rel).group(0)), ("score", "score" in d.files)}
  switches = {"ncsnpp": _NCSNPP_SWITCHES, "ddpm": _DDPM_SWITCHES}.get(m["name"], ())
  values |= {(f"{m['name']}.{k}", json.dumps(m[k])) for k in switches}
  if m["name"] == "ddpm":
    values.add(("ddpm.continuous", c["training"]["continuous"]))
  if m["name"] == "ncsnpp":
    values.add(("ncsnpp.attention_resolutions", len(m["attn_resolutions"])))
  return values


def params(rels):
  """pytest params: DEFAULT in the default run, the rest marked slow; a skip when the matrix is absent."""
  if not rels:
    return [pytest.param("", marks=pytest.mark.skip(reason=f"{MATRIX_DIR} is not present"))]
  return default_or_slow(rels, DEFAULT)

"""score_sde_jax.torch_pickle_legacy reads torch's legacy (< 1.6, non-zip) .pth format without torch, through
torch_pickle's allow-list.

tests/data/torch_legacy_cases.pth was written by torch itself (`torch.save(..., _use_new_zipfile_serialization
=False)`, tests/data/make_inception_fixture.py --only legacy), with torch's own conversion of every tensor in
torch_legacy_cases_expected.npz; the malformed files below are built by hand.
"""
import io
import os
import pickle
import struct

import numpy as np
import pytest

from score_sde_jax import torch_pickle, torch_pickle_legacy as L
from score_sde_jax.torch_pickle import UnsafePickleError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CASES = os.path.join(DATA, "torch_legacy_cases.pth")


def test_reads_torch_written_legacy_file_exactly():
  out = L.load(CASES)
  expected = np.load(os.path.join(DATA, "torch_legacy_cases_expected.npz"))
  assert list(out) == ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                       "bn.num_batches_tracked", "fc.weight", "fc.bias", "base", "base_t", "base_rows", "f64",
                       "i32", "bf16"]
  for k in expected.files:
    assert out[k].dtype == expected[k].dtype, k
    np.testing.assert_array_equal(out[k], expected[k], err_msg=k)
  assert out["base_t"].flags.c_contiguous and out["base_t"].flags.owndata
  assert hasattr(out, "_metadata")  # the state dict's per-module versions come back as the pickle built them
  assert L.load_any(CASES).keys() == out.keys()
  with open(CASES, "rb") as f:
    assert L.load_bytes(f.read()).keys() == out.keys()


def test_zip_format_is_refused_by_legacy_reader_and_routed_by_load_any(tmp_path):
  with pytest.raises(ValueError, match="not a legacy torch file"):
    L.load(os.path.join(DATA, "torch_pickle_cases.pth"))
  assert L.load_any(os.path.join(DATA, "torch_pickle_cases.pth")).keys() == \
      torch_pickle.load(os.path.join(DATA, "torch_pickle_cases.pth")).keys()


def _legacy(main: bytes, keys, storages=(), sys_info=None, magic=L.MAGIC_NUMBER):
  """A legacy file: header pickles, `main` (a full pickle), the key list, then (numel, raw) per key."""
  out = io.BytesIO()
  for obj in (magic, L.PROTOCOL_VERSION,
              sys_info or {"protocol_version": 1001, "little_endian": True,
                           "type_sizes": {"short": 2, "int": 4, "long": 4}}):
    out.write(pickle.dumps(obj, protocol=2))
  out.write(main)
  out.write(pickle.dumps(list(keys), protocol=2))
  for numel, raw in storages:
    out.write(struct.pack("<q", numel) + raw)
  return out.getvalue()


def _g(module, name):
  return b"c" + f"{module}\n{name}\n".encode()


def _p(obj):
  return pickle.dumps(obj, protocol=2)[2:-1]


def _tensor_pickle(numel, size, stride, key="0", storage_type="FloatStorage", offset=0):
  storage = b"(" + _p("storage") + _g("torch", storage_type) + _p(key) + _p("cpu") + _p(numel) + b"NtQ"
  tensor = (_g("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + _p(offset) + _p(tuple(size))
            + _p(tuple(stride)) + b"\x89" + _g("collections", "OrderedDict") + b")RtR")
  return b"\x80\x02" + tensor + b"."


def test_hand_built_file_and_malformed_ones(tmp_path):
  rng = np.random.default_rng()
  a = rng.standard_normal(6).astype("<f4")
  good = _legacy(_tensor_pickle(6, (2, 3), (3, 1)), ["0"], [(6, a.tobytes())])
  np.testing.assert_array_equal(L.load_bytes(good), a.reshape(2, 3))
  # big-endian files (sys_info little_endian False): sizes and data in big-endian
  be = _legacy(_tensor_pickle(6, (3, 2), (1, 3)), ["0"], [], sys_info={"little_endian": False})
  be += struct.pack(">q", 6) + a.astype(">f4").tobytes()
  np.testing.assert_array_equal(L.load_bytes(be), a.reshape(2, 3).T)
  path = tmp_path / "t.pth"
  cases = {
      "truncated": (good[:-5], "truncated file"),
      "size mismatch": (_legacy(_tensor_pickle(6, (2, 3), (3, 1)), ["0"], [(5, a.tobytes())]), "holds 5"),
      "key list": (_legacy(_tensor_pickle(6, (2, 3), (3, 1)), ["1"], [(6, a.tobytes())]), "key list"),
      "out of bounds": (_legacy(_tensor_pickle(6, (3, 3), (3, 1)), ["0"], [(6, a.tobytes())]),
                        "reaches element"),
      "magic": (_legacy(_tensor_pickle(6, (2, 3), (3, 1)), ["0"], [(6, a.tobytes())], magic=1234), "magic"),
      "views": (_legacy(b"\x80\x02" + b"(" + _p("storage") + _g("torch", "FloatStorage") + _p("0") + _p("cpu")
                        + _p(6) + _p(("1", 0, 6)) + b"tQ.", ["0"], [(6, a.tobytes())]), "storage views"),
  }
  for name, (data, match) in cases.items():
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match) as info:
      L.load(path)
    assert str(info.value).startswith(str(path)), name
  # a global outside the allow-list, in the main pickle or in a header pickle, is refused before it runs
  evil = b"\x80\x02" + _g("os", "system") + _p("echo pwned") + b"\x85R."
  with pytest.raises(UnsafePickleError, match="os.system"):
    L.load_bytes(_legacy(evil, []))
  with pytest.raises(UnsafePickleError, match="os.system"):
    L.load_bytes(pickle.dumps(L.MAGIC_NUMBER, protocol=2) + evil)

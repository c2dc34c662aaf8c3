"""score_sde_jax.torch_pickle reads torch .pth checkpoints without torch and runs no code from them.

The expected values of tests/data/torch_pickle_cases.pth come from torch itself
(tests/data/make_torch_pickle_fixtures.py), so no test here needs torch.
"""
import collections
import json
import os
import pickle
import shutil
import struct
import subprocess
import zipfile

import numpy as np
import pytest

from score_sde_jax import torch_pickle
from score_sde_jax.torch_pickle import UnsafePickleError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CASES = os.path.join(DATA, "torch_pickle_cases.pth")
OFFICIAL = [("ddpm_vp_discrete_torch", 8), ("ddpmpp_vp_continuous_torch", 10)]


# --- helpers to write .pth archives by hand ------------------------------------------------------------

def _write_pth(path, pkl, storages=(), stem="archive", byteorder=b"little"):
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{stem}/data.pkl", pkl)
    if byteorder is not None:
      z.writestr(f"{stem}/byteorder", byteorder)
    for key, raw in dict(storages).items():
      z.writestr(f"{stem}/data/{key}", raw)
  return str(path)


def _g(module, name):
  """GLOBAL opcode."""
  return b"c" + f"{module}\n{name}\n".encode()


def _p(obj):
  """The opcodes that push `obj` (a plain value), without PROTO and STOP."""
  return pickle.dumps(obj, protocol=2)[2:-1]


def _storage(numel, storage_type="FloatStorage", key="0"):
  return b"(" + _p("storage") + _g("torch", storage_type) + _p(key) + _p("cpu") + _p(numel) + b"tQ"


def _tensor(numel, offset, size, stride, storage_type="FloatStorage", key="0"):
  return (_g("torch._utils", "_rebuild_tensor_v2") + b"(" + _storage(numel, storage_type, key) + _p(offset)
          + _p(tuple(size)) + _p(tuple(stride)) + b"\x89" + _g("collections", "OrderedDict") + b")RtR")


def _pickle(body):
  return b"\x80\x02" + body + b"."


def _official(shared_dir, name, k):
  root = os.path.join(shared_dir, "fixtures", "official_checkpoints", name)
  path = os.path.join(root, "checkpoints", f"checkpoint_{k}.pth")
  if not os.path.exists(path):
    pytest.skip(f"{path} is not present")
  with open(os.path.join(root, "config.json")) as f:
    config = json.load(f)
  return path, config, np.load(os.path.join(root, "io.npz"))


# --- the official score-SDE PyTorch checkpoints --------------------------------------------------------

@pytest.mark.parametrize("name,k", OFFICIAL)
def test_official_checkpoint_structure(shared_dir, name, k):
  path, config, io_arrays = _official(shared_dir, name, k)
  ckpt = torch_pickle.load(path)

  assert list(ckpt) == ["optimizer", "model", "ema", "step"]
  step = ckpt["step"]
  assert type(step) is int and step // config["training"]["snapshot_freq"] == k

  model = ckpt["model"]
  assert isinstance(model, collections.OrderedDict)
  assert all(key.startswith("module.") for key in model)
  sigmas = model["module.sigmas"]
  assert sigmas.dtype == np.float64 and sigmas.shape == (config["model"]["num_scales"],)
  params = [(key, v) for key, v in model.items() if key != "module.sigmas"]
  for key, v in params:
    assert isinstance(v, np.ndarray) and v.dtype == np.float32, key
    assert v.flags.c_contiguous and v.flags.writeable, key
    assert np.all(np.isfinite(v)) and np.any(v != 0), key
  nf = config["model"]["nf"]
  assert model["module.all_modules.0.weight"].shape == (4 * nf, nf)  # time-embedding Linear (out, in)
  convs = [v for _, v in params if v.ndim == 4]
  channels = io_arrays["x"].shape[-1]
  assert convs[0].shape == (nf, channels, 3, 3)  # OIHW
  assert convs[-1].shape == (channels, nf, 3, 3)
  n_params = {"ddpm_vp_discrete_torch": 281_379, "ddpmpp_vp_continuous_torch": 189_347}[name]
  assert sum(v.size for _, v in params) == n_params

  ema = ckpt["ema"]
  assert set(ema) == {"decay", "num_updates", "shadow_params"}
  assert ema["decay"] == pytest.approx(config["model"]["ema_rate"]) and ema["num_updates"] == step
  shadow = ema["shadow_params"]
  assert isinstance(shadow, list)
  frozen = config["model"]["name"] == "ncsnpp" and config["model"]["embedding_type"] == "fourier"
  trainable = [(key, v) for key, v in params if not (frozen and key == "module.all_modules.0.W")]
  assert len(shadow) == len(trainable)
  for (key, v), s in zip(trainable, shadow):
    assert s.dtype == np.float32 and s.shape == v.shape, key
    assert np.any(s != 0)
  # The EMA weights differ from the training weights (by an independent N(0, 0.05^2) in these fixtures).
  assert max(float(np.abs(s - v).max()) for (_, v), s in zip(trainable, shadow)) > 0.05

  optimizer = ckpt["optimizer"]
  (group,) = optimizer["param_groups"]
  assert type(group["lr"]) is np.float64 and group["lr"] == config["optim"]["lr"]
  assert group["params"] == list(range(len(params)))
  assert sorted(optimizer["state"]) == list(range(len(params)))
  for i, (key, v) in enumerate(params):
    state = optimizer["state"][i]
    assert state["exp_avg"].shape == v.shape and state["exp_avg_sq"].shape == v.shape, key
    assert state["step"].shape == () and float(state["step"]) == 1.0
    assert np.all(state["exp_avg_sq"] >= 0)


def test_load_bytes_matches_load(shared_dir):
  path, _, _ = _official(shared_dir, *OFFICIAL[0])
  with open(path, "rb") as f:
    from_bytes = torch_pickle.load_bytes(f.read())
  from_path = torch_pickle.load(path)
  for a, b in zip(from_bytes["ema"]["shadow_params"], from_path["ema"]["shadow_params"]):
    np.testing.assert_array_equal(a, b)


# --- views, dtypes and parameters, checked against what torch made --------------------------------------

def _flatten(obj, prefix=""):
  if isinstance(obj, np.ndarray):
    yield prefix, obj
  elif isinstance(obj, dict):
    for k, v in obj.items():
      yield from _flatten(v, f"{prefix}/{k}" if prefix else str(k))
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      yield from _flatten(v, f"{prefix}/{i}")


def test_views_dtypes_and_parameters_match_torch():
  cases = torch_pickle.load(CASES)
  expected = np.load(os.path.join(DATA, "torch_pickle_cases_expected.npz"))
  arrays = dict(_flatten(cases))
  assert sorted(arrays) == sorted(expected.files)
  for key in expected.files:
    assert arrays[key].dtype == expected[key].dtype, key
    assert arrays[key].shape == expected[key].shape, key
    assert arrays[key].tobytes() == np.ascontiguousarray(expected[key]).tobytes(), key  # bit-identical
    assert arrays[key].flags.c_contiguous and arrays[key].flags.owndata, key
  np.testing.assert_array_equal(cases["transposed"], cases["base"].T)
  np.testing.assert_array_equal(cases["col_slice"], cases["base"][:, 1:6:2])
  assert cases["bf16"].dtype == np.float32 and cases["bf16"][0, 2] == 3.140625
  # Views of one storage come back as independent arrays.
  cases["transposed"][0, 0] = 100.0
  assert cases["base"][0, 0] == -3.0
  assert cases["size"] == (2, 3)
  assert cases["nested"]["tuple"] == (1, "a", None, 2.5)
  assert type(cases["nested"]["lr"]) is np.float64 and cases["nested"]["lr"] == 1e-4
  assert list(cases["nested"]["linear"]) == ["weight", "bias"]


def test_offset_and_strides_by_hand(tmp_path):
  storage = np.arange(12, dtype="<f4")
  pkl = _pickle(b"(" + _tensor(12, 1, (3, 2), (1, 4)) + _tensor(12, 11, (), ()) + _tensor(12, 5, (0, 7), (1, 1))
                + _tensor(12, 2, (2, 3), (0, 1)) + b"l")
  path = _write_pth(tmp_path / "views.pth", pkl, {"0": storage.tobytes()})
  strided, scalar, empty, expanded = torch_pickle.load(path)
  np.testing.assert_array_equal(strided, [[1, 5], [2, 6], [3, 7]])
  assert scalar.shape == () and scalar == 11
  assert empty.shape == (0, 7) and empty.dtype == np.float32
  np.testing.assert_array_equal(expanded, [[2, 3, 4], [2, 3, 4]])


def test_storage_saved_on_its_own(tmp_path):
  # torch.save(t.untyped_storage()) pickles the bare storage; it comes back as a read-only 1-D array.
  pkl = _pickle(_storage(3, "UntypedStorage").replace(b"ctorch\nUntypedStorage", b"ctorch.storage\nUntypedStorage"))
  out = torch_pickle.load(_write_pth(tmp_path / "s.pth", pkl, {"0": b"\x01\x02\x03"}))
  assert out.dtype == np.uint8 and not out.flags.writeable
  np.testing.assert_array_equal(out, [1, 2, 3])


def test_big_endian_archive(tmp_path):
  pkl = _pickle(_tensor(3, 0, (3,), (1,), "DoubleStorage"))
  path = _write_pth(tmp_path / "big.pth", pkl, {"0": np.array([1.5, -2.0, 1e300], ">f8").tobytes()},
                    byteorder=b"big")
  out = torch_pickle.load(path)
  assert out.dtype == np.float64 and out.dtype.isnative
  np.testing.assert_array_equal(out, [1.5, -2.0, 1e300])


def test_stem_is_found_whatever_its_name(tmp_path):
  pkl = _pickle(_tensor(2, 0, (2,), (1,), "LongStorage"))
  path = _write_pth(tmp_path / "x.pth", pkl, {"0": np.array([7, -8], "<i8").tobytes()}, stem="my_ckpt_3",
                    byteorder=None)
  np.testing.assert_array_equal(torch_pickle.load(path), [7, -8])


# --- nothing from the file is executed --------------------------------------------------------------------

class _Exploit:

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _exploits(marker):
  return {
      "os.system": _Exploit(os.system, f"touch {marker}"),
      "builtins.eval": _Exploit(eval, f"open({str(marker)!r}, 'w').close()"),
      "builtins.exec": _Exploit(exec, f"open({str(marker)!r}, 'w').close()"),
      "subprocess.Popen": _Exploit(subprocess.Popen, ["touch", str(marker)]),
      "shutil.copy": _Exploit(shutil.copy, __file__, str(marker)),
  }


@pytest.mark.parametrize("exploit", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen",
                                     "shutil.copy"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_code_in_the_pickle_is_refused_and_not_run(tmp_path, exploit, protocol):
  marker = tmp_path / "pwned"
  payload = _exploits(marker)[exploit]
  global_name = f"{payload.func.__module__}.{payload.func.__qualname__}"  # os.system is posix.system
  # Hidden inside an otherwise ordinary checkpoint. (fix_imports=False keeps Python 3's module names.)
  pkl = pickle.dumps({"step": 1, "model": collections.OrderedDict(), "evil": payload}, protocol=protocol,
                     fix_imports=False)
  path = _write_pth(tmp_path / "evil.pth", pkl)
  with pytest.raises(UnsafePickleError) as info:
    torch_pickle.load(path)
  assert isinstance(info.value, ValueError)
  assert info.value.global_name == global_name
  assert global_name in str(info.value) and path in str(info.value)
  assert not marker.exists()


@pytest.mark.parametrize("module,name", [
    ("os", "system"),
    ("builtins", "getattr"),
    ("__builtin__", "eval"),
    ("torch", "load"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch._utils", "_rebuild_tensor_v2.__globals__"),
    ("torch._utils ", "_rebuild_tensor_v2"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "load"),
    ("collections", "OrderedDict.fromkeys"),
    ("_codecs", "decode"),
])
def test_globals_outside_the_allow_list_are_refused(tmp_path, module, name):
  marker = tmp_path / "pwned"
  pkl = _pickle(b"(" + _tensor(1, 0, (1,), (1,)) + _g(module, name) + _p(f"touch {marker}") + b"\x85Rl")
  path = _write_pth(tmp_path / "evil.pth", pkl, {"0": b"\0" * 4})
  with pytest.raises(UnsafePickleError, match=f"'{module}.{name}'".replace(".", r"\.")):
    torch_pickle.load(path)
  assert not marker.exists()


@pytest.mark.parametrize("body,match", [
    (_g("numpy", "dtype") + _p(("O", False, True)) + b"R", "numeric numpy dtypes"),
    (_g("numpy", "dtype") + _p(("V8", False, True)) + b"R", "numeric numpy dtypes"),
    (_g("numpy.core.multiarray", "scalar") + _p(("f8", b"\0" * 8)) + b"R", "numpy scalar"),
    (_g("numpy.core.multiarray", "scalar") + _g("numpy", "dtype") + _p(("f8", False, True)) + b"R"
     + _p(b"\0" * 4) + b"\x86R", "numpy scalar"),
    (_g("_codecs", "encode") + _p(("abc", "rot13")) + b"R", "latin1"),
    (_g("torch._utils", "_rebuild_tensor_v2") + _p(("not a storage", 0, (1,), (1,), False, None)) + b"R",
     "expects a storage"),
    (_g("torch._utils", "_rebuild_parameter") + _p(("x", True, None)) + b"R", "expects a tensor"),
    (_g("torch", "FloatStorage") + _p((10,)) + b"R", "persistent id"),
    (b"(" + _p("storage") + _p("FloatStorage") + _p("0") + _p("cpu") + _p(1) + b"tQ", "persistent id"),
    (_storage(-1), "non-negative"),
])
def test_misused_allowed_globals_are_rejected(tmp_path, body, match):
  path = _write_pth(tmp_path / "bad.pth", _pickle(body), {"0": b"\0" * 4})
  with pytest.raises(ValueError, match=match) as info:
    torch_pickle.load(path)
  assert path in str(info.value)


@pytest.mark.parametrize("offset,size,stride", [
    (0, (5,), (1,)),        # one past the end
    (4, (1,), (1,)),        # offset at the end
    (0, (2, 2), (3, 1)),    # strides reach past the end
    (-1, (1,), (1,)),
    (0, (2,), (-1,)),
    (0, (2, 2), (1,)),      # size and stride lengths differ
])
def test_views_outside_their_storage_are_rejected(tmp_path, offset, size, stride):
  path = _write_pth(tmp_path / "oob.pth", _pickle(_tensor(4, offset, size, stride)), {"0": b"\0" * 16})
  with pytest.raises(ValueError) as info:
    torch_pickle.load(path)
  assert path in str(info.value)


# --- legacy, truncated and corrupt files ---------------------------------------------------------------

def test_truncated_checkpoint(shared_dir, tmp_path):
  src, _, _ = _official(shared_dir, *OFFICIAL[0])
  with open(src, "rb") as f:
    data = f.read()
  path = tmp_path / "half.pth"
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="truncated") as info:
    torch_pickle.load(path)
  assert str(path) in str(info.value)


def test_corrupt_storage_bytes(shared_dir, tmp_path):
  src, _, _ = _official(shared_dir, *OFFICIAL[1])
  data = bytearray(open(src, "rb").read())
  with zipfile.ZipFile(src) as z:
    info = max(z.infolist(), key=lambda i: i.file_size if "/data/" in i.filename else 0)
  name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
  start = info.header_offset + 30 + name_len + extra_len
  data[start + info.file_size // 2] ^= 0xFF
  path = tmp_path / "corrupt.pth"
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="corrupt") as info:
    torch_pickle.load(path)
  assert str(path) in str(info.value)


def test_legacy_torch_format_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  # torch < 1.6: consecutive pickles (magic number, protocol version, sys info, the object, storage keys).
  legacy = (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps(_exploits(marker)["os.system"], protocol=2))
  path = tmp_path / "legacy.pth"
  path.write_bytes(legacy)
  with pytest.raises(ValueError, match="legacy") as info:
    torch_pickle.load(path)
  assert str(path) in str(info.value)
  assert not marker.exists()


def test_other_files_are_refused(shared_dir, tmp_path):
  jax_ckpt = os.path.join(shared_dir, "fixtures", "official_checkpoints", "ddpm_vp_discrete_jax", "checkpoints",
                          "checkpoint_8")
  if os.path.exists(jax_ckpt):
    with pytest.raises(ValueError, match="not a zip archive"):
      torch_pickle.load(jax_ckpt)
  empty = tmp_path / "empty.pth"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match="empty"):
    torch_pickle.load(empty)


def test_archive_without_data_pkl(tmp_path):
  path = tmp_path / "nopkl.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data/0", b"\0" * 4)
  with pytest.raises(ValueError, match="data.pkl") as info:
    torch_pickle.load(path)
  assert str(path) in str(info.value)


def test_storage_member_missing_or_short(tmp_path):
  pkl = _pickle(_tensor(4, 0, (4,), (1,)))
  short = _write_pth(tmp_path / "short.pth", pkl, {"0": b"\0" * 15})
  with pytest.raises(ValueError, match=r"has 15 bytes.*need 16") as info:
    torch_pickle.load(short)
  assert short in str(info.value)
  missing = _write_pth(tmp_path / "missing.pth", pkl, {"1": b"\0" * 16})
  with pytest.raises(ValueError, match="archive/data/0.*missing") as info:
    torch_pickle.load(missing)
  assert missing in str(info.value)


def test_truncated_data_pkl(tmp_path):
  pkl = _pickle(b"(" + _tensor(4, 0, (4,), (1,)) + b"l")
  path = _write_pth(tmp_path / "cut.pth", pkl[:len(pkl) // 2], {"0": b"\0" * 16})
  with pytest.raises(ValueError, match="cannot unpickle") as info:
    torch_pickle.load(path)
  assert path in str(info.value)

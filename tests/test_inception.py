"""The Flax FID Inception-v3 (`score_sde_jax.metrics.inception`) equals pytorch-fid's on random weights.

tests/data/inception_fixture.npz (tests/data/make_inception_fixture.py, with torch + pytorch-fid) holds the
recipe of random weights, uint8 input batches of four sizes (up-, down- and no resize to 299x299) and
pytorch-fid's pool_3 and logits on them; here the same weights are rebuilt in numpy, converted, and run.

Tolerance 1e-4 in max-abs error relative to the largest output magnitude: torch's own float32 and float64
runs of this network differ by ~3e-7, and XLA's float32 convs are summed in another order; 1e-4 leaves room
for that while a wrong padding, pooling or BatchNorm detail moves the outputs by >= 1e-2 (pytorch-fid's
FID-specific pooling alone changes the logits by 16% on these weights, the fixture script prints it).
"""
import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from score_sde_jax.metrics import inception

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "data", "inception_fixture.npz")
TOL = 1e-4


def _script():
  spec = importlib.util.spec_from_file_location("make_inception_fixture",
                                                os.path.join(REPO, "tests", "data", "make_inception_fixture.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # torch is imported only inside main()
  return module


@pytest.fixture(scope="module")
def fixture():
  return np.load(FIXTURE)


@pytest.fixture(scope="module")
def state_dict(fixture):
  script = _script()
  names = [str(n) for n in fixture["names"]]
  sd = script.random_state_dict(names, json.loads(str(fixture["shapes"])), int(fixture["seed"]))
  assert script.state_dict_sha256(sd) == str(fixture["state_dict_sha256"]), "the weight recipe drifted"
  return sd


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def test_matches_pytorch_fid_on_random_weights(fixture, state_dict):
  variables = inception.fid_inception_variables(state_dict)
  n = int(fixture["batch_count"])
  assert n >= 4
  for i in range(n):
    u8 = fixture[f"images_{i}"]
    out = inception.inception_features(variables, u8.astype(np.float32) / np.float32(255.0))
    assert out["pool_3"].shape == (u8.shape[0], 2048) and out["logits"].shape == (u8.shape[0], 1008)
    assert out["pool_3"].dtype == jnp.float32
    for key in ("pool_3", "logits"):
      err = _rel(out[key], fixture[f"{key}_{i}"])
      assert err <= TOL, f"batch {i} {u8.shape}: {key} relative error {err:.2e} > {TOL}"


def test_resize_matches_torch_interpolate_closed_form():
  """`resize_for_inception` = F.interpolate(bilinear, align_corners=False) written out in float64 numpy
  (half-pixel source coordinates clamped at 0, floor/ceil neighbours, linear weights), on fresh random images
  of up- and downsampling sizes.

  Tolerance: torch and jax both compute the source coordinate in float32, so they sit up to a few ulp of
  it (~n_in * 2^-24 each) from the float64 coordinate; images in [0, 1] move by at most that times 1 per
  unit of coordinate, and 2x - 1 doubles it: 2 * 4 * n_in * 2^-24 (1.9e-4 for n_in = 400).  Torch and
  jax agree with each other to 2e-7 (the fixture test runs them through the whole network).  The
  conventions this rules out differ by far more: align_corners=True or antialiasing move values by 1e-2..0.5.
  """
  def torch_bilinear_1d(n_in, n_out):
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), i0] += 1 - lam
    m[np.arange(n_out), i1] += lam
    return m

  rng = np.random.default_rng()
  for h, w in [(17, 40), (400, 311)]:
    x = rng.random((2, h, w, 3)).astype(np.float32)
    expected = np.einsum("oh,bhwc->bowc", torch_bilinear_1d(h, 299), x.astype(np.float64))
    expected = np.einsum("pw,bowc->bopc", torch_bilinear_1d(w, 299), expected)
    got = np.asarray(inception.resize_for_inception(x))
    np.testing.assert_allclose(got, 2 * expected - 1, atol=2 * 4 * max(h, w) * 2.0**-24, rtol=0)


def test_conversion_layout_and_errors(state_dict):
  v = inception.fid_inception_variables(state_dict)
  w = state_dict["Mixed_6b.branch7x7_2.conv.weight"]  # (O, I, 1, 7)
  np.testing.assert_array_equal(v["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
                                w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["params"]["fc"]["kernel"], state_dict["fc.weight"].T)
  np.testing.assert_array_equal(v["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                state_dict["Mixed_7c.branch_pool.bn.running_var"])
  # num_batches_tracked (in torch state dicts) is ignored; anything else unknown, missing or misshapen is not.
  inception.fid_inception_variables({**state_dict, "Conv2d_1a_3x3.bn.num_batches_tracked": np.int64(0)})
  with pytest.raises(ValueError, match="AuxLogits.fc.weight"):
    inception.fid_inception_variables({**state_dict, "AuxLogits.fc.weight": np.ones((1000, 768), np.float32)})
  short = {k: a for k, a in state_dict.items() if k != "Mixed_5b.branch_pool.bn.running_mean"}
  with pytest.raises(ValueError, match="lacks 1 entries.*Mixed_5b.branch_pool.bn"):
    inception.fid_inception_variables(short)
  with pytest.raises(ValueError, match=r"fc.weight.*\(1000, 2048\)"):
    inception.fid_inception_variables({**state_dict, "fc.weight": np.ones((1000, 2048), np.float32)})


def test_load_fid_inception_missing_file_says_where_to_get_it(tmp_path, monkeypatch):
  monkeypatch.setenv(inception.INCEPTION_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError) as info:
    inception.load_fid_inception()
  msg = str(info.value)
  assert isinstance(info.value, inception.InceptionWeightsNotFound)
  assert "\n" not in msg and inception.FID_WEIGHTS_URL in msg and inception.INCEPTION_ENV in msg
  assert os.path.join(str(tmp_path), inception.FID_WEIGHTS_FILE) in msg
  assert ".cache/score_sde_jax" in msg
  monkeypatch.delenv(inception.INCEPTION_ENV)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert inception.default_weights_path() == os.path.join(str(tmp_path / "home"), ".cache", "score_sde_jax",
                                                          inception.FID_WEIGHTS_FILE)
  with pytest.raises(inception.InceptionWeightsNotFound):
    inception.load_fid_inception(tmp_path / "nope.pth")


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_load_fid_inception_reads_pth_without_torch(tmp_path, monkeypatch, state_dict, fmt):
  """A .pth in torch's zip format (torch >= 1.6) or its legacy format (pytorch-fid's 2019 weight file is
  expected to be in that one), written here without torch, is read through the allow-list readers and
  converted; the env var may name the file itself."""
  path = tmp_path / "weights.pth"
  _write_state_dict_pth(path, state_dict, fmt)
  monkeypatch.setenv(inception.INCEPTION_ENV, str(path))
  v = inception.load_fid_inception()
  np.testing.assert_array_equal(v["params"]["Conv2d_1a_3x3"]["bn"]["scale"],
                                state_dict["Conv2d_1a_3x3.bn.weight"])
  np.testing.assert_array_equal(v["params"]["Mixed_7c"]["branch3x3_2b"]["conv"]["kernel"],
                                state_dict["Mixed_7c.branch3x3_2b.conv.weight"].transpose(2, 3, 1, 0))
  bad = tmp_path / "bad.pth"
  _write_state_dict_pth(bad, {"fc.weight": state_dict["fc.weight"]}, fmt)
  with pytest.raises(ValueError, match=f"^{bad}: .*lacks"):
    inception.load_fid_inception(bad)
  not_torch = tmp_path / "junk.pth"
  not_torch.write_bytes(b"definitely not a checkpoint")
  with pytest.raises(ValueError, match=f"^{not_torch}"):
    inception.load_fid_inception(not_torch)


def test_input_checks():
  v = None
  with pytest.raises(ValueError, match="float images"):
    inception.inception_features(v, np.ones((1, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="1 or 3 channels"):
    inception.inception_features(v, np.ones((1, 8, 8, 4), np.float32))


def _write_state_dict_pth(path, state_dict, fmt):
  """torch.save's format ("zip", or "legacy" as torch < 1.6 wrote it) for an OrderedDict of contiguous
  float32 tensors, one storage each."""
  import pickle
  import struct
  import zipfile

  from score_sde_jax import torch_pickle_legacy

  def g(module, name):
    return b"c" + f"{module}\n{name}\n".encode()

  def p(obj):
    return pickle.dumps(obj, protocol=2)[2:-1]

  body = g("collections", "OrderedDict") + b")R"
  storages = {}
  for i, (name, a) in enumerate(sorted(state_dict.items())):
    a = np.ascontiguousarray(a, "<f4")
    key = str(i)
    storages[key] = (a.size, a.tobytes())
    stride = tuple(int(s // 4) for s in a.strides) if a.ndim else ()
    pid = p("storage") + g("torch", "FloatStorage") + p(key) + p("cpu") + p(a.size)
    pid += b"N" if fmt == "legacy" else b""  # legacy ids carry view_metadata (None)
    tensor = (g("torch._utils", "_rebuild_tensor_v2") + b"((" + pid + b"tQ" + p(0) + p(tuple(a.shape))
              + p(stride) + b"\x89" + g("collections", "OrderedDict") + b")RtR")
    body += p(name) + tensor + b"s"
  main = b"\x80\x02" + body + b"."
  if fmt == "legacy":
    with open(path, "wb") as f:
      sys_info = {"protocol_version": 1001, "little_endian": True,
                  "type_sizes": {"short": 2, "int": 4, "long": 4}}
      for obj in (torch_pickle_legacy.MAGIC_NUMBER, torch_pickle_legacy.PROTOCOL_VERSION, sys_info):
        f.write(pickle.dumps(obj, protocol=2))
      f.write(main)
      f.write(pickle.dumps(list(storages), protocol=2))
      for numel, raw in storages.values():
        f.write(struct.pack("<q", numel) + raw)
    return
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", main)
    z.writestr("archive/byteorder", b"little")
    for key, (_, raw) in storages.items():
      z.writestr(f"archive/data/{key}", raw)

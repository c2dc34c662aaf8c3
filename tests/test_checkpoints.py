"""`checkpoints.load_pretrained` on the released checkpoint formats (`../shared/fixtures/official_checkpoints`:
official JAX msgpack and official PyTorch `.pth`, with the official networks' outputs), the official JAX
naming difference on every architecture of the covering matrix, the bad-input errors (one line naming the
path, nothing modified), and the whole path from a checkpoint to samples and bits/dim through the scripts
(`convert_checkpoint.py`, `sample.py --checkpoint`, `evaluate.py --checkpoint`) on a CIFAR-10 archive of
the official format, without network or PyTorch."""
import glob
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections

from score_sde_jax import config_defaults
import numpy as np
import pytest

from score_sde_jax import checkpoints
from score_sde_jax.models import convert_torch_state_dict, get_model
from score_sde_jax.run import config_utils

import official_matrix  # tests/official_matrix.py
from official_matrix import MATRIX_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "official_checkpoints")
NAMES = sorted(n for n in (os.listdir(FIXTURES) if os.path.isdir(FIXTURES) else [])
               if os.path.isdir(os.path.join(FIXTURES, n)))
NEWEST = {"ddpmpp_vp_continuous_jax": "checkpoint_10", "ddpmpp_vp_continuous_torch": "checkpoint_10.pth",
          "ddpm_vp_discrete_jax": "checkpoint_8", "ddpm_vp_discrete_torch": "checkpoint_8.pth"}
# The fixtures' own pass criterion (official PyTorch and JAX networks agree to ~1e-6; float32 reorderings).
TOL = 1e-4
needs_fixtures = pytest.mark.skipif(not NAMES, reason=f"{FIXTURES} is not present")


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _fixture(name):
  config = ml_collections.ConfigDict(json.load(open(os.path.join(FIXTURES, name, "config.json"))))
  config_defaults.complete(config)   # an official config: the fields it predates get their defaults
  return config, np.load(os.path.join(FIXTURES, name, "io.npz"))


_APPLY = {}


def _apply(name, config, variables, x, labels):
  """The network on the fixture's input; one compiled program per fixture (weights are an argument)."""
  if name not in _APPLY:
    model = get_model(config)
    _APPLY[name] = jax.jit(lambda v, x, y: model.apply(v, x, y, train=False))
  return np.asarray(_APPLY[name](variables, jnp.asarray(x), jnp.asarray(labels)))


def _snapshot(root):
  """Every path under `root`, files with their size and mtime: what 'nothing was modified' compares
  (renamed, moved, deleted, added or rewritten entries all show)."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for n in dirnames:
      out[os.path.relpath(os.path.join(dirpath, n), root)] = "dir"
    for n in filenames:
      st = os.stat(os.path.join(dirpath, n))
      out[os.path.relpath(os.path.join(dirpath, n), root)] = (st.st_size, st.st_mtime_ns)
  return out


@needs_fixtures
@pytest.mark.parametrize("name", NAMES)
def test_released_formats_reproduce_the_official_outputs(name):
  """EMA by default (the official evaluation's weights), raw on request; the newest checkpoint of a
  directory in numeric order (checkpoint_10 after checkpoint_2); the directory, its checkpoints/ and the
  file give the same weights."""
  config, io_ = _fixture(name)
  root = os.path.join(FIXTURES, name)
  before = _snapshot(root)
  pre = checkpoints.read_pretrained(root, config)
  assert os.path.basename(pre.path) == NEWEST[name]
  assert pre.format == ("official_jax" if name.endswith("_jax") else "official_torch")
  assert pre.weights == "ema" and pre.step > 0
  err = _rel(_apply(name, config, pre.variables, io_["x"], io_["labels"]), io_["model_out"])
  assert err < TOL, f"{name} EMA: relative L2 {err:.2e}"
  raw = checkpoints.load_pretrained(root, config, weights="raw")
  err = _rel(_apply(name, config, raw, io_["x"], io_["labels"]), io_["model_out_train_weights"])
  assert err < TOL, f"{name} raw: relative L2 {err:.2e}"
  for other in (os.path.join(root, "checkpoints"), pre.path):
    assert checkpoints.read_pretrained(other, config).fingerprint == pre.fingerprint
  for key in io_.files:   # an older checkpoint of the same directory, chosen by its index
    if key.startswith("model_out_checkpoint_"):
      k = int(key.rsplit("_", 1)[1])
      old = checkpoints.read_pretrained(root, config, step=k)
      assert os.path.basename(old.path) == f"checkpoint_{k}"
      err = _rel(_apply(name, config, old.variables, io_["x"], io_["labels"]), io_[key])
      assert err < TOL, f"{name} checkpoint_{k}: relative L2 {err:.2e}"
  assert _snapshot(root) == before


def _official_jax_tree(params):
  """Our params renamed to the official JAX names (the FIR resampling conv's kernel is 'weight')."""
  def rename(tree, owner=None):
    return {(("weight" if (owner, k) == ("Conv2d_0", "kernel") else k) if not isinstance(v, dict) else k):
            (rename(v, k) if isinstance(v, dict) else v) for k, v in tree.items()}
  return rename(params)


def _leaf_paths(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaf_paths(v, prefix + (k,))
    else:
      yield prefix + (k,)


# The official JAX names concern NCSN++/DDPM++ and DDPM (NCSN/NCSNv2 have no FIR resampling conv).
MATRIX = [r for r in official_matrix.MATRIX if "jaxsem" not in r]


def _check_official_jax_names(rels, tmp_path, monkeypatch):
  """For each matrix fixture in `rels` (paths relative to MATRIX_DIR), an official-JAX-format State (our
  tree with the official FIR conv leaf name, msgpack as flax 0.3 wrote it) loads back to exactly the
  converted weights, raw weights from optimizer.target; with the explicit leaf mapping switched off, the
  architectures with FIR resampling convolutions are refused, naming the parameter.  Returns how many had
  FIR resampling convolutions."""
  with_fir_conv = 0
  for rel in rels:
    d = np.load(os.path.join(MATRIX_DIR, rel))
    config = ml_collections.ConfigDict(json.loads(str(d["config_json"])))
    config_defaults.complete(config)   # an official config: the fields it predates get their defaults
    ours = convert_torch_state_dict(config, {k[3:]: d[k] for k in d.files if k.startswith("sd/")})
    ours = jax.tree.map(np.asarray, ours)
    official = _official_jax_tree(ours["params"])
    noisy = jax.tree.map(lambda a: a + np.float32(0.5), official)
    state = {"step": np.int32(7), "optimizer": {"target": noisy, "state": {"step": np.int32(7)}},
             "lr": np.float32(2e-4), "model_state": {}, "ema_rate": np.float32(0.9999),
             "params_ema": official, "rng": np.array([1, 2], np.uint32)}
    f = tmp_path / "checkpoint_3"
    f.write_bytes(flax.serialization.msgpack_serialize(state))
    got = checkpoints.load_pretrained(str(f), config)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, ours)), rel
    raw = checkpoints.load_pretrained(str(f), config, weights="raw")
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b + np.float32(0.5)), raw, ours))
    if any(p[-1] == "weight" for p in _leaf_paths(official)):
      with_fir_conv += 1
      with monkeypatch.context() as mp:     # without the explicit mapping the official tree is refused
        mp.setattr(checkpoints, "_OFFICIAL_JAX_LEAVES", {})
        with pytest.raises(checkpoints.CheckpointError, match=r"Conv2d_0/kernel \(shape .*\) is missing"):
          checkpoints.load_pretrained(str(f), config)
  return with_fir_conv


@pytest.mark.skipif(not MATRIX, reason=f"{MATRIX_DIR} is not present")
def test_official_jax_names_on_every_switch_value(tmp_path, monkeypatch):
  """`_check_official_jax_names` on the default run's subset of the matrix (every switch value of
  NCSN++/DDPM++ and DDPM, tests/official_matrix.py), FIR resampling convolutions among them."""
  default = [r for r in MATRIX if r in official_matrix.DEFAULT]
  assert len(default) >= 7, default
  assert _check_official_jax_names(default, tmp_path, monkeypatch) >= 1


@pytest.mark.slow
@pytest.mark.skipif(not MATRIX, reason=f"{MATRIX_DIR} is not present")
def test_official_jax_names_on_every_architecture(tmp_path, monkeypatch):
  """`_check_official_jax_names` on every NCSN++/DDPM++/DDPM configuration of the covering matrix."""
  assert _check_official_jax_names(MATRIX, tmp_path, monkeypatch) >= 5


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the path, nothing modified
# ---------------------------------------------------------------------------------------------------
def _copy_fixture(name, tmp_path):
  import shutil
  dest = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), dest)
  return dest


def _one_line(e):
  msg = str(e)
  assert "\n" not in msg, msg
  return msg


@needs_fixtures
def test_bad_inputs_are_clear_errors_and_modify_nothing(tmp_path):
  config, _ = _fixture("ddpmpp_vp_continuous_jax")
  jax_dir = _copy_fixture("ddpmpp_vp_continuous_jax", tmp_path)
  torch_dir = _copy_fixture("ddpmpp_vp_continuous_torch", tmp_path)
  jax_file = jax_dir / "checkpoints" / "checkpoint_10"
  torch_file = torch_dir / "checkpoints" / "checkpoint_10.pth"
  cases = []

  unknown = tmp_path / "weights.bin"
  # Random bytes after a first byte that is no msgpack map marker (a map-marker first byte, 18 of 256
  # values, is read as msgpack and reported as corrupt msgpack: the case below).
  unknown.write_bytes(b"\x00" + np.random.default_rng().bytes(256))
  cases.append((unknown, config, "ema", r"unknown checkpoint format"))
  looks_msgpack = tmp_path / "weights2.bin"
  looks_msgpack.write_bytes(b"\x8f" + np.random.default_rng().bytes(256))
  cases.append((looks_msgpack, config, "ema", r"corrupt msgpack|not an official|must hold a map"))
  text = tmp_path / "notes.txt"
  text.write_text("not a checkpoint\n")
  cases.append((text, config, "ema", r"unknown checkpoint format"))
  empty = tmp_path / "empty"
  empty.mkdir()
  cases.append((empty, config, "ema", r"not a checkpoint directory"))
  cases.append((tmp_path / "missing.pth", config, "ema", r"no such file"))

  wrong = ml_collections.ConfigDict(config.to_dict())
  wrong.model.nf = 32
  cases.append((jax_file, wrong, "ema", r"parameter \S+ has shape \(\d+.*\) in the checkpoint but the "
                                        r"config's model needs \(\d+"))
  cases.append((torch_file, wrong, "ema", r"shape mismatch for 'all_modules\.\d+\.\S+' .* PyTorch \(\d+.*needs"))
  deeper = ml_collections.ConfigDict(config.to_dict())
  deeper.model.num_res_blocks = 2
  cases.append((jax_file, deeper, "ema", r"parameter \S+ \(shape .*\) is missing from the checkpoint"))

  cut = tmp_path / "cut" / "checkpoint_10"
  cut.parent.mkdir()
  cut.write_bytes(jax_file.read_bytes()[: jax_file.stat().st_size // 2])
  cases.append((cut, config, "ema", r"truncated or corrupt msgpack checkpoint"))
  cut_pth = tmp_path / "cut" / "checkpoint_10.pth"
  cut_pth.write_bytes(torch_file.read_bytes()[: torch_file.stat().st_size // 2])
  cases.append((cut_pth, config, "ema", r"checkpoint_10\.pth"))

  tree = flax.serialization.msgpack_restore(jax_file.read_bytes())
  nan_tree = jax.tree.map(np.copy, tree)
  leaf = nan_tree["params_ema"]["Conv_1"]["kernel"]
  leaf.reshape(-1)[np.random.default_rng().integers(leaf.size)] = np.nan
  nan_file = tmp_path / "nan" / "checkpoint_5"
  nan_file.parent.mkdir()
  nan_file.write_bytes(flax.serialization.msgpack_serialize(nan_tree))
  cases.append((nan_file, config, "ema", r"weights of step 500005 are not finite: parameter "
                                         r"params/Conv_1/kernel has 1 NaN/Inf value"))
  tree["params_ema"] = {}
  no_ema = tmp_path / "noema" / "checkpoint_4"
  no_ema.parent.mkdir()
  no_ema.write_bytes(flax.serialization.msgpack_serialize(tree))
  cases.append((no_ema, config, "ema", r"no EMA weights"))
  no_ema_pth = tmp_path / "noema" / "checkpoint_4.pth"
  with zipfile.ZipFile(no_ema_pth, "w") as z:   # a torch zip checkpoint with 'model' and 'step' only
    z.writestr("checkpoint_4/data.pkl", pickle.dumps({"model": {"module.x": 1.0}, "step": 4}, protocol=2))
  cases.append((no_ema_pth, config, "ema", r"no EMA weights \(no 'ema' entry\)"))

  before = _snapshot(tmp_path)
  for path, cfg, weights, pattern in cases:
    with pytest.raises(checkpoints.CheckpointError) as e:
      checkpoints.load_pretrained(str(path), cfg, weights=weights)
    msg = _one_line(e.value)
    assert msg.startswith(str(path)), msg
    assert __import__("re").search(pattern, msg), (pattern, msg)
  assert _snapshot(tmp_path) == before
  # raw weights of the checkpoints without EMA still load where the format has them
  assert checkpoints.load_pretrained(str(no_ema), config, weights="raw")


def test_unsafe_pth_runs_no_code(tmp_path):
  """A .pth whose pickle calls os.system is refused before anything runs."""
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  f = tmp_path / "checkpoint_1.pth"
  with zipfile.ZipFile(f, "w") as z:
    z.writestr("checkpoint_1/data.pkl", pickle.dumps({"model": Evil()}, protocol=2))
  with pytest.raises(checkpoints.CheckpointError, match=r"refusing to load the global '(posix|os)\.system'"):
    checkpoints.load_pretrained(str(f), ml_collections.ConfigDict({"model": {"name": "ncsnpp"}}))
  assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# The scripts: convert → workdir, sample and evaluate from any checkpoint
# ---------------------------------------------------------------------------------------------------
def _small_config_file(tmp_path, fixture):
  """A user's config: the official config file of the fixture's architecture, shrunk as the fixture is."""
  cfg = json.load(open(os.path.join(FIXTURES, fixture, "config.json")))
  base = {"ddpmpp_vp_continuous": "configs/vp/cifar10_ddpmpp_continuous.py",
          "ddpm_vp_discrete": "configs/vp/ddpm/cifar10.py"}[fixture.rsplit("_", 1)[0]]
  m = cfg["model"]
  path = tmp_path / f"{fixture}.py"
  path.write_text(
      "from score_sde_jax.run.config_utils import load_config_file\n"
      "def get_config():\n"
      f"  c = load_config_file({os.path.join(REPO, base)!r})\n"
      f"  c.model.nf = {m['nf']}\n  c.model.num_res_blocks = {m['num_res_blocks']}\n"
      f"  c.model.ch_mult = {tuple(m['ch_mult'])!r}\n"
      "  return c\n")
  return str(path)


@needs_fixtures
def test_convert_script_writes_variables(tmp_path):
  """convert_checkpoint.py --output: the EMA weights by default, --weights raw on request, equal to
  load_pretrained's; bad input is one ERROR line with exit 2 and writes nothing."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                                os.path.join(REPO, "scripts", "convert_checkpoint.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  cfg = _small_config_file(tmp_path, "ddpm_vp_discrete_torch")
  config = config_utils.load_config_file(cfg)
  src = os.path.join(FIXTURES, "ddpm_vp_discrete_torch", "checkpoints", "checkpoint_8.pth")
  for weights in ("ema", "raw"):
    out = tmp_path / f"{weights}.msgpack"
    assert script.main(["--config", cfg, "--checkpoint", src, "--output", str(out), "--weights", weights]) == 0
    got = flax.serialization.msgpack_restore(out.read_bytes())
    assert checkpoints.fingerprint(got) == checkpoints.read_pretrained(src, config, weights=weights).fingerprint
    assert checkpoints.read_pretrained(str(out), config).fingerprint == checkpoints.fingerprint(got)
  wrong = tmp_path / "wrong.py"
  wrong.write_text(open(cfg).read().replace("return c", "c.model.nf = 8\n  return c"))
  before = _snapshot(tmp_path)
  assert script.main(["--config", str(wrong), "--checkpoint", src, "--output", str(tmp_path / "x.msgpack")]) == 2
  assert _snapshot(tmp_path) == before


def _run(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.run([sys.executable] + args, capture_output=True, text=True, cwd=REPO, env=env,
                        timeout=600, **kw)


def _write_cifar_binary(path, rng, n_train=10, n_test=3):
  """A CIFAR-10 archive in the official binary format: <label byte><3072 channel-major pixel bytes>."""
  def batch(n):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    pixels = rng.integers(1, 256, (n, 3072)).astype(np.uint8)
    return np.concatenate([labels[:, None], pixels], axis=1).tobytes()
  names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
  members = {f"data_batch_{i}.bin": batch(n_train // 5) for i in range(1, 6)}
  members["test_batch.bin"] = batch(n_test)
  members["batches.meta.txt"] = ("\n".join(names) + "\n\n").encode()
  with tarfile.open(path, "w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


@needs_fixtures
def test_checkpoint_to_samples_and_bits_per_dim(tmp_path):
  """The user's path, by subprocess as a user runs it: an official PyTorch .pth → a workdir
  (convert_checkpoint.py, EMA by default) whose weights equal load_pretrained's; sample.py from the
  official JAX checkpoint directly (--checkpoint, results beside it) and from the converted workdir;
  CIFAR-10 prepared from an archive of the official format; evaluate.py --checkpoint gives bits/dim of a
  few test images.  Nothing is written into the checkpoints' own folders."""
  from score_sde_jax.datasets import cifar10
  cfg = _small_config_file(tmp_path, "ddpmpp_vp_continuous_jax")
  config = config_utils.load_config_file(cfg)
  jax_src = tmp_path / "released_jax"
  torch_src = tmp_path / "released_torch"
  import shutil
  shutil.copytree(os.path.join(FIXTURES, "ddpmpp_vp_continuous_jax"), jax_src)
  shutil.copytree(os.path.join(FIXTURES, "ddpmpp_vp_continuous_torch"), torch_src)
  before = {"jax": _snapshot(jax_src), "torch": _snapshot(torch_src)}

  # convert: .pth → workdir (EMA as ema_params, raw as params)
  wd = tmp_path / "converted"
  r = _run(["scripts/convert_checkpoint.py", "--config", cfg, "--checkpoint",
            str(torch_src / "checkpoints" / "checkpoint_10.pth"), "--workdir", str(wd)])
  assert r.returncode == 0, r.stderr[-2000:]
  want = checkpoints.read_pretrained(str(torch_src), config)
  got = checkpoints.read_pretrained(str(wd), config)
  assert (got.format, got.step, got.fingerprint) == ("workdir", want.step, want.fingerprint)
  assert checkpoints.read_pretrained(str(wd), config, weights="raw").fingerprint == \
      checkpoints.read_pretrained(str(torch_src), config, weights="raw").fingerprint
  r = _run(["scripts/convert_checkpoint.py", "--config", cfg, "--checkpoint", str(torch_src), "--workdir",
            str(wd)])
  assert r.returncode == 2 and r.stderr.startswith("ERROR: ") and "already holds checkpoints" in r.stderr

  # sample: official JAX directory → <checkpoint>_outputs/samples; the converted workdir → its samples/
  small = ["--config.model.num_scales=3", "--num_samples", "2", "--batch_size", "2"]
  r = _run(["scripts/sample.py", "--config", cfg, "--checkpoint", str(jax_src)] + small)
  assert r.returncode == 0, r.stderr[-2000:]
  out = jax_src / "checkpoints" / "checkpoint_10_outputs" / "samples" / "sample_00500005.npz"
  assert out.exists(), r.stdout
  s = np.load(out)
  assert s["samples"].shape == (2, 32, 32, 3) and np.all(np.isfinite(s["samples"]))
  assert str(s["fingerprint"]) == checkpoints.read_pretrained(str(jax_src), config).fingerprint
  r = _run(["scripts/sample.py", "--workdir", str(wd), "--num_samples", "2", "--batch_size", "2",
            "--set", "model.num_scales=3"])
  assert r.returncode == 0, r.stderr[-2000:]
  assert (wd / "samples" / f"sample_{want.step:08d}.png").exists()
  r = _run(["scripts/sample.py", "--checkpoint", str(jax_src)] + small[1:])
  assert r.returncode == 2 and r.stderr.startswith("ERROR: ") and "--config" in r.stderr

  # data: CIFAR-10 from an archive of the official binary format (few images, no network)
  data_dir = tmp_path / "tfds"
  _write_cifar_binary(tmp_path / "cifar-10-binary.tar.gz", np.random.default_rng())
  cifar10.prepare_cifar10(str(tmp_path / "cifar-10-binary.tar.gz"), str(data_dir), verify_md5=False,
                           num_examples={"train": 10, "test": 3})

  # evaluate: bits/dim of the 3 test images from the .pth, results in --workdir/eval
  ev = tmp_path / "eval_run"
  r = _run(["scripts/evaluate.py", "--config", cfg, "--checkpoint", str(torch_src / "checkpoints"),
            "--workdir", str(ev), f"--config.data.tfds_data_dir={data_dir}", "--config.eval.enable_bpd=True",
            "--config.eval.rtol=1e-2", "--config.eval.atol=1e-2", "--batch_size", "2", "--bound=False",
            "--progress=False"])
  assert r.returncode == 0, r.stderr[-3000:]
  summaries = glob.glob(str(ev / "eval" / "*.summary.json"))
  assert len(summaries) == 1
  summary = json.load(open(summaries[0]))
  assert summary["num_examples"] == 3 and summary["step"] == want.step
  assert np.isfinite(summary["bits_per_dim"]) and summary["mean_nfe"] > 0
  header = json.loads(open(summary["results_file"]).readline())
  assert header["fingerprint"] == want.fingerprint and header["format"] == "official_torch"
  after_jax = {k: v for k, v in _snapshot(jax_src).items() if "_outputs" not in k}
  assert after_jax == before["jax"] and _snapshot(torch_src) == before["torch"]

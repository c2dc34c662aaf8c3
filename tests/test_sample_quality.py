"""FID / KID / IS of samples (score_sde_jax.sample_quality, feature_nets, scripts/evaluate.py
--config.eval.enable_sampling=True).

Tiny and self-contained: MNIST-shaped data served by `tfds.testing.mock_data` (random 28x28x1 images, no
files), a one-step MLP score model trained on it, 16 DDIM samples of 3 steps, and feature nets with random
weights (an MNISTClassifier written to .msgpack files with fresh keys; the FID Inception-v3 with the random
weights of tests/data/inception_fixture.npz's recipe, run on 4 images only: 299x299 on CPU is slow).
The numbers of random networks mean nothing; what is checked is the plumbing: finite metrics, chunk files,
resumption without redrawing, identical numbers on a rerun, the reference-statistics cache and its key,
clear errors, reading a feature net from a workdir of the project's trainer (configs/mnist/feature_net.py,
2 steps), and one closed form (the FID of the dataset against itself).
"""
import glob
import importlib.util
import json
import os

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from score_sde_jax import draw, eval_settings, feature_nets, image_configs, sample_quality
from score_sde_jax import sde as sde_lib
from score_sde_jax import train as train_lib
from score_sde_jax.metrics import fid as fid_lib
from score_sde_jax.metrics import mnist_features
from score_sde_jax.run import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DATA = 48   # mock examples per split


def tiny_config(tfds_dir):
  c = image_configs.mnist_config()
  c.seed = int(np.random.default_rng().integers(1 << 20))
  m = c.model
  m.name, m.nf, m.num_layers, m.num_scales = "mlp", 16, 1, 20
  m.embedding_type, m.scale_by_sigma = "positional", False
  t = c.training
  t.sde, t.batch_size, t.n_iters, t.log_freq = "vpsde", 8, 1, 1
  t.snapshot_freq = t.snapshot_freq_for_preemption = 1
  t.snapshot_sampling = False
  c.eval.enable_loss = False
  c.data.tfds_data_dir = str(tfds_dir)
  return c


CONFIG_FILE = """from score_sde_jax import image_configs


def get_config():  # tiny_config() of tests/test_sample_quality.py
  c = image_configs.mnist_config()
  c.seed = {seed}
  c.model.name, c.model.nf, c.model.num_layers, c.model.num_scales = "mlp", 16, 1, 20
  c.model.embedding_type, c.model.scale_by_sigma = "positional", False
  t = c.training
  t.sde, t.batch_size, t.n_iters, t.log_freq = "vpsde", 8, 1, 1
  t.snapshot_freq = t.snapshot_freq_for_preemption = 1
  t.snapshot_sampling = False
  c.eval.enable_loss = False
  c.data.tfds_data_dir = {tfds!r}
  return c
"""


def write_mnist_net(path):
  """A random-weight MNISTClassifier (fresh key) as a .msgpack of its variables."""
  key = jax.random.PRNGKey(int(np.random.default_rng().integers(1 << 30)))
  variables = jax.tree.map(np.asarray, mnist_features.init_mnist_classifier(key))
  with open(path, "wb") as f:
    f.write(flax.serialization.to_bytes(variables))
  return variables


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
  base = tmp_path_factory.mktemp("sample_quality")
  with tfds.testing.mock_data(num_examples=NUM_DATA):
    c = tiny_config(base / "tfds")
    wd = str(base / "work")
    train_lib.train(c, wd, devices=jax.devices()[:1], progress=False, report=lambda *_: None,
                    async_checkpoint=False, handle_signals=False)
    nets = [str(base / "net_a.msgpack"), str(base / "net_b.msgpack")]
    for p in nets:
      write_mnist_net(p)
    spec = importlib.util.spec_from_file_location("_sq_evaluate", os.path.join(REPO, "scripts", "evaluate.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    yield {"base": base, "config": c, "wd": wd, "nets": nets, "script": script, "stats": str(base / "stats")}


def settings_args(ctx, net, *extra):
  sets = ["eval.enable_sampling=True", "eval.enable_bpd=False", "eval.num_samples=16", "eval.batch_size=8",
          "sampling.method=ddim", "sampling.num_steps=3", "eval.feature_net=mnist",
          f"eval.feature_net_path={net}", f"eval.stats_dir={ctx['stats']}", "eval.is_splits=4",
          "eval.kid_subset_size=8", "eval.kid_reservoir_size=12", "eval.kid_num_subsets=5"] + list(extra)
  return [a for s in sets for a in ("--set", s)]


def evaluate(ctx, args):
  try:
    code = ctx["script"].run(["scripts/evaluate.py", f"--workdir={ctx['wd']}", "--noprogress"] + args)
  except SystemExit as e:
    code = e.code
  return 0 if code is None else code


def last_result(path):
  with open(path) as f:
    lines = [json.loads(line) for line in f]
  assert lines[0]["kind"] == "header" and all(r["kind"] == "result" for r in lines[1:])
  return lines[0], lines[-1], len(lines) - 1


def count_draws(monkeypatch):
  """Counts calls of the compiled sampler that `sample_quality` builds."""
  calls = []
  real = draw.draw_program

  def counting(*a, **k):
    fn = real(*a, **k)
    return lambda params, key: (calls.append(1), fn(params, key))[1]
  monkeypatch.setattr(draw, "draw_program", counting)
  return calls


def test_evaluate_reports_metrics_writes_chunks_and_reuses_them(ctx, monkeypatch, capsys):
  """evaluate.py: finite FID/KID/IS of 16 samples; 2 chunk files of uint8 images + features + logits; the
  TensorBoard scalars; a rerun draws nothing, rewrites no file and gives identical numbers; the reference
  statistics are computed once."""
  calls = count_draws(monkeypatch)
  with tfds.testing.mock_data(num_examples=NUM_DATA):
    assert evaluate(ctx, settings_args(ctx, ctx["nets"][0])) == 0
  out = capsys.readouterr().out
  assert len(calls) == 2 and "reference statistics:" in out, out
  (res_file,) = glob.glob(os.path.join(ctx["wd"], "eval", "fid_step1_*.jsonl"))
  header, r1, n = last_result(res_file)
  assert n == 1 and all(np.isfinite(r1[k]) for k in ("fid", "kid", "kid_std", "is", "is_std", "nfe_mean"))
  assert r1["num_samples"] == 16 and r1["chunks_drawn"] == 2 and r1["nfe_mean"] == 4.0   # 3 steps + denoise
  assert r1["kid_std"] > 0   # subsets of 8 drawn from reservoirs of 12: they differ
  assert f"FID {r1['fid']:.4f}" in out and res_file in out and r1["samples_dir"] in out
  assert header["identity"]["feature_net"]["name"] == "mnist" and header["identity"]["samples"]["sampling"][
      "method"] == "ddim"
  chunks = sorted(glob.glob(os.path.join(r1["samples_dir"], "samples_0_*.npz")))
  assert [os.path.basename(p) for p in chunks] == ["samples_0_0.npz", "samples_0_1.npz"]
  with np.load(chunks[1]) as z:
    assert z["images"].dtype == np.uint8 and z["images"].shape == (8, 28, 28, 1)
    assert z["features"].shape == (8, 128) and z["logits"].shape == (8, 10)
    assert z["rows"].tolist() == list(range(8, 16))
  (stats_file,) = glob.glob(os.path.join(ctx["stats"], "MNIST_train_mnist-*_28.npz"))
  with np.load(stats_file) as z:
    assert int(z["n"]) == NUM_DATA and z["mu"].shape == (128,) and z["sigma"].shape == (128, 128)
  with open(os.path.join(ctx["wd"], "eval", "logs", "metrics.jsonl")) as f:
    logged = json.loads(f.readlines()[-1])
  assert logged["step"] == 1 and logged["eval/fid"] == pytest.approx(r1["fid"]) and "eval/is" in logged
  assert glob.glob(os.path.join(ctx["wd"], "eval", "logs", "events.out.tfevents.*"))

  # The same run through a config file and --config.eval.* flags (the documented command line).
  mtimes = {p: os.stat(p).st_mtime_ns for p in chunks + [stats_file]}
  config_file = ctx["base"] / "config.py"
  config_file.write_text(CONFIG_FILE.format(seed=ctx["config"].seed, tfds=str(ctx["base"] / "tfds")))
  flags = [f"--config={config_file}"] + ["--config." + a for a in settings_args(ctx, ctx["nets"][0])[1::2]]
  with tfds.testing.mock_data(num_examples=NUM_DATA):
    assert evaluate(ctx, flags) == 0
  out = capsys.readouterr().out
  assert len(calls) == 2, "the rerun drew samples again"
  assert "reference statistics:" not in out and "2 of 2 sample chunks already in" in out, out
  assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes
  _, r2, n = last_result(res_file)
  assert n == 2 and r2["chunks_drawn"] == 0
  for k in ("fid", "kid", "kid_std", "is", "is_std", "nfe_mean"):   # exact: the same bytes, the same order
    assert r2[k] == r1[k], k


def test_other_feature_net_weights_get_their_own_statistics(ctx, monkeypatch, capsys):
  """Other classifier weights: a new statistics file (the old one is not reused), the samples are not
  redrawn but featurised again, the results go to another file."""
  calls = count_draws(monkeypatch)
  with tfds.testing.mock_data(num_examples=NUM_DATA):
    assert evaluate(ctx, settings_args(ctx, ctx["nets"][0])) == 0
    before, drawn = set(glob.glob(os.path.join(ctx["stats"], "*.npz"))), len(calls)
    capsys.readouterr()
    assert evaluate(ctx, settings_args(ctx, ctx["nets"][1])) == 0
    assert len(calls) == drawn, "other feature-net weights redrew the samples"
  out = capsys.readouterr().out
  after = set(glob.glob(os.path.join(ctx["stats"], "*.npz")))
  assert len(after - before) == 1 and "reference statistics:" in out
  files = sorted(glob.glob(os.path.join(ctx["wd"], "eval", "fid_step1_*.jsonl")), key=os.path.getmtime)
  _, r, _ = last_result(files[-1])
  assert len(files) >= 2 and r["chunks_drawn"] == 0 and r["chunks_featurised"] == 2 and np.isfinite(r["fid"])


@pytest.mark.parametrize("sets,match", [
    (["eval.feature_net=vgg"], "Unknown eval.feature_net 'vgg'"),
    (["eval.feature_net_path=/nonexistent/net.msgpack"], "/nonexistent/net.msgpack"),
    (["eval.num_samples=1"], "eval.num_samples must be >= 2"),
    (["eval.enable_bpd=True", "eval.ref_stats=/nonexistent/stats.npz"], "eval.ref_stats"),
])
def test_bad_settings_are_one_error_line_before_any_work(ctx, tmp_path, capsys, sets, match):
  """Exit 2, one `ERROR:` line naming the problem, and nothing written to the workdir (the bits/dim run,
  when enabled too, does not start)."""
  import shutil
  wd = str(tmp_path / "w")
  shutil.copytree(ctx["wd"], wd, ignore=shutil.ignore_patterns("eval"))
  local = dict(ctx, wd=wd)
  assert evaluate(local, settings_args(local, ctx["nets"][0], *sets)) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("ERROR: ") and match in err[0], err
  assert not os.path.exists(os.path.join(wd, "eval"))


def test_fid_of_the_dataset_against_itself_is_zero(ctx, tmp_path, monkeypatch):
  """The evaluator fed the reference split's own images as its "samples" (48 of them, 6 chunks, through
  the uint8 files) has the moments of the reference: FID = 0.  Tolerance 1e-6: the moments are bitwise
  equal (same uint8 images, same compiled feature program, same batches, same streaming order), so what
  remains is float64 round-off in tr Σ + tr Σ − 2 tr((Σ Σ)^1/2).  Σ is singular here (48 samples of
  128-d features), and the eigenvalues of Σ^1/2 Σ Σ^1/2 that should be 0 come out as ±1e-16·λ_max², whose
  square roots add ~1e-8·λ_max each: observed |FID| ≈ 2e-8 with tr Σ ≈ 0.8.  A wrong scaling of the
  samples or a row counted twice moves the FID by orders of magnitude more."""
  c = tiny_config(ctx["base"] / "tfds")
  with c.unlocked():
    c.eval.update(enable_sampling=True, num_samples=NUM_DATA, batch_size=8, feature_net="mnist",
                  feature_net_path=ctx["nets"][0], stats_dir=str(tmp_path / "stats"), is_splits=2,
                  kid_subset_size=8, kid_num_subsets=3)
  from score_sde_jax import datasets, models
  with tfds.testing.mock_data(num_examples=NUM_DATA):
    it = datasets.get_eval_iterator(c, "train", batch_size=8, process_count=1)
    batches = [it.batch_at(k)["image"] for k in range(len(it))]

    def fake_program(*a, **k):
      state = {"k": 0}

      def fn(params, key):
        state["k"] += 1
        return jnp.asarray(batches[state["k"] - 1]), jnp.asarray(0)
      return fn
    monkeypatch.setattr(draw, "draw_program", fake_program)
    mesh = parallel.make_mesh(jax.devices()[:1])
    net = feature_nets.load_feature_net(c)
    ev = sample_quality.SampleQualityEvaluator(c, sde_lib.sde_from_config(c), models.get_model(c), mesh, net,
                                               str(tmp_path / "samples"), report=lambda *_: None)
    r = ev.run({"params": {}}, 0, fingerprint="none")
  ref = ev.reference()
  assert r["num_samples"] == ref.n == NUM_DATA and r["chunks_drawn"] == 6
  assert abs(r["fid"]) <= 1e-6, r["fid"]
  assert abs(fid_lib.fid_from_stats((ref.mean, ref.cov), (ref.mean, ref.cov))) <= 1e-6


def test_feature_net_from_a_training_workdir(ctx, tmp_path):
  """eval.feature_net_path = a classifier's workdir: the EMA parameters of its newest checkpoint, read
  without its config, equal to what was saved; the workdir is left unchanged."""
  from score_sde_jax.run import checkpoint as ckpt_lib
  wd = str(tmp_path / "classifier")
  ema = mnist_features.init_mnist_classifier(jax.random.PRNGKey(int(np.random.default_rng().integers(1 << 30))))
  raw = jax.tree.map(lambda a: a + 1.0, ema)
  for step, tree in ((1, raw), (2, ema)):
    ck = ckpt_lib.Checkpointer(wd, async_save=False)
    ck.save(step, {"params": raw, "ema_params": tree, "step": jnp.asarray(step)},
            {"process_count": 1, "states": [None]}, wait=True)
    ck.close()
  listing = sorted(os.path.relpath(os.path.join(d, f), wd) for d, _, fs in os.walk(wd) for f in fs)
  c = tiny_config(tmp_path / "tfds")
  with c.unlocked():
    c.eval.update(feature_net="mnist", feature_net_path=wd)
  net = feature_nets.load_feature_net(c)
  assert net.source.endswith(os.path.join("checkpoints", "2"))
  for a, b in zip(jax.tree.leaves(net.variables), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert sorted(os.path.relpath(os.path.join(d, f), wd) for d, _, fs in os.walk(wd) for f in fs) == listing
  with c.unlocked():
    c.eval.feature_net_path = str(tmp_path / "empty")
  os.makedirs(c.eval.feature_net_path)
  with pytest.raises(eval_settings.EvalError, match="neither a .msgpack file nor a training workdir"):
    feature_nets.load_feature_net(c)


def test_inception_dispatch_weights_file_and_reference_files(ctx, tmp_path, monkeypatch):
  """'inception': a missing weights file is a clear error saying where to get it; with weights (random, the
  fixture's recipe) the features are pool_3 (2048) and logits (1008), on 4 images only (slow on CPU).
  eval.ref_stats: the official pool_3 format gives FID and KID, pytorch-fid's mu/sigma FID only; statistics
  of another dimension are refused."""
  from score_sde_jax.metrics import inception
  c = tiny_config(tmp_path / "tfds")
  monkeypatch.setenv(inception.INCEPTION_ENV, str(tmp_path / "absent.pth"))
  with pytest.raises(eval_settings.EvalError, match="pt_inception-2015-12-05-6726825d.pth"):
    feature_nets.load_feature_net(c)

  spec = importlib.util.spec_from_file_location("_sq_fixture", os.path.join(REPO, "tests", "data",
                                                                          "make_inception_fixture.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  fx = np.load(os.path.join(REPO, "tests", "data", "inception_fixture.npz"))
  sd = script.random_state_dict([str(n) for n in fx["names"]], json.loads(str(fx["shapes"])), int(fx["seed"]))
  variables = inception.fid_inception_variables(sd)
  monkeypatch.setattr(inception, "load_fid_inception", lambda path=None: variables)
  net = feature_nets.load_feature_net(c)
  assert net.name == "inception"
  mesh = parallel.make_mesh(jax.devices()[:1])
  images = np.random.default_rng().integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
  f, logits = feature_nets.features_program(net, mesh)(variables, images)
  assert f.shape == (4, 2048) and logits.shape == (4, 1008) and np.isfinite(np.asarray(f)).all()

  rng = np.random.default_rng()
  feats = rng.normal(size=(30, 2048)).astype(np.float32)
  official = str(tmp_path / "official.npz")
  np.savez(official, pool_3=feats)
  pytorch_fid = str(tmp_path / "pytorch_fid.npz")
  fid_lib.save_stats(pytorch_fid, feats.mean(0), np.cov(feats, rowvar=False))
  s = eval_settings.sample_quality_settings(c)
  for path, has_kept in ((official, True), (pytorch_fid, False)):
    s.ref_stats = path
    ref = feature_nets.reference_stats(c, net, s)
    np.testing.assert_allclose(ref.mean, feats.mean(0), rtol=0, atol=1e-6)
    assert (ref.kept is not None) == has_kept
  with c.unlocked():
    c.eval.update(feature_net="mnist", feature_net_path=ctx["nets"][0])
  with pytest.raises(eval_settings.EvalError, match="2048-d features"):
    feature_nets.reference_stats(c, feature_nets.load_feature_net(c), s)


def test_feature_net_trained_by_the_project_trainer(tmp_path):
  """configs/mnist/feature_net.py trained for 2 steps (mocked data): its workdir is a feature net whose
  variables are exactly the EMA parameters that the trainer's own restore gives (same fingerprint)."""
  from score_sde_jax import checkpoints
  from score_sde_jax.run import restore
  spec = importlib.util.spec_from_file_location("_sq_feature_net", os.path.join(REPO, "configs", "mnist",
                                                                              "feature_net.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.seed = int(np.random.default_rng().integers(1 << 20))
  t = c.training
  t.n_iters, t.batch_size, t.snapshot_freq, t.snapshot_freq_for_preemption, t.log_freq = 2, 8, 2, 2, 1
  c.eval.batch_size = 8
  c.data.tfds_data_dir = str(tmp_path / "tfds")
  wd = str(tmp_path / "fnet")
  with tfds.testing.mock_data(num_examples=16):
    train_lib.train(c, wd, devices=jax.devices()[:1], progress=False, report=lambda *_: None,
                    async_checkpoint=False, handle_signals=False)
  _, state = restore.restore_state(c, wd)
  with c.unlocked():
    c.eval.update(feature_net="mnist", feature_net_path=wd)
  net = feature_nets.load_feature_net(c)
  assert net.fingerprint == checkpoints.fingerprint(parallel.tree_to_host(state.ema_params))
  f, logits = feature_nets.features_program(net, parallel.make_mesh(jax.devices()[:1]))(
      net.variables, np.zeros((2, 28, 28, 1), np.uint8))
  assert f.shape == (2, 128) and logits.shape == (2, 10)

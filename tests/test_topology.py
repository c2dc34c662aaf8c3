"""Checkpoints move between topologies: 8 → 1 and 1 → 8 devices for sampling, evaluation and resuming
training, and reading never modifies the checkpoint folder.

One workdir (module fixture, built once even under xdist): `configs/toy/ve_ring8.py` shrunk to a width-16
MLP, trained to step 8 on 1 device and resumed to step 16 on 8 devices (the issue's case: the newest
checkpoint was written by another topology than the one that reads it).  The scripts run in
subprocesses with XLA_FLAGS device counts.  What is bit-identical and what is not: `run/restore.py`.
"""
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "toy", "ve_ring8.py")
OVERRIDES = ["--config.training.batch_size=32", "--config.model.nf=16", "--config.model.num_layers=1",
             "--config.model.num_scales=20", "--config.data.num_train=512", "--config.data.num_test=32",
             "--config.eval.batch_size=32", "--config.training.snapshot_freq=8",
             "--config.training.snapshot_freq_for_preemption=4", "--config.training.log_freq=4",
             "--config.training.snapshot_sampling=False", "--config.eval.enable_loss=False",
             "--config.sampling.num_samples=40", "--config.eval.rtol=1e-3", "--config.eval.atol=1e-3"]


def config():
  """The config of OVERRIDES, in-process."""
  from score_sde_jax.config_defaults import toy_config
  c = toy_config("vesde", "ring8")
  for o in OVERRIDES:
    key, value = o[len("--config."):].split("=")
    node = c
    *parents, leaf = key.split(".")
    for k in parents:
      node = node[k]
    node[leaf] = type(node[leaf])(float(value)) if not isinstance(node[leaf], bool) else value == "True"
  return c


def run_script(args, devices, timeout=300, env=None):
  """`python scripts/<args>` on `devices` simulated CPU devices (one process)."""
  e = dict(os.environ)   # with the suite's shared compilation cache (tests/conftest.py)
  e["XLA_FLAGS"] = " ".join([f for f in e.get("XLA_FLAGS", "").split()
                             if not f.startswith("--xla_force_host_platform_device_count")]
                            + [f"--xla_force_host_platform_device_count={devices}"])
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
  e.update(env or {})
  r = subprocess.run([sys.executable] + list(args), capture_output=True, text=True, timeout=timeout, env=e,
                     cwd=REPO)
  return r


def ok(r):
  assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
  return r


@contextlib.contextmanager
def _locked(path):
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def shared_dir(tmp_path_factory, name, build):
  """A directory built once per test session, also when xdist runs the tests in several workers."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  d = root / name
  with _locked(str(root / f"{name}.lock")):
    if not (d / ".built").exists():
      if d.exists():
        shutil.rmtree(d)
      d.mkdir()
      build(d)
      (d / ".built").write_text("")
  return d


def tree(path):
  """{relative path: (size, mtime_ns)} of every file and directory under `path`."""
  out = {}
  for root, dirs, files in os.walk(path):
    for n in dirs + files:
      p = os.path.join(root, n)
      st = os.stat(p)
      out[os.path.relpath(p, path)] = (st.st_size if n in files else 0, st.st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
  """A workdir trained to step 8 on 1 device, then resumed to step 16 on 8 devices."""
  def build(d):
    work = d / "work"
    train = ["scripts/train.py", f"--config={CONFIG}", f"--workdir={work}", "--noprogress", "--notoy_report"]
    r = ok(run_script(train + OVERRIDES + ["--config.training.n_iters=8"], devices=1))
    assert "Training from scratch" in r.stdout and "on 1 device(s)" in r.stdout
    r = ok(run_script(train + OVERRIDES + ["--config.training.n_iters=16"], devices=8))   # 1 → 8
    assert "Resuming from step 8" in r.stdout, r.stdout
    assert "written on 1 device(s) / 1 host(s); this run has 8 / 1" in r.stdout, r.stdout

  d = shared_dir(tmp_path_factory, "topology_mixed", build)
  work = d / "work"
  assert sorted(int(s) for s in os.listdir(work / "checkpoints") if s.isdigit()) == [8, 16]
  return work


def test_sample_on_any_device_count(mixed, tmp_path):
  """Step 16 (written on 8 devices) samples on 1 device and on 8 with the same result (to float rounding);
  step 8 (written on 1 device) samples on 8.  Nothing under checkpoints/ changes."""
  before = tree(mixed / "checkpoints")
  args = ["scripts/sample.py", f"--workdir={mixed}", "--num_samples=40", "--batch_size=24", "--noprogress"]
  r1 = ok(run_script(args + [f"--out={tmp_path / 's1.npz'}"], devices=1))          # 8 → 1
  r8 = ok(run_script(args + [f"--out={tmp_path / 's8.npz'}"], devices=8))          # same step, 8 devices
  r8b = ok(run_script(args + ["--step=8", f"--out={tmp_path / 's8_step8.npz'}"], devices=8))   # 1 → 8
  for r in (r1, r8, r8b):
    assert "skipping checkpoint" not in r.stdout + r.stderr, r.stdout + r.stderr
  a, b, c = (np.load(tmp_path / n) for n in ("s1.npz", "s8.npz", "s8_step8.npz"))
  assert int(a["step"]) == int(b["step"]) == 16 and int(c["step"]) == 8
  assert a["samples"].shape == b["samples"].shape == c["samples"].shape == (40, 2)
  assert np.all(np.isfinite(a["samples"])) and np.all(np.isfinite(c["samples"]))
  assert str(a["fingerprint"]) == str(b["fingerprint"])      # the very same weights
  diff = float(np.max(np.abs(a["samples"] - b["samples"])))
  print(f"samples of step 16, 1 vs 8 devices: max abs difference {diff:.3g}")
  # The same noise; the Langevin corrector's batch-mean step size is summed in another order (measured
  # 4e-5 after 40 network evaluations).
  assert diff <= 1e-3
  assert tree(mixed / "checkpoints") == before
  assert not (mixed / "checkpoints_unreadable").exists()


def test_evaluate_on_any_device_count(mixed, tmp_path):
  """evaluate.py reads step 16 (written on 8 devices) on 1 device and step 8 (written on 1 device) on 8
  devices; step 8's NLL equals the one computed on 1 device; nothing under checkpoints/ changes."""
  before = tree(mixed / "checkpoints")
  nll = {}
  for devices, step in ((1, 16), (8, 8)):
    w = tmp_path / f"out_{devices}_{step}"
    ok(run_script(["scripts/evaluate.py", f"--config={CONFIG}"] + OVERRIDES + [
        f"--checkpoint={mixed}/checkpoints/{step}", f"--workdir={w}", "--nobound", "--noprogress"],
        devices=devices))
    summaries = [f for f in os.listdir(w / "eval") if f.endswith(".summary.json")]
    assert len(summaries) == 1
    s = json.load(open(w / "eval" / summaries[0]))
    assert s["step"] == step and s["num_examples"] == 32
    nll[(devices, step)] = s["nll_nats_per_dim"]
  nll[(1, 8)] = _nll_step8_one_device(mixed, tmp_path)
  print("NLL (nats/dim) by (devices, step):", nll)
  assert np.isfinite(nll[(1, 16)])
  # Exact divergence (no noise); the adaptive solver's error norm is reduced over the devices in
  # another order (measured: equal to 4 decimals).
  assert abs(nll[(8, 8)] - nll[(1, 8)]) <= 2e-3
  assert tree(mixed / "checkpoints") == before


def _nll_step8_one_device(mixed, tmp_path):
  """Step 8 on 1 device, in-process (the pytest process has 4 devices: use the first)."""
  from score_sde_jax import checkpoints, evaluation
  c = config()
  pre = checkpoints.read_pretrained(str(mixed / "checkpoints" / "8"), c)
  (s,) = evaluation.evaluate_likelihood(c, str(tmp_path / "inproc"), devices=jax.devices()[:1], bound=False,
                                        pretrained=pre, report=lambda *_: None)
  return s["nll_nats_per_dim"]


def test_resume_on_another_device_count_follows_the_uninterrupted_run(mixed, tmp_path):
  """1 device (steps 1-8) → 8 devices (9-16) → 1 device (17-24) ends where a 24-step run on 1 device
  ends: step and PRNG key bit for bit, parameters, EMA and optimiser state to float rounding."""
  from score_sde_jax.run import parallel, restore
  work = tmp_path / "work"
  shutil.copytree(mixed, work, ignore=shutil.ignore_patterns("eval", "samples"))
  train = ["scripts/train.py", f"--config={CONFIG}", "--noprogress", "--notoy_report"] + OVERRIDES + [
      "--config.training.n_iters=24"]
  r = ok(run_script(train + [f"--workdir={work}"], devices=1))      # 8 → 1
  assert "Resuming from step 16" in r.stdout
  assert "written on 8 device(s) / 1 host(s); this run has 1 / 1" in r.stdout, r.stdout
  ok(run_script(train + [f"--workdir={tmp_path / 'ref'}"], devices=1))
  c = config()
  mesh = parallel.make_mesh(jax.devices()[:1])
  s_a, a = restore.restore_state(c, str(work), mesh=mesh)
  s_b, b = restore.restore_state(c, str(tmp_path / "ref"), mesh=mesh)
  assert s_a == s_b == 24 and int(a.step) == int(b.step) == 24
  np.testing.assert_array_equal(np.asarray(a.rng), np.asarray(b.rng))
  worst = 0.0
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path((a.params, a.ema_params, a.opt_state)),
                          jax.tree_util.tree_leaves((b.params, b.ema_params, b.opt_state))):
    x, y = np.asarray(x), np.asarray(y)
    if np.issubdtype(x.dtype, np.floating):
      worst = max(worst, float(np.max(np.abs(x - y), initial=0.0)))
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  print(f"1→8→1 devices vs 1 device, 24 steps: max abs difference of the state {worst:.3g}")


def test_restored_state_is_bit_identical_on_any_mesh(mixed):
  """The same checkpoint (written on 8 devices) restored onto 1 and onto 4 devices: equal bit for bit,
  replicated over the requested mesh."""
  from score_sde_jax.run import parallel, restore
  c = config()
  out = {}
  for n in (1, 4):
    mesh = parallel.make_mesh(jax.devices()[:n])
    step, state = restore.restore_state(c, str(mixed), mesh=mesh)
    assert step == 16
    leaf = jax.tree_util.tree_leaves(state.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == n
    out[n] = jax.tree_util.tree_leaves(jax.device_get(state))
  for x, y in zip(out[1], out[4]):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_data_state_of_any_host_count():
  """The iterator state is global: what n hosts saved resumes on any number of hosts."""
  from score_sde_jax.run import checkpoint as ckpt_lib
  s = {"step": 7, "seed": 3, "dataset": "ring8", "global_batch_size": 32, "num_examples": 512}
  saved = {"process_count": 4, "states": [dict(s) for _ in range(4)], "num_devices": 32}
  assert ckpt_lib.decode_data_state(saved) == s                        # 4 hosts → this 1
  assert ckpt_lib.saved_topology(saved) == (4, 32)
  assert ckpt_lib.decode_data_state(ckpt_lib.encode_data_states(s, num_devices=1)) == s
  assert ckpt_lib.decode_data_state(ckpt_lib.converted_data_state("x")) is None
  per_host = {"process_count": 2, "states": [dict(s, step=1), dict(s, step=2)]}
  with pytest.raises(ValueError, match="written by 2 hosts whose data-iterator states differ"):
    ckpt_lib.decode_data_state(per_host)


def test_unreadable_checkpoint_is_skipped_by_readers_and_moved_only_by_training(mixed, tmp_path, capsys):
  """Step 16's array files cut in half: reading (load_pretrained, as sample.py does, and evaluate.py) skips
  it with one line naming it and the reason, uses step 8 and changes nothing under checkpoints/; training
  then moves it aside and says so."""
  from score_sde_jax import checkpoints
  from score_sde_jax import train as train_lib
  work = tmp_path / "work"
  shutil.copytree(mixed, work, ignore=shutil.ignore_patterns("eval", "samples"))
  files = [os.path.join(r, n) for r, _, ns in os.walk(work / "checkpoints" / "16" / "state")
           if os.path.basename(r) == "d" for n in ns]
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  before = tree(work)
  c = config()
  capsys.readouterr()
  pre = checkpoints.read_pretrained(str(work), c)
  lines = [ln for ln in capsys.readouterr().out.splitlines() if "skipping" in ln]
  assert pre.step == 8
  assert len(lines) == 1 and f"{work}/checkpoints/16 (step 16)" in lines[0] and "Error" in lines[0], lines
  assert tree(work) == before
  # evaluate.py --checkpoints=latest (the default) likewise: one line, step 8, nothing moved.
  r = ok(run_script(["scripts/evaluate.py", f"--workdir={work}", f"--config={CONFIG}"] + OVERRIDES + [
      "--nobound", "--noprogress", "--max_examples=8"], devices=1))
  lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "skipping" in ln]
  assert len(lines) == 1 and "(step 16)" in lines[0], r.stdout + r.stderr[-3000:]
  assert "step 8, split 'test'" in r.stdout and "Event loop is closed" not in r.stderr, r.stderr[-3000:]
  assert tree(work / "checkpoints") == {k[len("checkpoints/"):]: v for k, v in before.items()
                                        if k.startswith("checkpoints/")}
  messages = []
  c.training.n_iters = 16
  r = train_lib.train(c, str(work), devices=jax.devices()[:1], progress=False, report=messages.append)
  assert r.resumed_from == 8 and r.step == 16
  text = "\n".join(messages)
  assert "Training moved the unreadable checkpoint of step 16" in text, text
  assert len(os.listdir(work / "checkpoints_unreadable")) == 1

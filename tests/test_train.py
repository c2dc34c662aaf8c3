"""Training system: kill/resume bit-identity, 1 vs 4 devices, NaN guard, corrupt-checkpoint fallback,
config checks, SIGTERM checkpoint, logs.

Tiny toy runs (MLP width 16, batch 16, a few dozen steps).  The fault tests run training in
subprocesses (`python tests/test_train.py run ...`, see `_main` at the bottom) so that a SIGKILL really
kills a process mid-run.
"""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from score_sde_jax import config_defaults
from score_sde_jax import train as train_lib
from score_sde_jax.run import checkpoint as ckpt_lib
from score_sde_jax.run import config_utils
from score_sde_jax.run import metric_writer
from score_sde_jax.train import loop

HERE = os.path.abspath(__file__)


def tiny_config(n_iters=30, sde="vesde"):
  c = config_defaults.toy_config(sde, "ring8")
  c.seed = 3
  t = c.training
  t.batch_size = 16
  t.n_iters = n_iters
  t.snapshot_freq = 10
  t.snapshot_freq_for_preemption = 4
  t.log_freq = 5
  t.snapshot_sampling = False
  c.eval.enable_loss = False
  c.eval.batch_size = 64
  c.data.num_train = 512
  c.data.num_test = 128
  c.model.nf = 16
  c.model.num_layers = 1
  c.model.num_scales = 50
  c.optim.warmup = 5
  c.sampling.num_samples = 16
  return c


def _params_flat(state):
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state))
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def _run_sub(workdir, n_iters, *, kill_at=None, term_at=None, out=None, timeout=240):
  cmd = [sys.executable, HERE, "run", str(workdir), str(n_iters)]
  if kill_at is not None:
    cmd += ["--kill_at", str(kill_at)]
  if term_at is not None:
    cmd += ["--term_at", str(term_at)]
  if out is not None:
    cmd += ["--out", str(out)]
  env = dict(os.environ)   # with the suite's shared compilation cache (tests/conftest.py)
  env["PYTHONPATH"] = os.path.dirname(os.path.dirname(HERE)) + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """Final state of an uninterrupted 30-step run (subprocess, one device)."""
  d = tmp_path_factory.mktemp("uninterrupted")
  out = d / "final.npz"
  r = _run_sub(d / "work", 30, out=out)
  assert r.returncode == 0, r.stderr[-3000:]
  return dict(np.load(out))


# ---------------------------------------------------------------------------------------------------
# Step and state


def test_train_step_is_pure_and_reports_metrics():
  c = tiny_config()
  from score_sde_jax import models, sde as sde_lib
  model = models.get_model(c)
  sde = sde_lib.sde_from_config(c)
  state = jax.jit(lambda k: train_lib.create_train_state(c, model, k, (16, 2)))(jax.random.PRNGKey(0))
  step = jax.jit(train_lib.make_train_step(c, sde, model))
  batch = {"image": np.random.RandomState(0).randn(16, 2).astype(np.float32)}
  s1, m1 = step(state, batch)
  s2, m2 = step(state, batch)
  assert set(m1) >= {"loss", "grad_norm", "lr"}
  np.testing.assert_array_equal(m1["loss"], m2["loss"])
  assert int(s1.step) == 1 and float(m1["lr"]) == pytest.approx(c.optim.lr / c.optim.warmup)
  assert not np.array_equal(np.asarray(s1.rng), np.asarray(state.rng))
  # An explicit key gives the same result as the key the state would have split off.
  _, key = jax.random.split(state.rng)
  s3, m3 = step(state, batch, key)
  np.testing.assert_array_equal(m3["loss"], m1["loss"])
  np.testing.assert_array_equal(np.asarray(s3.rng), np.asarray(state.rng))
  # EMA moved towards the new parameters by (1 - ema_rate).
  p0 = jax.tree_util.tree_leaves(state.params)[0]
  p1 = jax.tree_util.tree_leaves(s1.params)[0]
  e1 = jax.tree_util.tree_leaves(s1.ema_params)[0]
  np.testing.assert_allclose(e1, c.model.ema_rate * p0 + (1 - c.model.ema_rate) * p1, rtol=1e-6,
                             atol=1e-7)


def test_loop_with_n_jitted_steps_matches_single_steps(tmp_path):
  """training.n_jitted_steps=4 (4 steps per compiled lax.scan) follows the single-step run."""
  c = tiny_config(n_iters=12)
  c.training.log_freq = 4
  c.training.snapshot_freq = 12
  r1 = train_lib.train(c, str(tmp_path / "a"), devices=jax.devices()[:1], progress=False,
                       keep_history=True, report=lambda *_: None)
  c.training.n_jitted_steps = 4
  r4 = train_lib.train(c, str(tmp_path / "b"), devices=jax.devices()[:1], progress=False,
                       keep_history=True, report=lambda *_: None)
  assert [h["step"] for h in r4.history] == list(range(1, 13))
  np.testing.assert_allclose([h["loss"] for h in r4.history], [h["loss"] for h in r1.history],
                             rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(r4.state.params), jax.tree_util.tree_leaves(r1.state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Devices


def test_one_vs_four_devices_same_losses_and_params(tmp_path):
  devices = jax.devices()
  if len(devices) < 4:
    pytest.skip("needs 4 (simulated) devices")
  c = tiny_config(n_iters=12)
  c.training.snapshot_freq = c.training.snapshot_freq_for_preemption = 12
  r1 = train_lib.train(c, str(tmp_path / "d1"), devices=devices[:1], progress=False, keep_history=True,
                       report=lambda *_: None)
  r4 = train_lib.train(c, str(tmp_path / "d4"), devices=devices[:4], progress=False, keep_history=True,
                       report=lambda *_: None)
  l1 = np.array([h["loss"] for h in r1.history])
  l4 = np.array([h["loss"] for h in r4.history])
  assert len(l1) == len(l4) == 12
  rel = np.max(np.abs(l1 - l4) / np.abs(l1))
  print(f"1 vs 4 devices: max relative loss difference {rel:.3g}")
  assert rel <= 1e-6
  p1, p4 = _params_flat(r1.state.params), _params_flat(r4.state.params)
  worst = max(float(np.max(np.abs(p1[k] - p4[k]))) for k in p1)
  print(f"1 vs 4 devices: max absolute parameter difference {worst:.3g}")
  for k in p1:
    np.testing.assert_allclose(p4[k], p1[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # The 4-device state is replicated over the 4-device mesh.
  leaf = jax.tree_util.tree_leaves(r4.state.params)[0]
  assert len(leaf.sharding.device_set) == 4 and leaf.sharding.is_fully_replicated


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 (simulated) devices")
  c = tiny_config()
  c.training.batch_size = 18
  with pytest.raises(train_lib.ConfigError, match=r"training.batch_size=18 does not divide by the "
                                                  r"number of devices \(4\)"):
    train_lib.train(c, str(tmp_path / "w"), progress=False)
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


# ---------------------------------------------------------------------------------------------------
# Faults


def test_kill_and_resume_is_bit_identical(tmp_path, uninterrupted):
  """A 30-step run is stopped three times and resumed each time: SIGKILL at step 6, SIGTERM at step 13
  (which must checkpoint step 13 before exiting), SIGKILL at step 22 (two steps after an asynchronous
  save began).  The final state (params, EMA, optimiser state, step, PRNG key) equals the uninterrupted
  run's bit for bit."""
  work = tmp_path / "work"
  resumed = []
  for k, how in ((6, "kill"), (13, "term"), (22, "kill")):
    if how == "kill":
      r = _run_sub(work, 30, kill_at=k)
      assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    else:
      r = _run_sub(work, 30, term_at=k)
      assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr[-3000:])
      assert f"Received SIGTERM: saved a checkpoint at step {k}" in r.stdout + r.stderr
      ck = ckpt_lib.Checkpointer(str(work))
      assert k in ck.all_steps()
      ck.close()
    resumed.append([ln.split(" (")[0] for ln in r.stdout.splitlines() if ln.startswith("Resuming")])
  out = tmp_path / "final.npz"
  r = _run_sub(work, 30, out=out)
  assert r.returncode == 0, r.stderr[-3000:]
  resumed.append([ln.split(" (")[0] for ln in r.stdout.splitlines() if ln.startswith("Resuming")])
  print("resume points of the 4 runs:", resumed)
  assert resumed[0] == []
  assert resumed[2] == ["Resuming from step 13"]   # the SIGTERM checkpoint
  assert len(resumed[3]) == 1
  final = dict(np.load(out))
  assert set(final) == set(uninterrupted)
  for k in uninterrupted:
    np.testing.assert_array_equal(final[k], uninterrupted[k], err_msg=k)


def test_nan_loss_stops_before_saving(tmp_path, monkeypatch):
  bad_step = 10
  real_open = loop.open_train_iterator

  class Poisoned:
    def __init__(self, it):
      self.it, self.n = it, 0

    def __iter__(self):
      return self

    def __next__(self):
      b = dict(next(self.it))
      self.n += 1
      if self.n == bad_step:   # the n-th batch fetched is the batch of step n
        b["image"] = np.full_like(np.asarray(b["image"]), np.nan)
      return b

    def get_state(self):
      return self.it.get_state()

    def set_state(self, s):
      self.it.set_state(s)

  monkeypatch.setattr(loop, "open_train_iterator", lambda *a, **k: Poisoned(real_open(*a, **k)))
  c = tiny_config(n_iters=20)
  work = str(tmp_path / "w")
  with pytest.raises(train_lib.NonFiniteLossError, match=r"at step 10: stopping before saving anything; "
                                                         r"the last good checkpoint, step 8"):
    train_lib.train(c, work, devices=jax.devices()[:1], progress=False, report=lambda *_: None)
  ck = ckpt_lib.Checkpointer(work)
  assert max(ck.all_steps()) == 8
  abstract = _abstract_state(c)
  step, state, _ = ck.restore_latest(abstract, check=ckpt_lib.check_finite_state)
  ck.close()
  assert step == 8 and int(state.step) == 8


def _abstract_state(c):
  from score_sde_jax import models
  model = models.get_model(c)
  return jax.eval_shape(lambda k: train_lib.create_train_state(c, model, k, (1, 2)),
                        jax.random.PRNGKey(0))


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path):
  c = tiny_config(n_iters=10)
  c.training.snapshot_freq = 5
  c.training.snapshot_freq_for_preemption = 5
  work = str(tmp_path / "w")
  train_lib.train(c, work, devices=jax.devices()[:1], progress=False, report=lambda *_: None)
  ck_dir = os.path.join(work, "checkpoints")
  assert sorted(os.listdir(ck_dir)) == ["10", "5"]
  # A partially written checkpoint: truncate the array data files (OCDBT `d/` files) of step 10 to
  # half their size.  (Truncating one file is not always noticed: not every data file is read when
  # restoring with a target, e.g. superseded OCDBT leftovers.)
  files = []
  for root, _, names in os.walk(os.path.join(ck_dir, "10", "state")):
    if os.path.basename(root) == "d":
      files += [os.path.join(root, n) for n in names]
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  messages = []
  c.training.n_iters = 12
  r = train_lib.train(c, work, devices=jax.devices()[:1], progress=False, report=messages.append)
  assert r.resumed_from == 5 and r.step == 12
  assert [s for s, _ in r.skipped_checkpoints] == [10]
  text = "\n".join(messages)
  assert "skipping checkpoint" in text and "(step 10)" in text, text
  # The unreadable checkpoint was moved aside and step 10 was written again.
  assert len(os.listdir(os.path.join(work, "checkpoints_unreadable"))) == 1
  assert sorted(int(s) for s in os.listdir(ck_dir) if s.isdigit()) == [5, 10, 12]
  ck = ckpt_lib.Checkpointer(work)
  step, state, _ = ck.restore_latest(_abstract_state(c))
  ck.close()
  assert step == 12 and int(state.step) == 12


def test_checkpoint_of_an_earlier_data_order_resumes_with_a_note(tmp_path, monkeypatch):
  """A checkpoint whose data position was saved before Grain's sampler (its iterator state has no 'order')
  still restores and resumes at its step; the run says the rest of the epoch is drawn in the new order,
  and the checkpoints it writes name the new order."""
  from score_sde_jax.datasets import iterators
  current = iterators.TrainIterator.get_state
  monkeypatch.setattr(iterators.TrainIterator, "get_state",
                      lambda self: {k: v for k, v in current(self).items() if k != "order"})
  c = tiny_config(n_iters=8)
  work = str(tmp_path / "w")
  train_lib.train(c, work, devices=jax.devices()[:1], progress=False, report=lambda *_: None)
  monkeypatch.undo()
  messages = []
  c.training.n_iters = 12
  r = train_lib.train(c, work, devices=jax.devices()[:1], progress=False, report=messages.append)
  assert r.resumed_from == 8 and r.step == 12
  text = "\n".join(messages)
  assert "Checkpoint 8: The data position was saved in the order of the SplitMix64" in text, text
  assert f"global batch 8 in the order of {iterators.ORDER}" in text, text
  ck = ckpt_lib.Checkpointer(work)
  step, _, data = ck.restore_latest(_abstract_state(c))
  ck.close()
  assert step == 12 and ckpt_lib.decode_data_state(data)["order"] == iterators.ORDER


# ---------------------------------------------------------------------------------------------------
# Config checks


def test_resume_refuses_changed_model_and_lists_differences(tmp_path):
  c = tiny_config(n_iters=4)
  work = str(tmp_path / "w")
  train_lib.train(c, work, devices=jax.devices()[:1], progress=False, report=lambda *_: None)
  c2 = tiny_config(n_iters=8)
  c2.model.nf = 32
  c2.optim.lr = 1e-3
  with pytest.raises(train_lib.ConfigError) as e:
    train_lib.train(c2, work, devices=jax.devices()[:1], progress=False, report=lambda *_: None)
  msg = str(e.value)
  assert "model.nf: saved 16 -> now 32" in msg and "optim.lr" in msg and "--force_resume" in msg
  # Schedule-only changes resume; an optimiser change resumes when forced.
  c3 = tiny_config(n_iters=8)
  c3.optim.lr = 1e-3
  r = train_lib.train(c3, work, devices=jax.devices()[:1], progress=False, force_resume=True,
                      report=lambda *_: None)
  assert r.resumed_from == 4 and r.step == 8


def test_unknown_keys_and_wrong_types_are_reported_before_compiling(tmp_path):
  c = tiny_config()
  with c.unlocked():
    c.training.batchsize = 8
    c.optim.lrr = 1.0
    del c.training["n_iters"]        # as a config file that writes n_iters = "10" would have it
    c.training.n_iters = "10"
  with pytest.raises(train_lib.ConfigError) as e:
    train_lib.train(c, str(tmp_path / "w"), progress=False)
  msg = str(e.value)
  assert "unknown config key 'training.batchsize'; did you mean 'training.batch_size'?" in msg
  assert "'optim.lrr'" in msg
  assert "training.n_iters='10' has type str; expected int" in msg
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_missing_data_is_a_clear_error(tmp_path):
  c = tiny_config()
  c.data.dataset = "CIFAR10"
  c.data.image_size = 32
  c.data.num_channels = 3
  c.data.tfds_data_dir = str(tmp_path / "no_data_here")
  with pytest.raises(train_lib.ConfigError, match="Cannot open the training data for "
                                                  "data.dataset='CIFAR10'"):
    train_lib.train(c, str(tmp_path / "w"), devices=jax.devices()[:1], progress=False)


# ---------------------------------------------------------------------------------------------------
# What a user sees


def test_logs_snapshots_and_final_message(tmp_path):
  c = tiny_config(n_iters=10)
  c.training.snapshot_freq = 10
  c.training.snapshot_sampling = True
  c.training.eval_freq = 5
  c.eval.enable_loss = True
  c.sampling.method = "pc"
  c.sampling.corrector = "none"
  messages = []
  work = str(tmp_path / "w")
  r = train_lib.train(c, work, devices=jax.devices()[:1], progress=False, report=messages.append)
  events = [f for f in os.listdir(r.log_dir) if f.startswith("events.out.tfevents")]
  assert len(events) == 1
  scalars = metric_writer.read_scalars(os.path.join(r.log_dir, events[0]))
  tags = {t for _, t, _ in scalars}
  assert {"train/loss", "train/lr", "train/grad_norm", "train/steps_per_sec", "eval/loss",
          "eval/batch_loss"} <= tags
  assert sorted(s for s, t, _ in scalars if t == "eval/batch_loss") == [5, 10]
  assert os.path.exists(os.path.join(r.sample_dir, "samples_00000010.png"))
  assert os.path.exists(os.path.join(r.sample_dir, "score_field_00000010.png"))
  assert r.last_samples.shape == (16, 2)
  assert any(m.startswith("Done: 10 steps. Checkpoints: ") for m in messages)
  saved = json.load(open(os.path.join(work, "config.json")))
  assert saved["model"]["nf"] == 16
  # Running again on a finished workdir resumes at the end and does nothing more.
  r2 = train_lib.train(c, work, devices=jax.devices()[:1], progress=False, report=lambda *_: None)
  assert r2.resumed_from == 10 and r2.step == 10


def test_config_differences_ignores_schedule_fields():
  a = config_utils.to_jsonable(tiny_config(n_iters=10))
  b = tiny_config(n_iters=50)
  b.training.log_freq = 7
  b.sampling.num_samples = 99
  assert config_utils.config_differences(a, b) == []


# ---------------------------------------------------------------------------------------------------
# Subprocess entry point for the fault tests.


def _main(argv):
  import argparse
  p = argparse.ArgumentParser()
  p.add_argument("cmd")
  p.add_argument("workdir")
  p.add_argument("n_iters", type=int)
  p.add_argument("--kill_at", type=int)
  p.add_argument("--term_at", type=int)
  p.add_argument("--out")
  a = p.parse_args(argv)

  def on_step(step):
    if a.kill_at is not None and step == a.kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    if a.term_at is not None and step == a.term_at:
      os.kill(os.getpid(), signal.SIGTERM)

  r = train_lib.train(tiny_config(a.n_iters), a.workdir, devices=jax.devices()[:1], progress=False,
                      on_step=on_step)
  if r.preempted:
    sys.stdout.flush()
    sys.exit(128 + int(r.signal))
  if a.out:
    flat = _params_flat({"params": r.state.params, "ema": r.state.ema_params,
                         "opt": r.state.opt_state, "step": r.state.step, "rng": r.state.rng})
    np.savez(a.out, **flat)


if __name__ == "__main__":
  _main(sys.argv[1:])

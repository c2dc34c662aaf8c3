"""Reliability: nothing lost, no floods, one training per workdir, readers that never write.

* an unreadable newest checkpoint is replaced when training reaches its step again (never left as the
  newest one of a run that says "Done"), and `save` replaces an unreadable checkpoint of the same step;
* a failed `--force_resume` writes nothing (not even config.json);
* one training per workdir: the second is refused naming the holder; a SIGKILLed holder's lock is free;
* a disk-full / permission-denied save stops the run with one line, the previous checkpoint intact and
  the detail (orbax's tracebacks included) in <workdir>/logs/errors.log;
* readers never move checkpoints nor clean orbax's temporary directories (a running training's save);
* snapshot samples from the raw weights (`training.snapshot_weights`), and one line when young EMA
  weights are sampled.

Tiny toy runs (MLP width 8, batch 16, a few steps), in-process.
"""
import errno
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from score_sde_jax import config_defaults
from score_sde_jax import train as train_lib
from score_sde_jax.run import checkpoint as ckpt_lib
from score_sde_jax.train import lock as lock_lib

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_bad_inputs import tree_state  # noqa: E402

CONFIG_FILE = '''
from score_sde_jax import config_defaults

def get_config():
  c = config_defaults.toy_config("vesde", "ring8")
  t = c.training
  t.batch_size, t.n_iters, t.snapshot_freq, t.snapshot_freq_for_preemption, t.log_freq = 16, 6, 6, 2, 2
  t.snapshot_sampling = False
  c.data.num_train, c.data.num_test = 256, 64
  c.eval.batch_size, c.eval.enable_loss = 64, False
  c.model.nf, c.model.num_layers, c.model.num_scales = 8, 1, 10
  c.sampling.num_samples = 8
  return c
'''


def tiny_config(n_iters=4, **training):
  c = config_defaults.toy_config("vesde", "ring8")
  t = c.training
  t.batch_size, t.n_iters, t.log_freq = 16, n_iters, 2
  t.snapshot_freq = t.snapshot_freq_for_preemption = 2
  t.snapshot_sampling = False
  for k, v in training.items():
    t[k] = v
  c.data.num_train, c.data.num_test = 256, 64
  c.eval.batch_size, c.eval.enable_loss = 64, False
  c.model.nf, c.model.num_layers, c.model.num_scales = 8, 1, 10
  c.sampling.num_samples = 8
  return c


def train(config, workdir, messages=None, **kw):
  return train_lib.train(config, str(workdir), devices=jax.devices()[:1], progress=False,
                         report=(messages.append if messages is not None else (lambda *_: None)), **kw)


def _abstract(config):
  from score_sde_jax.run import restore
  return restore.abstract_train_state(config)


def corrupt(step_dir):
  """Truncates the array data files (OCDBT `d/`) of a checkpoint: a partly written checkpoint."""
  files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_dir, "state"))
           if os.path.basename(r) == "d" for n in ns]
  assert files
  for p in files:
    with open(p, "r+b") as f:
      f.truncate(os.path.getsize(p) // 2)


def restores(config, workdir, step):
  ck = ckpt_lib.Checkpointer(str(workdir), read_only=True)
  try:
    state, _ = ck.restore(step, _abstract(config))
    ckpt_lib.check_finite_state(state)
    return int(state.step) == step
  except Exception:  # noqa: BLE001
    return False
  finally:
    ck.close()


def _script(name):
  spec = importlib.util.spec_from_file_location(f"_reliability_{name}", os.path.join(REPO, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_script(name, args):
  try:
    code = _script(name).run([f"scripts/{name}.py"] + list(args))
  except SystemExit as e:
    code = e.code
  return 0 if code is None else code


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny workdir with checkpoints 2 and 4 (snapshot_freq 2 keeps both); copied by the tests."""
  d = tmp_path_factory.mktemp("reliability") / "trained"
  train(tiny_config(), d)
  assert sorted(os.listdir(d / "checkpoints")) == ["2", "4"]
  return d


def copy_of(trained, tmp_path, name="w"):
  dest = tmp_path / name
  shutil.copytree(trained, dest)
  return dest


# ---------------------------------------------------------------------------------------------------
# 1. Nothing lost: an unreadable checkpoint is replaced, never kept as the newest


def test_unreadable_only_checkpoint_is_rewritten_when_training_reaches_its_step(tmp_path):
  c = tiny_config(n_iters=4, snapshot_freq=4, snapshot_freq_for_preemption=4)
  work = tmp_path / "w"
  train(c, work)
  assert sorted(os.listdir(work / "checkpoints")) == ["4"]
  corrupt(work / "checkpoints" / "4")
  messages = []
  r = train(c, work, messages)
  text = "\n".join(messages)
  # Nothing restored: training started from scratch and wrote step 4 again; the unreadable one is kept
  # aside (not deleted) and said so.
  assert r.resumed_from is None and r.step == 4 and "skipping checkpoint" in text, text
  assert "moved the unreadable checkpoint of step 4" in text, text
  assert [n.split(".")[0] for n in os.listdir(work / "checkpoints_unreadable")] == ["4"]
  assert sorted(os.listdir(work / "checkpoints")) == ["4"] and restores(c, work, 4)


def test_save_replaces_an_unreadable_checkpoint_of_the_same_step(tmp_path):
  import jax.numpy as jnp
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ck.save(3, {"a": jnp.zeros(4)}, {"n": 0}, wait=True)
  ck.unreadable.add(3)                 # as restore_latest records a checkpoint that failed to restore
  ck.save(3, {"a": jnp.ones(4)}, {"n": 1}, wait=True)
  target = {"a": jax.ShapeDtypeStruct((4,), jnp.float32)}
  state, data = ck.restore(3, target)
  ck.close()
  assert np.all(np.asarray(state["a"]) == 1) and data == {"n": 1}
  assert len(os.listdir(tmp_path / "checkpoints_unreadable")) == 1   # the old one, kept aside


# ---------------------------------------------------------------------------------------------------
# 5. Writes in read-only situations


def test_failed_force_resume_writes_nothing(trained, tmp_path):
  work = copy_of(trained, tmp_path)
  before = tree_state(str(work))
  c = tiny_config(n_iters=6)
  c.model.nf = 16                         # the checkpoints cannot hold this model
  with pytest.raises(train_lib.ConfigError, match="--force_resume cannot continue.*model.nf"):
    train(c, work, force_resume=True)
  assert tree_state(str(work)) == before
  c = tiny_config(n_iters=6)
  c.data.num_train = 0                    # a changed data field (forced), and data that cannot be opened
  with pytest.raises(train_lib.DataError, match="empty"):
    train(c, work, force_resume=True)
  assert tree_state(str(work)) == before  # config.json neither superseded nor rewritten


# ---------------------------------------------------------------------------------------------------
# 6. One training per workdir

HOLDER = ("import sys, time\nfrom score_sde_jax.train import lock\nlock.acquire(sys.argv[1])\n"
          "print('locked', flush=True)\ntime.sleep(120)\n")


def _start_holder(workdir):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  p = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True, env=env)
  assert p.stdout.readline().strip() == "locked"
  return p


def test_second_training_is_refused_naming_the_holder_and_a_killed_holder_frees_it(trained, tmp_path, capfd):
  work = copy_of(trained, tmp_path)
  holder = _start_holder(work)
  try:
    before = tree_state(str(work))
    with pytest.raises(lock_lib.WorkdirLocked, match=rf"in use by another training: process {holder.pid} on host"):
      train(tiny_config(n_iters=6), work)
    cfg = tmp_path / "tiny.py"
    cfg.write_text(CONFIG_FILE)
    capfd.readouterr()
    code = run_script("train", [f"--config={cfg}", f"--workdir={work}", "--noprogress", "--notoy_report"])
    err = capfd.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("ERROR: "), err
    assert f"process {holder.pid}" in err and "--workdir" in err
    assert tree_state(str(work)) == before        # not even the orbax tmp clean-up ran
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  # The killed holder's lock file is still there, naming it; the kernel released its lock.
  assert lock_lib.read_holder(str(work))["pid"] == holder.pid
  r = train(tiny_config(n_iters=6), work)
  assert r.resumed_from == 4 and r.step == 6
  assert lock_lib.read_holder(str(work))["pid"] == os.getpid()


def test_lock_is_reentrant_within_a_process_and_released(tmp_path):
  a = lock_lib.acquire(str(tmp_path))
  b = lock_lib.acquire(str(tmp_path))
  b.release()
  assert a.held
  a.release()
  assert not a.held
  with lock_lib.acquire(str(tmp_path)):
    pass


# ---------------------------------------------------------------------------------------------------
# 7. A full disk: one line, the previous checkpoint intact, the detail in errors.log, no retrying


def _run_until_save_fails(tmp_path, capfd, monkeypatch, fail):
  cfg = tmp_path / "tiny.py"
  cfg.write_text(CONFIG_FILE)
  work = tmp_path / "w"
  fail(monkeypatch)
  capfd.readouterr()
  code = run_script("train", [f"--config={cfg}", f"--workdir={work}", "--noprogress", "--notoy_report"])
  out, err = capfd.readouterr()
  return work, code, out, err


def test_disk_full_save_stops_with_one_line_and_keeps_the_previous_checkpoint(tmp_path, capfd, monkeypatch):
  import orbax.checkpoint as ocp
  calls = []
  real_save = ocp.CheckpointManager.save

  def fail(mp):
    def save(self, step, *a, **k):
      calls.append(int(step))
      if int(step) >= 4:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
      return real_save(self, step, *a, **k)
    mp.setattr(ocp.CheckpointManager, "save", save)

  work, code, out, err = _run_until_save_fails(tmp_path, capfd, monkeypatch, fail)
  lines = err.splitlines()
  assert code == 5 and len(lines) == 1 and lines[0].startswith("ERROR: "), err[-3000:]
  assert "step 4" in lines[0] and "no space left" in lines[0] and "step 2, is intact" in lines[0], lines[0]
  log = work / "logs" / "errors.log"
  assert f"Details: {log}" in lines[0] and "No space left on device" in log.read_text()
  assert calls == [2, 4]                       # stopped at the first failure: no retry at step 6
  monkeypatch.undo()
  assert sorted(os.listdir(work / "checkpoints")) == ["2"] and restores(tiny_config(), work, 2)


def test_async_save_failure_floods_nothing(tmp_path, capfd, monkeypatch, caplog):
  """The write fails in orbax's background commit threads, as on a full disk: orbax logs a traceback from
  each failed thread (a real full disk printed ~300 lines for this tiny model), which go to errors.log;
  the console gets one line."""
  try:
    from orbax.checkpoint._src.path import async_path
  except ImportError:  # pragma: no cover
    pytest.skip("orbax internals moved")
  real_write_text = async_path.write_text

  def fail(mp):
    async def write_text(path, *a, **k):
      if "/4.orbax-checkpoint-tmp" in str(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
      return await real_write_text(path, *a, **k)
    mp.setattr(async_path, "write_text", write_text)

  caplog.set_level(logging.WARNING)
  work, code, out, err = _run_until_save_fails(tmp_path, capfd, monkeypatch, fail)
  lines = err.splitlines()
  assert code == 5 and len(lines) == 1 and lines[0].startswith("ERROR: "), err[-3000:]
  # orbax's error records never reach a handler (the console, or here pytest's log capture)
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR and "orbax" in r.pathname]
  assert "checkpoint of step 4" in lines[0] and "step 2, is intact" in lines[0], lines[0]
  log = (work / "logs" / "errors.log").read_text()
  assert "No space left on device" in log and "orbax" in log and "absl ERROR" in log   # orbax's own logs
  monkeypatch.undo()
  assert "2" in os.listdir(work / "checkpoints") and restores(tiny_config(), work, 2)


# ---------------------------------------------------------------------------------------------------
# 9. Reading while a training writes


def test_readers_never_move_clean_or_write_while_a_training_saves(trained, tmp_path, capfd):
  """Sampling and reading a workdir whose newest checkpoint is unreadable, while a training is saving the
  next one (orbax's temporary directory): they skip the unreadable one (left in place) and leave the
  save in progress alone; the workdir is unchanged byte for byte."""
  from score_sde_jax import checkpoints
  from score_sde_jax.run import restore
  work = copy_of(trained, tmp_path)
  corrupt(work / "checkpoints" / "4")
  tmp = work / "checkpoints" / "6.orbax-checkpoint-tmp-1764527400"   # what orbax writes while saving step 6
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "partial").write_bytes(b"\0" * 100)
  before = tree_state(str(work))
  assert checkpoints.read_pretrained(str(work), tiny_config()).step == 2
  assert restore.restore_state(tiny_config(), str(work))[0] == 2
  code = run_script("sample", [f"--workdir={work}", "--num_samples=4", "--noprogress",
                               f"--out={tmp_path / 'out' / 's.npz'}"])
  assert code == 0 and (tmp_path / "out" / "s.npz").exists(), capfd.readouterr()
  assert tree_state(str(work)) == before
  # (A writable Checkpointer, i.e. a training, has orbax clean such directories up, asynchronously: hence
  # one training per workdir, the lock being taken before it is created.)


# ---------------------------------------------------------------------------------------------------
# 12. Young EMA weights


def test_snapshot_weights_and_one_line_for_young_ema(tmp_path):
  results = {}
  for weights in ("ema", "raw"):
    messages = []
    c = tiny_config(n_iters=4, snapshot_sampling=True, snapshot_weights=weights)
    results[weights] = (train(c, tmp_path / weights, messages), messages)
  ema_lines = [m for m in results["ema"][1] if "EMA weights" in m]
  assert len(ema_lines) == 1 and "step 2" in ema_lines[0] and "snapshot_weights='raw'" in ema_lines[0]
  assert not [m for m in results["raw"][1] if "EMA weights" in m]
  a, b = results["ema"][0].last_samples, results["raw"][0].last_samples
  assert a.shape == b.shape and not np.allclose(a, b)


def test_sample_says_when_the_ema_weights_are_young(trained, tmp_path, capfd):
  for weights, expected in (("ema", 1), ("raw", 0)):
    code = run_script("sample", [f"--workdir={trained}", "--num_samples=4", "--noprogress",
                                 f"--weights={weights}", f"--out={tmp_path / weights / 's.npz'}"])
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    assert sum("EMA weights" in line for line in out.splitlines()) == expected, out

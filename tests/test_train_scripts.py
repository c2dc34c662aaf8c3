"""scripts/train.py and scripts/sample.py end to end on a tiny toy config (subprocesses)."""
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = '''
from score_sde_jax import config_defaults

def get_config():
  c = config_defaults.toy_config("vpsde", "ring8")
  t = c.training
  t.batch_size, t.n_iters, t.snapshot_freq, t.snapshot_freq_for_preemption, t.log_freq = 32, 20, 20, 10, 10
  c.data.num_train, c.data.num_test = 512, 64
  c.eval.batch_size = 64
  c.model.nf, c.model.num_layers, c.model.num_scales = 16, 1, 20
  c.sampling.num_samples = 64
  c.eval.rtol = c.eval.atol = 1e-3
  return c
'''


def _run(args, timeout=300):
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable] + args, capture_output=True, text=True, timeout=timeout,
                        env=env, cwd=REPO)


def test_train_script_toy_outputs_resume_and_sample(tmp_path):
  cfg = tmp_path / "tiny_toy.py"
  cfg.write_text(CONFIG)
  work = tmp_path / "work"
  r = _run(["scripts/train.py", f"--config={cfg}", f"--workdir={work}", "--noprogress",
            "--config.optim.lr=1e-3"])
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  assert "Test NLL (64 points, exact divergence" in out and "bits/dim" in out, out
  assert f"Everything is in {work}" in out
  for name in ("toy_samples.png", "toy_score_field.png", "samples_00000020.png",
               "score_field_00000020.png"):
    assert (work / "samples" / name).exists(), name
  assert (work / "config.json").exists() and (work / "checkpoints" / "20").is_dir()
  # Same command again: resumes at the end (nothing left to train) and reports again.
  r = _run(["scripts/train.py", f"--config={cfg}", f"--workdir={work}", "--noprogress",
            "--config.optim.lr=1e-3"])
  assert r.returncode == 0 and "Resuming from step 20" in r.stdout, r.stderr[-3000:]
  # A different model on the same workdir is refused with exit status 2 and the differences.
  r = _run(["scripts/train.py", f"--config={cfg}", f"--workdir={work}", "--noprogress",
            "--config.model.nf=32"])
  assert r.returncode == 2 and "model.nf: saved 16 -> now 32" in r.stderr, r.stderr[-3000:]
  # Samples from the workdir's checkpoint.
  r = _run(["scripts/sample.py", f"--workdir={work}", "--num_samples=40", "--batch_size=20"])
  assert r.returncode == 0, r.stderr[-3000:]
  npz = work / "samples" / "sample_00000020.npz"
  assert npz.exists() and (work / "samples" / "sample_00000020.png").exists()
  x = np.load(npz)["samples"]
  assert x.shape == (40, 2) and np.all(np.isfinite(x))


@pytest.mark.slow
def test_toy_main_job_finishes_within_a_minute(tmp_path):
  """The README's main job (`configs/toy/ve_ring8.py`): train, pictures and test NLL in <= 60 s on a
  2-core CPU, compilation included (wall time of the whole command)."""
  import time
  cfg = os.path.join(REPO, "configs", "toy", "ve_ring8.py")
  if not os.path.exists(cfg):
    pytest.skip(f"{cfg} does not exist")
  t0 = time.time()
  r = _run(["scripts/train.py", f"--config={cfg}", f"--workdir={tmp_path / 'w'}", "--noprogress"])
  seconds = time.time() - t0
  assert r.returncode == 0, r.stderr[-3000:]
  print(f"toy main job: {seconds:.1f} s")
  assert "Test NLL" in r.stdout
  assert seconds <= 60.0

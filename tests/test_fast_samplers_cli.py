"""Fast samplers (issue 16) through the command lines: training snapshots (`training.snapshot_sampling`)
and `scripts/sample.py` draw with the configured fast `sampling.method`.

One tiny toy run (VP, ring8, 4 steps, MLP width 8), trained in-process by scripts/train.py with
`sampling.method=dpm_solver_pp`, `sampling.num_steps=7`.  A method that were ignored would show in the
number of score evaluations, which the scripts report and store: the fast samplers' NFE is exact
(`num_steps` for DPM-Solver++, 2 num_steps − 1 for EDM Heun, +1 for the final Tweedie step of
`noise_removal=True`: 8 here, and 6 for the EDM Heun override), while the config's PC sampler reports
model.num_scales = 10 on this run and the adaptive ODE sampler hundreds (measured: 10 and 687).  The NFE checks are exact
(integers: no tolerance).  The weights are 4 steps old: these tests check the plumbing, not the samples'
quality (only their shape and finiteness).
"""
import contextlib
import importlib.util
import io
import json
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "toy", "vp_ring8.py")
STEPS = 4
SNAPSHOT_STEPS = 7          # dpm_solver_pp: NFE = num_steps + 1 (noise_removal) = 8
SMALL = [f"--config.training.n_iters={STEPS}", "--config.training.batch_size=16",
         f"--config.training.snapshot_freq={STEPS}", f"--config.training.snapshot_freq_for_preemption={STEPS}",
         "--config.training.snapshot_sampling=True", "--config.training.log_freq=2", "--config.model.nf=8",
         "--config.model.num_layers=1", "--config.model.num_scales=10", "--config.data.num_train=256",
         "--config.data.num_test=64", "--config.eval.batch_size=64", "--config.eval.enable_loss=False",
         "--config.sampling.num_samples=8", "--config.sampling.method=dpm_solver_pp",
         f"--config.sampling.num_steps={SNAPSHOT_STEPS}"]


def _load(name):
  spec = importlib.util.spec_from_file_location(f"_fast_cli_{name}", os.path.join(REPO, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(name, args):
  """scripts/<name>.py in-process on `args`; returns (exit status, stdout)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    try:
      code = _load(name).run([f"scripts/{name}.py"] + list(args))
    except SystemExit as e:
      code = e.code
  return (0 if code is None else code), out.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, train stdout) of the tiny run with DPM-Solver++ snapshots."""
  wd = str(tmp_path_factory.mktemp("fast_cli") / "work")
  code, out = _run("train", [f"--config={CONFIG}", f"--workdir={wd}", "--noprogress", "--notoy_report"] + SMALL)
  assert code == 0 and os.path.isdir(os.path.join(wd, "checkpoints", str(STEPS))), out[-3000:]
  return wd, out


def test_training_snapshots_use_the_fast_sampler(trained):
  wd, out = trained
  with open(os.path.join(wd, "config.json")) as f:
    saved = json.load(f)["sampling"]
  assert (saved["method"], saved["num_steps"]) == ("dpm_solver_pp", SNAPSHOT_STEPS)
  line = f"step {STEPS}: 8 samples (NFE {SNAPSHOT_STEPS + 1}) -> "
  assert line in out, f"no snapshot line {line!r} in the training output:\n{out[-3000:]}"
  assert os.path.exists(os.path.join(wd, "samples", f"samples_{STEPS:08d}.png"))


@pytest.mark.parametrize("overrides, nfe", [
    ([], SNAPSHOT_STEPS + 1),                                                          # the saved config's
    (["--set", "sampling.method=edm_heun", "--set", "sampling.num_steps=3"], 2 * 3 - 1 + 1),   # --set
], ids=["saved_dpm_solver_pp", "set_edm_heun"])
def test_sample_script_uses_the_fast_sampler(trained, tmp_path, overrides, nfe):
  wd, _ = trained
  path = tmp_path / "s.npz"
  code, out = _run("sample", [f"--workdir={wd}", "--noprogress", "--num_samples=8", "--batch_size=8",
                              f"--out={path}"] + overrides)
  assert code == 0, out[-3000:]
  assert f"(mean NFE {nfe})" in out, out[-3000:]
  got = np.load(path)
  assert got["nfe"].tolist() == [nfe], got["nfe"]
  x = got["samples"]
  assert x.shape == (8, 2) and np.all(np.isfinite(x))

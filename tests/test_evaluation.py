"""Likelihood evaluation (score_sde_jax.evaluation, scripts/evaluate.py).

* every example of the split is counted exactly once (padding + mask), on 1 and on 4 simulated devices,
  with the same numbers;
* an interrupted evaluation (stopped after some batches, with a torn last line in the results file)
  resumes to the same total without counting anything twice;
* ScoreFlow's bound with the exact score of a Gaussian mixture is the true NLL −log p_eps up to the
  prior mismatch (≈ 1e-4 nats) and Monte Carlo error, and is above it by a clear margin for a wrong score;
* bad workdirs, checkpoints and configs get clear errors.

A tiny toy model (MLP width 16, 10 training steps) on 30 test points keeps the file fast.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde_jax import bound as bound_lib
from score_sde_jax import config_defaults, evaluation
from score_sde_jax import sde as sde_lib
from score_sde_jax import train as train_lib
from score_sde_jax.datasets import toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TEST = 30


def tiny_config():
  c = config_defaults.toy_config("vpsde", "mixture1d")
  c.seed = 1
  t = c.training
  t.batch_size = 16
  t.n_iters = 10
  t.snapshot_freq = 10
  t.snapshot_freq_for_preemption = 10
  t.log_freq = 5
  t.snapshot_sampling = False
  c.eval.enable_loss = False
  c.eval.batch_size = 8
  c.eval.num_repeats = 2
  # Tighter than the paper's 1e-5: 1 and 4 devices take different adaptive steps (round-off flips an
  # accept/reject), so they agree only to the solver's error, which scales with the tolerance; measured
  # max per-example difference 3.4e-3 / 3.2e-4 / 1.4e-5 nats at rtol = atol = 1e-5 / 1e-6 / 1e-7.
  c.eval.rtol = 1e-7
  c.eval.atol = 1e-7
  c.data.num_train = 256
  c.data.num_test = NUM_TEST
  c.model.nf = 16
  c.model.num_layers = 1
  c.model.num_scales = 50
  c.optim.warmup = 5
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("eval_work"))
  train_lib.train(tiny_config(), d, devices=jax.devices()[:1], progress=False, report=lambda *_: None,
                  async_checkpoint=False, handle_signals=False)
  return d


def _fresh(workdir, tmp_path, name):
  """A copy of the workdir's config + checkpoints without any eval results."""
  import shutil
  dst = str(tmp_path / name)
  shutil.copytree(workdir, dst, ignore=shutil.ignore_patterns("eval"))
  return dst


def _entries(summary):
  with open(summary["results_file"]) as f:
    return [json.loads(l) for l in f if '"entry"' in l]


def _per_example(summary):
  vals = {}
  for e in _entries(summary):
    for i, v in zip(e["ids"], e["value"]):
      assert (e["repeat"], i) not in vals
      vals[(e["repeat"], i)] = v
  return vals


@pytest.fixture(scope="module")
def four_device_run(workdir, tmp_path_factory):
  """The reference: 4 devices, global batch 8 → 4 batches of which the last is padded (30 = 3·8 + 6)."""
  d = _fresh(workdir, tmp_path_factory.mktemp("ref"), "w")
  (s,) = evaluation.evaluate_likelihood(tiny_config(), d, devices=jax.devices()[:4], bound_num_t=4,
                                        report=lambda *_: None)
  return s


def test_each_example_once_and_same_on_1_and_4_devices(workdir, four_device_run, tmp_path):
  assert len(jax.devices()) >= 4
  s4 = four_device_run
  assert s4["num_examples"] == NUM_TEST and s4["num_repeats"] == 2
  v4 = _per_example(s4)
  assert sorted(v4) == [(r, i) for r in range(2) for i in range(NUM_TEST)]
  assert len(_entries(s4)) == 2 * 4
  d1 = _fresh(workdir, tmp_path, "one")
  (s1,) = evaluation.evaluate_likelihood(tiny_config(), d1, devices=jax.devices()[:1], bound_num_t=4,
                                         report=lambda *_: None)
  v1 = _per_example(s1)
  assert sorted(v1) == sorted(v4)
  a = np.array([v1[k] for k in sorted(v1)])
  b = np.array([v4[k] for k in sorted(v4)])
  # The adaptive solver's accept/reject decisions can flip on float round-off that differs between
  # shard sizes, so the two agree to the solver's accuracy (1.4e-5 measured at tolerance 1e-7, see
  # tiny_config), not bit for bit; 1e-4 leaves a 7x margin.
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
  np.testing.assert_allclose(s1["nll_nats_per_dim"], s4["nll_nats_per_dim"], rtol=2e-4)
  assert np.isfinite(s4["bound_nats_per_dim"]) and s4["mean_nfe"] > 0
  assert abs(s4["bits_per_dim"] - s4["nll_nats_per_dim"] / np.log(2)) < 1e-9
  # the repeats used different noise only where noise enters (exact divergence, continuous data: the
  # NLL is deterministic; the bound's Monte Carlo differs between repeats)
  assert os.path.exists(s4["summary_path"])
  # the summary's numbers are in TensorBoard at the checkpoint's step
  from score_sde_jax.run import metric_writer
  logs = os.path.join(os.path.dirname(s1["summary_path"]), "logs")
  (events,) = [f for f in os.listdir(logs) if f.startswith("events.out.tfevents")]
  rows = metric_writer.read_scalars(os.path.join(logs, events))
  assert sorted(tag for _, tag, _ in rows) == ["eval/bits_per_dim", "eval/bound_nats_per_dim",
                                               "eval/nll_nats_per_dim"]
  for step, tag, value in rows:   # float32 in the event file
    assert step == 10 and abs(value - s1[tag[5:]]) <= 1e-6 * abs(s1[tag[5:]])


def test_max_examples_and_batch_padded_to_device_count(workdir, tmp_path):
  d = _fresh(workdir, tmp_path, "slice")
  # batch 6 on 4 devices is padded to 8; 13 examples → 2 batches, the second with 5 valid rows.
  (s,) = evaluation.evaluate_likelihood(tiny_config(), d, devices=jax.devices()[:4], batch_size=6,
                                        max_examples=13, bound=False, report=lambda *_: None)
  assert s["settings"]["batch_size"] == 8 and s["num_examples"] == 13
  v = _per_example(s)
  assert sorted(v) == [(r, i) for r in range(2) for i in range(13)]


def test_resume_after_interruption_same_total_no_double_count(workdir, four_device_run, tmp_path):
  d = _fresh(workdir, tmp_path, "resume")
  c = tiny_config()
  out = evaluation.evaluate_likelihood(c, d, devices=jax.devices()[:4], bound_num_t=4, stop_after=3,
                                       report=lambda *_: None)
  assert out == [None]
  (path,) = [os.path.join(d, "eval", f) for f in os.listdir(os.path.join(d, "eval"))
             if f.endswith(".jsonl")]
  with open(path) as f:
    assert sum('"entry"' in l for l in f) == 3
  with open(path, "a") as f:             # a kill in the middle of writing the 4th entry
    f.write('{"repeat": 0, "batch": 3, "ids": [24, 25')
  msgs = []
  (s,) = evaluation.evaluate_likelihood(c, d, devices=jax.devices()[:4], bound_num_t=4,
                                        report=msgs.append)
  assert any("resuming, 3 of 8" in m for m in msgs)
  assert len(_entries(s)) == 8
  v, ref = _per_example(s), _per_example(four_device_run)
  assert sorted(v) == sorted(ref)
  np.testing.assert_allclose([v[k] for k in sorted(v)], [ref[k] for k in sorted(ref)], rtol=1e-6)
  np.testing.assert_allclose(s["nll_nats_per_dim"], four_device_run["nll_nats_per_dim"], rtol=1e-6)
  np.testing.assert_allclose(s["bound_nats_per_dim"], four_device_run["bound_nats_per_dim"], rtol=1e-6)
  # a third run has nothing left to do and gives the same summary
  (s3,) = evaluation.evaluate_likelihood(c, d, devices=jax.devices()[:4], bound_num_t=4,
                                         report=lambda *_: None)
  assert len(_entries(s3)) == 8 and s3["nll_nats_per_dim"] == s["nll_nats_per_dim"]
  # More repeats extend the same file: the 8 entries of repeats 0-1 are reused, only repeat 2 is new.
  c.eval.num_repeats = 3
  msgs = []
  (s4,) = evaluation.evaluate_likelihood(c, d, devices=jax.devices()[:4], bound_num_t=4,
                                         report=msgs.append)
  assert any("resuming, 8 of 12" in m for m in msgs) and s4["results_file"] == s["results_file"]
  assert len(_entries(s4)) == 12 and s4["repeat_means_nats_per_dim"][:2] == s["repeat_means_nats_per_dim"]
  # ... and fewer repeats summarize only repeats < num_repeats of that file.
  c.eval.num_repeats = 1
  (s1,) = evaluation.evaluate_likelihood(c, d, devices=jax.devices()[:4], bound_num_t=4,
                                         report=lambda *_: None)
  assert s1["repeat_means_nats_per_dim"] == s["repeat_means_nats_per_dim"][:1]


# ---------------------------------------------------------------------------------------------------
# ScoreFlow's bound against the exact mixture
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sde", [sde_lib.VPSDE(), sde_lib.SubVPSDE(), sde_lib.VESDE(sigma_max=10.0)],
                         ids=["vp", "subvp", "ve"])
def test_bound_with_exact_score_is_the_true_nll(sde):
  """With s = ∇log p_t the bound equals E[−log p_eps(x_eps)] + E[log p_T/π] (module docstring of
  evaluation): the mean gap over 20,000 points of the 1-D mixture must be within 4 standard errors of
  the paired differences (SE ≈ 0.03 nats) of 0, and |gap| < 0.15 nats.  With a wrong score (0.7·s*)
  the gap ½∫g²E‖s − s*‖² is positive, beyond 4 standard errors."""
  ds = toy.mixture1d()
  x = ds.sample(jax.random.PRNGKey(0), 20000)
  exact = ds.perturbed_score_fn(sde)
  nll = np.asarray(-ds.perturbed_log_prob_fn(sde)(x, jnp.full((x.shape[0],), 1e-5)), np.float64)
  bound = jax.jit(lambda k, y, c: bound_lib.variational_bound(
      k, sde, lambda a, t: c * exact(a, t), y, num_t=16, eps=1e-5))
  gap = np.asarray(bound(jax.random.PRNGKey(1), x, 1.0), np.float64) - nll
  se = gap.std() / np.sqrt(len(gap))
  assert se < 0.04
  assert abs(gap.mean()) < max(4 * se, 1e-3) and abs(gap.mean()) < 0.15, (gap.mean(), se)
  wrong = np.asarray(bound(jax.random.PRNGKey(1), x, 0.7), np.float64) - nll
  assert wrong.mean() > 4 * wrong.std() / np.sqrt(len(wrong)), (wrong.mean(), wrong.std())
  assert wrong.mean() > gap.mean()


def test_bound_terms_prior_and_divergence_closed_forms():
  sde = sde_lib.VPSDE()
  d = 3
  # −∫_eps^T ∇·f = ½ D (B(T) − B(eps)) for VP; 0 for VE.
  want = 0.5 * d * (sde.integrated_beta(1.0) - sde.integrated_beta(1e-5))
  np.testing.assert_allclose(-float(bound_lib.drift_divergence_integral(sde, 1e-5, d)), want, rtol=1e-5)
  assert float(bound_lib.drift_divergence_integral(sde_lib.VESDE(), 1e-5, d)) == 0.0
  # E_z log π(m + σ z) by Monte Carlo vs the closed form
  ve = sde_lib.VESDE(sigma_max=5.0)
  mean = jnp.array([[0.5, -1.0, 2.0]])
  std = jnp.array([3.0])
  z = jax.random.normal(jax.random.PRNGKey(0), (200000, 3))
  mc = float(jnp.mean(ve.prior_logp(mean + std[0] * z)))
  np.testing.assert_allclose(float(bound_lib._expected_prior_logp(ve, mean, std)[0]), mc, atol=0.01)


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------
def test_missing_workdir_and_checkpoints(tmp_path):
  c = tiny_config()
  missing = str(tmp_path / "nope")
  with pytest.raises(evaluation.EvalError, match="does not exist.*scripts/train.py"):
    evaluation.evaluate_likelihood(c, missing, report=lambda *_: None)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(evaluation.EvalError, match=r"no checkpoints in .*empty/checkpoints.*scripts/train.py"):
    evaluation.evaluate_likelihood(c, str(empty), report=lambda *_: None)


def test_bad_checkpoint_choice_and_mismatched_model(workdir):
  c = tiny_config()
  with pytest.raises(evaluation.EvalError, match=r"step\(s\) \[7\].*available steps: \[10\]"):
    evaluation.evaluate_likelihood(c, workdir, checkpoints=[7], report=lambda *_: None)
  c.eval.begin_ckpt, c.eval.end_ckpt = 5, 6
  with pytest.raises(evaluation.EvalError, match="no checkpoint .* \\[50, 60\\]"):
    evaluation.evaluate_likelihood(c, workdir, checkpoints="range", report=lambda *_: None)
  c = tiny_config()
  c.model.nf = 32
  with pytest.raises(evaluation.EvalError, match="checkpoint step 10: .*cannot restore.*differs.* in: model.nf"):
    evaluation.evaluate_likelihood(c, workdir, report=lambda *_: None)


@pytest.mark.parametrize("field,value,match", [
    ("divergence", "hutch", "Unknown eval.divergence"),
    ("num_repeats", 0, "eval.num_repeats must be a positive integer"),
    ("solver", "rk4", "Unknown solver"),
    ("eps", 2.0, "eval.eps must lie in"),
])
def test_bad_eval_config(workdir, field, value, match):
  c = tiny_config()
  with c.unlocked():
    c.eval[field] = value
  with pytest.raises((ValueError, evaluation.EvalError), match=match):
    evaluation.evaluate_likelihood(c, workdir, report=lambda *_: None)


def test_script_exit_code_and_message_for_missing_checkpoints(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "evaluate.py"),
                      "--config", os.path.join(REPO, "configs", "toy", "vp_mixture1d.py"),
                      "--workdir", str(tmp_path / "absent")], capture_output=True, text=True,
                     timeout=120, env=env)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "does not exist" in r.stderr and "scripts/train.py" in r.stderr


# ---------------------------------------------------------------------------------------------------
# The results cache: keyed by everything that determines the numbers
# ---------------------------------------------------------------------------------------------------
def _eval(c, d, msgs=None):
  (s,) = evaluation.evaluate_likelihood(c, d, devices=jax.devices()[:1], bound=False, max_examples=8,
                                        report=(msgs.append if msgs is not None else lambda *_: None))
  return s


def test_results_are_keyed_by_weights_model_sde_and_settings(workdir, tmp_path):
  """Same weights and config: the earlier file is reused.  Retrained weights at the same step, another SDE,
  another model config, or other settings: computed afresh, saying which earlier file differs in what."""
  d = _fresh(workdir, tmp_path, "ident")
  c = tiny_config()
  s = _eval(c, d)
  msgs = []
  again = _eval(c, d, msgs)
  assert again["results_file"] == s["results_file"] and any("resuming, 2 of 2" in m for m in msgs), msgs
  assert again["nll_nats_per_dim"] == s["nll_nats_per_dim"]

  # A run retrained in the same workdir (another seed) has another step-10 checkpoint.
  other = str(tmp_path / "other")
  c2 = tiny_config()
  c2.seed = 2
  train_lib.train(c2, other, devices=jax.devices()[:1], progress=False, report=lambda *_: None,
                  async_checkpoint=False, handle_signals=False)
  import shutil
  shutil.rmtree(os.path.join(d, "checkpoints"))
  shutil.copytree(os.path.join(other, "checkpoints"), os.path.join(d, "checkpoints"))
  msgs = []
  retrained = _eval(c, d, msgs)
  assert retrained["results_file"] != s["results_file"]
  assert any(s["results_file"] in m and "other weights" in m and "afresh" in m for m in msgs), msgs
  assert not any("resuming" in m for m in msgs)
  # The NLL of other weights differs (tiny model after 10 steps: well above the solver tolerance 1e-7).
  assert abs(retrained["nll_nats_per_dim"] - s["nll_nats_per_dim"]) > 1e-4

  for change, part in [(lambda k: setattr(k.training, "sde", "subvpsde"), "sde"),
                       (lambda k: setattr(k.model, "beta_max", 15.0), "model"),
                       (lambda k: setattr(k.eval, "rtol", 1e-4), "settings")]:
    k = tiny_config()
    change(k)
    msgs = []
    r = _eval(k, d, msgs)
    assert r["results_file"] not in (s["results_file"], retrained["results_file"])
    assert any(f"other {part}" in m for m in msgs) and not any("resuming" in m for m in msgs), (part, msgs)
  with open(retrained["results_file"]) as f:
    header = json.loads(f.readline())
  assert header["identity"]["weights"]["set"] == "ema" and len(header["identity"]["weights"]["fingerprint"]) == 16


def test_nan_checkpoint_at_an_explicit_step_is_one_clear_error(workdir, tmp_path):
  """A checkpoint whose EMA weights hold a NaN, asked for by step, fails before any solver step, naming the
  step and the parameter (before: a traceback, or ~7 minutes of solver steps on 8 devices)."""
  from score_sde_jax.run import checkpoint as ckpt_lib
  from score_sde_jax.run import restore
  d = _fresh(workdir, tmp_path, "nan")
  _, state = restore.restore_state(tiny_config(), d)
  ema = jax.tree.map(np.array, state.ema_params)
  leaves, treedef = jax.tree_util.tree_flatten(ema)
  i = np.random.default_rng().integers(len(leaves))
  leaves[i].reshape(-1)[np.random.default_rng().integers(leaves[i].size)] = np.nan
  ck = ckpt_lib.Checkpointer(d, snapshot_freq=10, async_save=False)   # keeps step 10 too
  ck.save(20, state.replace(ema_params=jax.tree_util.tree_unflatten(treedef, leaves)),
          {"process_count": 1, "states": [None]}, wait=True)
  ck.close()
  with pytest.raises(evaluation.EvalError, match=r"step 20.*not finite: parameter \S+ has 1 NaN"):
    evaluation.evaluate_likelihood(tiny_config(), d, checkpoints=[20], report=lambda *_: None)
  # 'latest' skips it (one line) and evaluates step 10
  r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), f"--workdir={d}",
                      "--max_examples=8", "--nobound", "--noprogress"], capture_output=True, text=True,
                     timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "skipping checkpoint" in r.stdout and "step 10" in r.stdout, r.stdout[-2000:]
  r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), f"--workdir={d}",
                      "--checkpoints=20", "--noprogress"], capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 2 and r.stderr.startswith("ERROR: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "not finite" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

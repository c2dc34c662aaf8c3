"""Every bad input is one clear line: a table of bad inputs to the CLIs (train, sample, evaluate,
convert_checkpoint, prepare_data) and to the public API.

For each CLI case: exit status 2, exactly one line on stderr, starting with `ERROR:` and naming the
problem (no traceback), and the workdir unchanged byte for byte (every file's bytes, size and mtime, every
directory's mtime), or — for a workdir that does not exist — not created.  The scripts run in-process
(their `run(argv)` / `main(argv)`, each run with its own flags), sharing one tiny trained toy workdir; a few
cases run as real subprocesses to prove the exit status and the stderr of the actual command.
"""
import hashlib
import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "toy", "ve_ring8.py")
CIFAR_CONFIG = os.path.join(REPO, "configs", "vp", "cifar10_ddpm_continuous.py")
SMALL = ["--config.training.n_iters=4", "--config.training.batch_size=16", "--config.training.snapshot_freq=4",
         "--config.training.snapshot_freq_for_preemption=4", "--config.training.snapshot_sampling=False",
         "--config.training.log_freq=2", "--config.model.nf=8", "--config.model.num_layers=1",
         "--config.model.num_scales=10", "--config.data.num_train=256", "--config.data.num_test=64",
         "--config.eval.batch_size=64", "--config.eval.enable_loss=False", "--config.sampling.num_samples=8"]
SCRIPTS = ("train", "sample", "evaluate", "convert_checkpoint", "prepare_data")


def _load(name):
  spec = importlib.util.spec_from_file_location(f"_bad_inputs_{name}", os.path.join(REPO, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_script(module, name, args):
  """Runs scripts/<name>.py in-process on `args`; returns its exit status."""
  try:
    if name in ("convert_checkpoint", "prepare_data"):
      code = module.main(list(args))
    else:
      code = module.run([f"scripts/{name}.py"] + list(args))
  except SystemExit as e:
    code = e.code
  return 0 if code is None else code


def tree_state(root):
  """{relative path: (size, mtime_ns, sha256)} of every file and {dir/: mtime_ns} of every directory
  under `root`; None when it does not exist."""
  if not os.path.lexists(root):
    return None
  if not os.path.isdir(root):
    st = os.stat(root)
    with open(root, "rb") as f:
      return {".": (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest())}
  out = {}
  for dirpath, _, filenames in os.walk(root):
    rel = os.path.relpath(dirpath, root)
    out[rel + "/"] = os.stat(dirpath).st_mtime_ns
    for n in filenames:
      p = os.path.join(dirpath, n)
      st = os.stat(p)
      with open(p, "rb") as f:
        out[os.path.join(rel, n)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
  return out


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
  """One tiny trained toy workdir (4 steps, MLP width 8) and the files the cases point at."""
  base = tmp_path_factory.mktemp("bad_inputs")
  modules = {name: _load(name) for name in SCRIPTS}
  wd = str(base / "trained")
  code = run_script(modules["train"], "train", [f"--config={CONFIG}", f"--workdir={wd}", "--noprogress",
                                                "--notoy_report"] + SMALL)
  assert code == 0 and os.path.isdir(os.path.join(wd, "checkpoints", "4"))
  files = {}
  for name, text in (("syntax.py", "def get_config(:\n"), ("noget.py", "x = 1\n"),
                     ("raises.py", "def get_config():\n  return undefined_name\n")):
    (base / name).write_text(text)
    files[name] = str(base / name)
  (base / "afile").write_text("not a directory\n")
  (base / "empty").mkdir()
  (base / "garbage").mkdir()
  (base / "garbage" / "checkpoint_5").write_bytes(b"not a checkpoint\n" * 100)
  (base / "cut").mkdir()
  (base / "cut" / "checkpoint_7").write_bytes(b"\x85\xa6params" + b"\x00" * 40)   # a msgpack map, cut short
  return dict(modules=modules, wd=wd, fresh=str(base / "never_created"), afile=str(base / "afile"),
              empty=str(base / "empty"), garbage=str(base / "garbage" / "checkpoint_5"),
              cut=str(base / "cut" / "checkpoint_7"), **files)


# (id, script, args (a function of ctx), text the ERROR line must contain)
T = lambda c, *a, wd=None: [f"--config={CONFIG}", f"--workdir={wd or c['fresh']}", "--noprogress",  # noqa: E731
                            "--notoy_report"] + SMALL + list(a)
S = lambda c, *a: [f"--workdir={c['wd']}", "--noprogress"] + list(a)  # noqa: E731
E = lambda c, *a: [f"--workdir={c['wd']}", "--noprogress", "--checkpoints=4", "--max_examples=4",  # noqa: E731
                   "--nobound"] + list(a)
CASES = [
    # ---- scripts/train.py ---------------------------------------------------------------------------
    ("train_no_config", "train", lambda c: [f"--workdir={c['fresh']}"], "--config is required"),
    ("train_no_workdir", "train", lambda c: [f"--config={CONFIG}"], "--workdir is required"),
    ("train_config_missing", "train", lambda c: [f"--config={c['fresh']}.py", f"--workdir={c['fresh']}"],
     "no such file"),
    ("train_config_syntax_error", "train", lambda c: [f"--config={c['syntax.py']}", f"--workdir={c['fresh']}"],
     "SyntaxError"),
    ("train_config_no_get_config", "train", lambda c: [f"--config={c['noget.py']}", f"--workdir={c['fresh']}"],
     "get_config"),
    ("train_config_raises", "train", lambda c: [f"--config={c['raises.py']}", f"--workdir={c['fresh']}"],
     "NameError"),
    ("train_config_is_a_directory", "train", lambda c: [f"--config={c['empty']}", f"--workdir={c['fresh']}"],
     "is a directory"),
    ("train_override_unknown_key", "train", lambda c: T(c, "--config.training.n_iterz=3"),
     "did you mean --config.training.n_iters"),
    ("train_override_unknown_section", "train", lambda c: T(c, "--config.trainin.n_iters=3"),
     "unknown config key 'trainin.n_iters'"),
    ("train_override_bad_type", "train", lambda c: T(c, "--config.training.n_iters=abc"), "n_iters"),
    ("train_unknown_sde", "train", lambda c: T(c, "--config.training.sde=foo"), "training.sde"),
    ("train_unknown_dataset", "train", lambda c: T(c, "--config.data.dataset=foo"), "data.dataset"),
    ("train_unknown_sampler", "train", lambda c: T(c, "--config.sampling.method=bogus"), "sampling.method"),
    ("train_unknown_predictor", "train", lambda c: T(c, "--config.sampling.predictor=bogus"), "predictor"),
    ("train_unknown_model", "train", lambda c: T(c, "--config.model.name=bogus"), "model"),
    ("train_zero_batch", "train", lambda c: T(c, "--config.training.batch_size=0"), "batch_size"),
    ("train_batch_not_divisible", "train", lambda c: T(c, "--config.training.batch_size=6"), "divide"),
    ("train_eval_batch_not_divisible", "train", lambda c: T(c, "--config.eval.batch_size=6"), "eval.batch_size"),
    ("train_negative_n_iters", "train", lambda c: T(c, "--config.training.n_iters=-1"), "n_iters"),
    ("train_ema_rate", "train", lambda c: T(c, "--config.model.ema_rate=1.5"), "ema_rate"),
    ("train_dtype", "train", lambda c: T(c, "--config.model.dtype=float64"), "model.dtype"),
    ("train_snapshot_weights", "train", lambda c: T(c, "--config.training.snapshot_weights=best"),
     "snapshot_weights"),
    ("train_n_jitted_steps", "train", lambda c: T(c, "--config.training.n_jitted_steps=3"), "n_jitted_steps"),
    ("train_workdir_is_a_file", "train", lambda c: T(c, wd=c["afile"]), "not a directory"),
    ("train_bad_bool_flag", "train", lambda c: T(c, "--progress=maybe"), "--progress"),
    ("train_unknown_flag", "train", lambda c: T(c, "--bogus"), "bogus"),
    ("train_positional_argument", "train", lambda c: T(c, "extra"), "unexpected argument"),
    ("train_changed_model_on_a_workdir", "train", lambda c: T(c, "--config.model.nf=16", wd=c["wd"]),
     "model.nf"),
    ("train_force_resume_incompatible", "train",
     lambda c: T(c, "--config.model.nf=16", "--force_resume", wd=c["wd"]), "--force_resume cannot continue"),
    ("train_missing_data_dir", "train",
     lambda c: [f"--config={CIFAR_CONFIG}", f"--workdir={c['fresh']}", "--noprogress",
                f"--config.data.tfds_data_dir={c['fresh']}_data"], "is not prepared"),
    # ---- scripts/sample.py --------------------------------------------------------------------------
    ("sample_no_source", "sample", lambda c: ["--noprogress"], "pass --workdir"),
    ("sample_workdir_missing", "sample", lambda c: [f"--workdir={c['fresh']}"], "no such file"),
    ("sample_workdir_not_trained", "sample", lambda c: [f"--workdir={c['empty']}"], "not a checkpoint directory"),
    ("sample_set_unknown_section", "sample", lambda c: S(c, "--set", "samplng.method=ode"),
     "did you mean 'sampling.method'"),
    ("sample_set_unknown_key", "sample", lambda c: S(c, "--set", "sampling.methd=ode"),
     "did you mean 'sampling.method'"),
    ("sample_set_without_value", "sample", lambda c: S(c, "--set", "sampling.method"), "section.field=value"),
    ("sample_set_bad_type", "sample", lambda c: S(c, "--set", "sampling.num_samples=many"), "num_samples"),
    ("sample_set_bad_value", "sample", lambda c: S(c, "--set", "sampling.method=bogus"), "sampling.method"),
    ("sample_config_override_unknown", "sample",
     lambda c: S(c, f"--config={CONFIG}", *SMALL, "--config.sampling.methd=ode"),
     "did you mean --config.sampling.method"),
    ("sample_zero_samples", "sample", lambda c: S(c, "--num_samples=0"), "--num_samples"),
    ("sample_text_samples", "sample", lambda c: S(c, "--num_samples=abc"), "--num_samples"),
    ("sample_negative_batch", "sample", lambda c: S(c, "--batch_size=-1"), "--batch_size"),
    ("sample_missing_step", "sample", lambda c: S(c, "--step=99"), "step 99"),
    ("sample_bad_weights", "sample", lambda c: S(c, "--weights=best"), "--weights"),
    ("sample_text_seed", "sample", lambda c: S(c, "--seed=x"), "--seed"),
    ("sample_checkpoint_missing", "sample", lambda c: [f"--checkpoint={c['fresh']}", f"--config={CONFIG}"],
     "no such file"),
    ("sample_checkpoint_garbage", "sample",
     lambda c: [f"--checkpoint={c['garbage']}", f"--config={CONFIG}", f"--workdir={c['fresh']}"] + SMALL,
     "unknown checkpoint format"),
    ("sample_checkpoint_truncated", "sample",
     lambda c: [f"--checkpoint={c['cut']}", f"--config={CONFIG}", f"--workdir={c['fresh']}"] + SMALL,
     "corrupt"),
    ("sample_checkpoint_without_config", "sample", lambda c: [f"--checkpoint={c['cut']}"], "pass --config"),
    ("sample_checkpoint_unknown_format", "sample", lambda c: [f"--checkpoint={c['garbage']}"],
     "unknown checkpoint format"),
    ("sample_config_does_not_fit", "sample", lambda c: S(c, f"--config={CONFIG}", *SMALL, "--config.model.nf=16"),
     "shape"),
    # ---- scripts/evaluate.py ------------------------------------------------------------------------
    ("evaluate_no_source", "evaluate", lambda c: ["--noprogress"], "pass --workdir"),
    ("evaluate_workdir_missing", "evaluate", lambda c: [f"--workdir={c['fresh']}"], "does not exist"),
    ("evaluate_checkpoints_text", "evaluate", lambda c: S(c, "--checkpoints=abc"), "--checkpoints"),
    ("evaluate_missing_step", "evaluate", lambda c: S(c, "--checkpoints=99"), "99"),
    ("evaluate_set_unknown_key", "evaluate", lambda c: E(c, "--set", "eval.solvr=x"), "did you mean 'eval.solver'"),
    ("evaluate_set_bad_type", "evaluate", lambda c: E(c, "--set", "eval.num_repeats=many"), "num_repeats"),
    ("evaluate_set_bad_value", "evaluate", lambda c: E(c, "--set", "eval.divergence=bogus"), "divergence"),
    ("evaluate_checkpoint_without_config", "evaluate", lambda c: [f"--checkpoint={c['wd']}"], "--config"),
    ("evaluate_zero_max_examples", "evaluate", lambda c: S(c, "--max_examples=0"), "max_examples"),
    ("evaluate_text_batch_size", "evaluate", lambda c: S(c, "--batch_size=abc"), "--batch_size"),
    # ---- scripts/convert_checkpoint.py --------------------------------------------------------------
    ("convert_no_arguments", "convert_checkpoint", lambda c: [], "required"),
    ("convert_config_missing", "convert_checkpoint",
     lambda c: ["--config", c["fresh"] + ".py", "--checkpoint", c["wd"], "--workdir", c["fresh"]], "no such file"),
    ("convert_checkpoint_missing", "convert_checkpoint",
     lambda c: ["--config", CONFIG, "--checkpoint", c["fresh"] + "_ckpt", "--workdir", c["fresh"]], "no such file"),
    ("convert_nothing_to_write", "convert_checkpoint", lambda c: ["--config", CONFIG, "--checkpoint", c["wd"]],
     "nothing to write"),
    ("convert_into_a_trained_workdir", "convert_checkpoint",
     lambda c: ["--config", CONFIG, "--checkpoint", c["garbage"], "--workdir", c["wd"]], "already holds"),
    ("convert_bad_weights", "convert_checkpoint",
     lambda c: ["--config", CONFIG, "--checkpoint", c["wd"], "--output", c["fresh"], "--weights", "best"],
     "--weights"),
    ("convert_workdir_is_a_file", "convert_checkpoint",
     lambda c: ["--config", CONFIG, "--checkpoint", c["wd"], "--workdir", c["afile"]], "not a directory"),
    # ---- scripts/prepare_data.py --------------------------------------------------------------------
    ("prepare_unknown_dataset", "prepare_data", lambda c: ["--dataset", "bogus", "--data_dir", c["fresh"]],
     "invalid choice"),
    ("prepare_source_not_cifar", "prepare_data",
     lambda c: ["--dataset", "MNIST", "--source", c["afile"], "--data_dir", c["fresh"]], "--source"),
    ("prepare_no_verify_without_source", "prepare_data",
     lambda c: ["--dataset", "CIFAR10", "--no-verify", "--data_dir", c["fresh"]], "--no-verify"),
    ("prepare_cifar_source_missing", "prepare_data",
     lambda c: ["--dataset", "CIFAR10", "--source", c["fresh"] + ".tar.gz", "--data_dir", c["fresh"]], "tar.gz"),
    ("prepare_text_image_size", "prepare_data", lambda c: ["--dataset", "FFHQ", "--image_size", "big"],
     "--image_size"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_cli_input_is_one_error_line_and_writes_nothing(ctx, case, capfd):
  _, script, make_args, expected = case
  args = make_args(ctx)
  before = {k: tree_state(ctx[k]) for k in ("wd", "fresh", "empty", "afile")}
  capfd.readouterr()
  code = run_script(ctx["modules"][script], script, args)
  out, err = capfd.readouterr()
  lines = err.splitlines()
  assert code == 2, (code, err[-3000:], out[-2000:])
  assert len(lines) == 1 and lines[0].startswith("ERROR: "), err[-3000:]
  assert "Traceback" not in err
  assert expected.lower() in lines[0].lower(), lines[0]
  for k, state in before.items():
    assert tree_state(ctx[k]) == state, f"{k} changed"


def test_the_table_is_large_enough():
  assert len(CASES) + len(API_CASES) >= 40


# ---- the public API: the exception class, a message naming the problem, nothing written -------------------
def _small_config(**changes):
  from score_sde_jax import config_defaults
  c = config_defaults.toy_config("vesde", "ring8")
  c.training.batch_size, c.training.n_iters, c.model.nf, c.model.num_layers = 16, 4, 8, 1
  c.training.snapshot_freq = c.training.snapshot_freq_for_preemption = 4
  c.training.snapshot_sampling, c.training.log_freq = False, 2
  c.model.num_scales, c.data.num_train, c.data.num_test = 10, 256, 64
  c.eval.batch_size, c.eval.enable_loss, c.sampling.num_samples = 64, False, 8
  for k, v in changes.items():
    section, field = k.split("__")
    c[section][field] = v
  return c


def _api_train(ctx, **changes):
  from score_sde_jax import train
  train.train(_small_config(**changes), ctx["fresh"], progress=False, report=lambda *_: None)


API_CASES = [
    ("train_unknown_sde", lambda c: _api_train(c, training__sde="foo"), "ConfigError", "training.sde"),
    ("train_workdir_is_a_file", lambda c: __import__("score_sde_jax.train", fromlist=["x"]).train(
        _small_config(), c["afile"], progress=False, report=lambda *_: None), "ConfigError", "not a directory"),
    ("load_pretrained_missing", lambda c: __import__("score_sde_jax.checkpoints", fromlist=["x"]).load_pretrained(
        c["fresh"], _small_config()), "CheckpointError", "no such file"),
    ("load_pretrained_bad_weights", lambda c: __import__("score_sde_jax.checkpoints", fromlist=["x"])
     .load_pretrained(c["wd"], _small_config(), weights="best"), "CheckpointError", "weights"),
    ("load_pretrained_wrong_config", lambda c: __import__("score_sde_jax.checkpoints", fromlist=["x"])
     .load_pretrained(c["wd"], _small_config(model__nf=16)), "CheckpointError", "shape"),
    ("apply_overrides_typo", lambda c: __import__("score_sde_jax.run.config_utils", fromlist=["x"])
     .apply_overrides(_small_config(), ["sampling.methd=ode"]), "ConfigError", "sampling.method"),
    ("load_workdir_config_missing", lambda c: __import__("score_sde_jax.run.restore", fromlist=["x"])
     .load_workdir_config(c["fresh"]), "FileNotFoundError", "config.json"),
    ("restore_state_missing_step", lambda c: __import__("score_sde_jax.run.restore", fromlist=["x"])
     .restore_state(_small_config(), c["wd"], step=99), "ValueError", "step 99"),
    ("validate_config_typo", lambda c: __import__("score_sde_jax.run.config_utils", fromlist=["x"])
     .validate_config(_typo_config()), "ConfigError",
     "did you mean 'training.n_iters'"),
]


def _typo_config():
  c = _small_config()
  c.training.unlock()
  c.training.n_iterz = 3
  return c


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_api_input_raises_a_clear_error_and_writes_nothing(ctx, case):
  _, call, exc_name, expected = case
  before = {k: tree_state(ctx[k]) for k in ("wd", "fresh", "afile")}
  with pytest.raises(Exception) as info:
    call(ctx)
  names = [k.__name__ for k in type(info.value).__mro__]
  assert exc_name in names, (names, info.value)
  assert expected.lower() in str(info.value).lower(), str(info.value)
  for k, state in before.items():
    assert tree_state(ctx[k]) == state, f"{k} changed"


# ---- the real commands: exit status and stderr of a subprocess ------------------------------------------
def _subprocess(args):
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable] + args, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def test_real_commands_exit_2_with_one_line_and_help_exits_0(ctx):
  r = _subprocess(["scripts/train.py", f"--config={CONFIG}", f"--workdir={ctx['fresh']}",
                   "--config.training.sde=foo"])
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("ERROR: "), r.stderr[-3000:]
  assert "training.sde" in r.stderr and not os.path.exists(ctx["fresh"])
  before = tree_state(ctx["wd"])
  r = _subprocess(["scripts/sample.py", f"--workdir={ctx['wd']}", "--set", "samplng.method=ode"])
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "did you mean 'sampling.method'" in r.stderr, \
      r.stderr[-3000:]
  assert tree_state(ctx["wd"]) == before
  r = _subprocess(["scripts/evaluate.py", "--help"])
  assert r.returncode == 0 and "--checkpoints" in r.stdout and not r.stderr, r.stderr[-3000:]


def test_help_exits_0_in_every_script(ctx, capfd):
  for name in SCRIPTS:
    code = run_script(ctx["modules"][name], name, ["--help"])
    out, err = capfd.readouterr()
    assert code == 0 and "--" in out and not err, (name, code, err[-2000:])


def test_verbose_adds_the_traceback(ctx, capfd):
  code = run_script(ctx["modules"]["sample"], "sample", S(ctx, "--set", "sampling.methd=ode", "--verbose"))
  err = capfd.readouterr().err
  assert code == 2 and "Traceback" in err and err.splitlines()[-1].startswith("ERROR: "), err[-3000:]

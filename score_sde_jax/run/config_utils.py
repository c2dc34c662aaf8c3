"""Config checks that run before anything is compiled, and the saved-config resume guard.

* `validate_config(config, num_devices)`: unknown keys (compared with the schema of
  `score_sde_jax.config_defaults`, with "did you mean" suggestions), wrong value types, batch sizes that
  do not divide by the device count, impossible frequencies, then every section built once without
  computing (SDE, model shapes, loss, sampler, evaluation settings).  All problems are reported at once in
  one `ConfigError`.
* `apply_overrides(config, ["a.b=v", ...])`: strict `--set` overrides (an unknown key is an error naming
  the closest one).
* `check_resume_config(workdir, config, force)`: a workdir remembers its config (`config.json`); a run
  whose config differs in anything but the fields in `RESUMABLE_FIELDS` (schedules, logging, sampling
  and evaluation settings) is refused with the list of differences unless forced.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import ml_collections

from score_sde_jax import config_defaults

CONFIG_FILE = "config.json"


def load_config_file(path: str, config_string: Optional[str] = None) -> ml_collections.ConfigDict:
  """`get_config()` (or `get_config(config_string)`) of a config file: what `--config path.py[:arg]`
  loads, without absl flags.  Any file name works (it is read as Python source)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  import importlib.machinery
  import importlib.util
  name = "score_sde_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
  loader = importlib.machinery.SourceFileLoader(name, path)
  spec = importlib.util.spec_from_loader(name, loader)
  module = importlib.util.module_from_spec(spec)
  loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config()")
  return module.get_config(*([config_string] if config_string is not None else []))

# Fields that may change between a run and its resumption: they do not change the model, the data or
# the optimisation trajectory of the steps already taken.
RESUMABLE_FIELDS = ("training.n_iters", "training.snapshot_freq", "training.log_freq",
                    "training.eval_freq", "training.snapshot_freq_for_preemption",
                    "training.snapshot_sampling", "training.snapshot_weights", "training.n_jitted_steps",
                    "data.tfds_data_dir")
RESUMABLE_SECTIONS = ("sampling.", "eval.")
# Sections whose extra keys are model- or dataset-specific (e.g. NCSN++ `ch_mult`): an unknown key
# there is an error only when it looks like a typo of a known one.
OPEN_SECTIONS = ("model", "data")


class ConfigError(ValueError):
  """A config problem found before training starts."""


def complete_config(config, report=print):
  """`config_defaults.complete` (fills what an old or partial config lacks), saying once what it filled.
  Every path that takes a config from outside (a config file, a workdir's config.json) calls it."""
  filled = config_defaults.complete(config)
  if filled:
    shown = ", ".join(filled[:8]) + (f", … ({len(filled)} in all)" if len(filled) > 8 else "")
    report(f"config: filled in from the defaults (the config does not set them): {shown}")
  return config


def flatten(config, prefix: str = "") -> Dict[str, Any]:
  out = {}
  items = config.items() if hasattr(config, "items") else []
  for k, v in items:
    key = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def schema() -> Dict[str, Any]:
  """Every known key with a default value: the union of the default configs (base, and toy configs for
  each toy dataset and SDE)."""
  keys = flatten(config_defaults.base_config())
  for sde in ("vesde", "vpsde", "subvpsde"):
    for name in config_defaults.TOY_DATASETS:
      for k, v in flatten(config_defaults.toy_config(sde, name)).items():
        keys.setdefault(k, v)
  try:   # image datasets and models (NCSN++ / DDPM++ / DDPM / NCSN fields)
    from score_sde_jax import image_configs
    for fn in ("cifar10_config", "mnist_config", "lsun_config", "ffhq_config", "celeba_config"):
      if hasattr(image_configs, fn):
        for k, v in flatten(getattr(image_configs, fn)()).items():
          keys.setdefault(k, v)
  except ImportError:  # pragma: no cover
    pass
  for name in dir(config_defaults):   # further default builders added later
    fn = getattr(config_defaults, name)
    if (name.endswith("_config") or name.endswith("_defaults")) and callable(fn) and \
        name not in ("base_config", "toy_config"):
      try:
        cfg = fn()
      except TypeError:
        continue
      if isinstance(cfg, ml_collections.ConfigDict):
        for k, v in flatten(cfg).items():
          keys.setdefault(k, v)
  return keys


def _type_ok(value, default) -> bool:
  if default is None or value is None:
    return True
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, str):
    return isinstance(value, str)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return True


def _type_name(v) -> str:
  return type(v).__name__


def validate_config(config, num_devices: int = 1) -> List[str]:
  """Raises ConfigError listing every problem; returns warnings (unknown model/data keys that are
  not typos of known ones, passed on to the model or dataset)."""
  known = schema()
  flat = flatten(config)
  errors, warnings = [], []
  for key, value in flat.items():
    if key not in known:
      section = key.split(".")[0]
      close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.85)
      if section in OPEN_SECTIONS and "." in key and not close:
        warnings.append(f"{key} is not a standard field (passed to the model/data code as is)")
        continue
      hint = f"; did you mean {close[0]!r}?" if close else ""
      errors.append(f"unknown config key {key!r}{hint}")
      continue
    if not _type_ok(value, known[key]):
      errors.append(f"{key}={value!r} has type {_type_name(value)}; expected {_type_name(known[key])} "
                    f"(like the default {known[key]!r})")
  missing = [k for k in flatten(config_defaults.defaults_for(config)) if k not in flat]
  if missing:
    errors.append(f"the config lacks {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}: complete it "
                  f"with config_defaults.complete(config) (the CLIs and train() do)")
  if errors:
    raise ConfigError("Invalid config:\n  - " + "\n  - ".join(errors))
  t = config.training
  for name in ("batch_size", "n_iters", "snapshot_freq", "log_freq", "snapshot_freq_for_preemption",
               "n_jitted_steps"):
    if t[name] <= 0:
      errors.append(f"training.{name}={t[name]} must be a positive integer")
  if t.batch_size > 0 and t.batch_size % num_devices:
    errors.append(f"training.batch_size={t.batch_size} does not divide by the number of devices "
                  f"({num_devices}); use a multiple of {num_devices}")
  ebs = config.eval.batch_size
  if ebs > 0 and ebs % num_devices:
    errors.append(f"eval.batch_size={ebs} does not divide by the number of devices ({num_devices}); "
                  f"use a multiple of {num_devices}")
  if t.n_jitted_steps > 1:
    for name in ("snapshot_freq", "snapshot_freq_for_preemption", "log_freq"):
      if t[name] > 0 and t[name] % t.n_jitted_steps:
        errors.append(f"training.{name}={t[name]} must be a multiple of training.n_jitted_steps="
                      f"{t.n_jitted_steps}")
  if t.snapshot_weights not in ("ema", "raw"):
    errors.append(f"training.snapshot_weights={t.snapshot_weights!r}; allowed values: 'ema', 'raw'")
  ds = config.data.dataset
  from score_sde_jax.datasets.images import IMAGE_DATASETS
  toy = config_defaults.TOY_DATASETS
  if ds not in toy and ds not in IMAGE_DATASETS:
    close = difflib.get_close_matches(ds, list(IMAGE_DATASETS) + list(toy), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    errors.append(f"data.dataset={ds!r} is not a known dataset{hint} (images: "
                  f"{', '.join(IMAGE_DATASETS)}; toy: {', '.join(toy)})")
  errors += _label_errors(config, toy)
  if not 0.0 <= config.model.ema_rate < 1.0:
    errors.append(f"model.ema_rate={config.model.ema_rate} must lie in [0, 1)")
  if config.model.dtype not in ("float32", "bfloat16", "float16"):
    errors.append(f"model.dtype={config.model.dtype!r}; allowed values: 'float32', 'bfloat16', 'float16'")
  if not errors:
    errors += _build_errors(config)
  if errors:
    raise ConfigError("Invalid config:\n  - " + "\n  - ".join(errors))
  return warnings


def _label_errors(config, toy_datasets) -> List[str]:
  """training.task, model.num_classes and training.label_dropout against each other and the data."""
  from score_sde_jax import classifier
  t, errors = config.training, []
  if t.task not in classifier.TASKS:
    errors.append(f"training.task={t.task!r}; allowed values: {', '.join(map(repr, classifier.TASKS))}")
  n = config.model.num_classes
  if n < 0 or (t.task != "score" and n < 2):
    errors.append(f"model.num_classes={n}: a {'classifier' if t.task != 'score' else 'model'} needs "
                  f"{'at least 2 classes' if t.task != 'score' else '0 (unconditional) or the number of classes'}")
  if not 0.0 <= t.label_dropout < 1.0:
    errors.append(f"training.label_dropout={t.label_dropout} must lie in [0, 1)")
  elif t.label_dropout > 0 and not (t.task == "score" and n > 0):
    errors.append(f"training.label_dropout={t.label_dropout} needs a class-conditional score model "
                  f"(training.task='score', model.num_classes > 0); set it to 0")
  if config_defaults.uses_labels(config) and config.data.dataset in toy_datasets:
    from score_sde_jax.datasets.images import toy_has_labels
    if not toy_has_labels(config.data.dataset):
      errors.append(f"data.dataset={config.data.dataset!r} has no class labels (the Gaussian mixtures "
                    f"mixture1d and ring8 label points by component): use one of those, or "
                    f"model.num_classes=0 with training.task='score'")
  return errors


def _build_errors(config) -> List[str]:
  """Every section built once without computing (the SDE, the model's parameter shapes, the loss, the
  sampler, the evaluation settings), so that a bad value anywhere fails before any work starts, whether or
  not the run would reach the code that reads it (snapshot sampling, the toy report, evaluation)."""
  from score_sde_jax import losses, models, sampling
  from score_sde_jax import sde as sde_lib
  from score_sde_jax import datasets
  errors = []

  def attempt(section, fn):
    try:
      return fn()
    except (ValueError, KeyError, TypeError, AttributeError, ArithmeticError) as e:
      msg = str(e).strip("'\"").splitlines()[0] if str(e) else type(e).__name__
      errors.append(f"{section}: {msg}")
      return None

  sde = attempt("training.sde", lambda: sde_lib.sde_from_config(config))
  shape = attempt("data", lambda: (1,) + datasets.data_shape(config))
  model = attempt("model", lambda: models.get_model(config))
  if model is not None and shape is not None:   # the model builds: its variables tree, traced once per
    from score_sde_jax.run import state as state_lib   # config (the readers check checkpoints against it)
    attempt("model", lambda: state_lib.variables_shapes(config))
  if sde is not None and model is not None:
    if config.training.task == "score":
      attempt("training", lambda: losses.get_loss_fn(sde, model.apply, config))
    else:
      from score_sde_jax import classifier
      attempt("training", lambda: classifier.get_losses_fn(sde, model.apply, config))
  if sde is not None and shape is not None:
    attempt("sampling", lambda: sampling.get_sampler(config, sde, shape))
  if "eval" in config:
    from score_sde_jax import eval_settings
    attempt("eval", lambda: eval_settings.settings_from_config(config))
  return errors


def apply_overrides(config, assignments) -> None:
  """Applies `a.b.c=value` assignments (value read as a Python literal, else as a string) in place.  A
  key that does not exist, at any depth, is a ConfigError naming it and the closest existing key: a typo
  must never be ignored or create a new field."""
  import ast
  existing = list(flatten(config))
  for a in assignments:
    key, sep, value = a.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ConfigError(f"override {a!r} must look like section.field=value, e.g. sampling.method=ode")
    if key not in existing:
      close = difflib.get_close_matches(key, existing, n=1, cutoff=0.6)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"unknown config key {key!r} in the override {a!r}{hint}")
    try:
      v = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      v = value
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    old = node[parts[-1]]
    if isinstance(old, (tuple, list)) and isinstance(v, (tuple, list)):
      v = type(old)(v)
    if isinstance(old, float) and isinstance(v, int) and not isinstance(v, bool):
      v = float(v)
    if not _type_ok(v, old):
      raise ConfigError(f"override {a!r}: {key} is a {_type_name(old)} (now {old!r}); got "
                        f"{_type_name(v)} {v!r}")
    node[parts[-1]] = v


def to_jsonable(config) -> Dict[str, Any]:
  def conv(v):
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      return {k: conv(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
      return [conv(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
      return v
    return repr(v)
  return conv(config)


def save_config(workdir: str, config) -> str:
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(to_jsonable(config), f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def load_saved_config(workdir: str):
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _resumable(key: str) -> bool:
  return key in RESUMABLE_FIELDS or key.startswith(RESUMABLE_SECTIONS)


def config_differences(old: Dict[str, Any], new) -> List[Tuple[str, Any, Any]]:
  """(key, saved value, new value) for every non-resumable field that differs."""
  a = flatten(old)
  b = flatten(to_jsonable(new))
  missing = object()
  diffs = []
  for key in sorted(set(a) | set(b)):
    if _resumable(key):
      continue
    va, vb = a.get(key, missing), b.get(key, missing)
    if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool) \
        and not isinstance(vb, bool) and float(va) == float(vb):
      continue
    if va != vb:
      diffs.append((key, "<absent>" if va is missing else va, "<absent>" if vb is missing else vb))
  return diffs


def check_resume_config(workdir: str, config, force: bool = False) -> List[Tuple[str, Any, Any]]:
  """Refuses (ConfigError) to continue a workdir whose saved config differs from `config` in a field
  that changes the model, the data or the optimisation, unless `force`.  Returns the differences."""
  old = load_saved_config(workdir)
  if old is None:
    return []
  diffs = config_differences(old, config)
  if diffs and not force:
    lines = "\n  ".join(f"{k}: saved {a!r} -> now {b!r}" for k, a, b in diffs)
    raise ConfigError(
        f"{workdir} holds a run with a different config ({os.path.join(workdir, CONFIG_FILE)}); "
        f"these fields change the model, the data or the optimisation:\n  {lines}\n"
        f"Use a new --workdir, or pass --force_resume to continue anyway.")
  return diffs

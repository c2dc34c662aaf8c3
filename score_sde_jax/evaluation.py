"""Likelihood evaluation at scale: bits/dim over a whole split, sharded and resumable, and ScoreFlow's bound.

`evaluate_likelihood(config, workdir)` (what `scripts/evaluate.py --config.eval.enable_bpd=True` runs)
restores the EMA parameters of the chosen checkpoints and computes, for every example of the split
`config.eval.bpd_dataset` exactly once (padded batches with a mask: padded rows are computed but never
counted), `config.eval.num_repeats` times with fresh dequantization noise and Hutchinson probes:

  * image data: bits/dim of the 8-bit integers (`likelihood.bits_per_dim`, uniform dequantization, the
    scaler of `config.data.centered`; the convention is `likelihood.BPD_CONVENTION`);
  * toy data: the NLL in nats/dim and bits/dim of the continuous points (`likelihood.log_likelihood`).

Every batch is one jitted program over a 1-D mesh of all devices, with the batch sharded along it: the
adaptive solver is a single while-loop whose step count is shared by the whole global batch, so no
device or host runs a solver of its own that others would have to wait for.  The PRNG key of
(repeat r, batch i) is fold_in(fold_in(PRNGKey(seed), r), i), so a rerun draws the same noise.

Resumability: each finished (repeat, batch) appends one JSON line (the global example ids of its
unmasked rows, their bits/dim and bound, the NFE, seconds) to `<workdir>/eval/<name>.jsonl` and fsyncs
it; a rerun reads the file, skips the (repeat, batch) entries already there (a partially written last
line is dropped) and the summary is built from the unique entries, with a check that every example is
counted exactly once per repeat.  The summary is written to `<workdir>/eval/<name>.summary.json`, and
its bits/dim (NLL) and bound go to TensorBoard at the checkpoint's step (`<workdir>/eval/logs`, beside
the FID/KID/IS of `sample_quality`).

ScoreFlow's bound, computed beside bits/dim, is `bound.variational_bound`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from score_sde_jax import bound as bound_lib
from score_sde_jax import config_defaults
from score_sde_jax.run import metric_writer
from score_sde_jax.eval_settings import EvalError, EvalSettings, settings_from_config  # noqa: F401
from score_sde_jax import likelihood
from score_sde_jax import sde as sde_lib
from score_sde_jax.eval_results import ResultsFile, format_summary, summarize  # noqa: F401  (re-exported)
from score_sde_jax.eval_results import likelihood_summary, other_results

Array = jax.Array


# ---------------------------------------------------------------------------------------------------
# Settings, checkpoints, the results file
# ---------------------------------------------------------------------------------------------------
def _train_hint(workdir: str) -> str:
  return (f"Train first, e.g. `python scripts/train.py --config <config.py> --workdir {workdir}`, or pass "
          f"the --workdir of a finished training run.")


def select_checkpoints(config, workdir: str, which="latest") -> List[int]:
  """Checkpoint steps to evaluate: 'latest' (the newest), 'range' (the official convention: checkpoint
  index i ∈ [eval.begin_ckpt, eval.end_ckpt] ↔ step i · training.snapshot_freq), or a list of steps."""
  from score_sde_jax.run import checkpoint as ckpt_lib
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise EvalError(f"workdir {workdir} does not exist. {_train_hint(workdir)}")
  cdir = ckpt_lib.checkpoint_dir(workdir)
  steps = sorted(int(n) for n in os.listdir(cdir) if n.isdigit()) if os.path.isdir(cdir) else []
  if not steps:
    raise EvalError(f"no checkpoints in {cdir}. {_train_hint(workdir)}")
  if which == "latest":
    return [steps[-1]]
  if which == "range":
    freq = int(config.training.snapshot_freq)
    lo, hi = int(config.eval.begin_ckpt) * freq, int(config.eval.end_ckpt) * freq
    chosen = [s for s in steps if lo <= s <= hi]
    if not chosen:
      raise EvalError(f"no checkpoint in {cdir} has a step in [eval.begin_ckpt·snapshot_freq, "
                      f"eval.end_ckpt·snapshot_freq] = [{lo}, {hi}]; available steps: {steps}.")
    return chosen
  wanted = [int(s) for s in which]
  missing = [s for s in wanted if s not in steps]
  if missing:
    raise EvalError(f"no checkpoint for step(s) {missing} in {cdir}; available steps: {steps}.")
  return wanted


def read_step(config, workdir: str, step: int, weights: str = "ema"):
  """`checkpoints.Pretrained` of checkpoint `step` of a training workdir, read-only, with the checks every
  loading path makes (the config's model shapes, finite weights naming the first bad parameter).  A
  failure names the step and the config fields that differ from the workdir's saved config."""
  from score_sde_jax import checkpoints
  from score_sde_jax.run import config_utils
  try:
    return checkpoints.read_pretrained(workdir, config, weights=weights, step=step)
  except checkpoints.CheckpointError as e:
    saved = config_utils.load_saved_config(workdir)
    diffs = [k for k, _, _ in config_utils.config_differences(saved, config)] if saved else []
    hint = (f" The config differs from the one the workdir was trained with "
            f"({os.path.join(workdir, config_utils.CONFIG_FILE)}) in: {', '.join(diffs[:12])}."
            if diffs else "")
    raise EvalError(f"checkpoint step {step}: {str(e).splitlines()[0]}{hint}") from None


# Data fields that do not change the numbers of an evaluation (where the files are, training augmentation).
_DATA_FIELDS_NOT_IN_RESULTS = ("tfds_data_dir", "random_flip", "uniform_dequantization")


def results_identity(config, settings: "EvalSettings", fingerprint: str, weights: str) -> dict:
  """Everything that determines an evaluation's numbers: the weights (content fingerprint and which set),
  the model and SDE config, the data config and the settings.  The repeat count is left out: repeat r's
  noise depends only on (seed, r, batch), so raising `num_repeats` extends the earlier run's file.  The results file is named by its hash, and its header records it, so results of a
  retrained run, another model or another SDE in the same workdir are never served as these."""
  settings = dataclasses.asdict(settings)
  del settings["num_repeats"]
  return {"weights": {"fingerprint": fingerprint, "set": weights},
          "model": config.model.to_dict(),
          "sde": {"sde": str(config.training.sde), "continuous": bool(config.training.continuous)},
          "data": {k: v for k, v in config.data.to_dict().items() if k not in _DATA_FIELDS_NOT_IN_RESULTS},
          "settings": settings}


def identity_hash(identity: dict) -> str:
  return hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------
# The evaluation loop
# ---------------------------------------------------------------------------------------------------
def make_batch_fn(config, sde, model, settings: EvalSettings, mesh, is_toy: bool):
  """The jitted per-batch program (params, x, key) -> (value [B], bound [B], nfe): bits/dim (images,
  x uint8) or NLL in nats/dim (toy, x float), batch sharded along `mesh`, params and key replicated.

  The likelihood solve is pinned to the batch sharding too (`ode.solve`'s `sharding`): every device
  integrates its share of the batch, in lockstep under one step-size controller for the whole batch (an
  all-reduce of the error norm per step), so the values do not depend on the device count."""
  from score_sde_jax import models
  from score_sde_jax.datasets import get_data_scaler
  from score_sde_jax.run import parallel
  continuous = bool(config.training.continuous)
  s = settings
  scaler = get_data_scaler(config)
  centered = bool(config.data.centered)
  rep, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)

  def fn(params, x, key):
    score_fn = models.get_score_fn(sde, model, params, continuous=continuous, train=False)
    k_ll, k_b = jax.random.split(key)
    d = math.prod(x.shape[1:])
    if is_toy:
      y = scaler(x)
      logp, _, nfe = likelihood.log_likelihood(k_ll, sde, score_fn, y, divergence=s.divergence,
                                               rtol=s.rtol, atol=s.atol, eps=s.eps,
                                               num_probes=s.num_probes, solver=s.solver, sharding=bsh)
      log_det = likelihood.scaler_log_abs_det(scaler, x)
      value = -(logp + log_det) / d
      if s.bound:
        bound = (bound_lib.variational_bound(k_b, sde, score_fn, y, num_t=s.bound_num_t, eps=s.eps) - log_det) / d
      else:
        bound = jnp.zeros_like(value)
      return value, bound, nfe
    value, _, nfe = likelihood.bits_per_dim(
        k_ll, sde, score_fn, x, num_bits=8, scaler="centered" if centered else "unit",
        dequantization="uniform", divergence=s.divergence, rtol=s.rtol, atol=s.atol, eps=s.eps,
        num_probes=s.num_probes, solver=s.solver, sharding=bsh)
    if s.bound:
      # The same dequantization noise as bits_per_dim (it splits its key the same way).
      k_deq = jax.random.split(k_ll)[0]
      u = (x.astype(jnp.float32) + jax.random.uniform(k_deq, x.shape, jnp.float32)) / 256.0
      sc = likelihood.SCALERS["centered" if centered else "unit"]
      log_det = likelihood.scaler_log_abs_det(sc, u)
      nats = bound_lib.variational_bound(k_b, sde, score_fn, sc(u), num_t=s.bound_num_t, eps=s.eps)
      bound = (nats - log_det) / (d * math.log(2.0)) + 8
    else:
      bound = jnp.zeros_like(value)
    return value, bound, nfe

  return jax.jit(fn, in_shardings=(rep, bsh, rep), out_shardings=(bsh, bsh, rep))


def batch_key(seed: int, repeat: int, batch: int) -> Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), repeat), batch)


def evaluate_likelihood(config, workdir: str, *, checkpoints="latest", devices: Optional[Sequence] = None,
                        batch_size: Optional[int] = None, max_examples: Optional[int] = None,
                        seed: Optional[int] = None, bound: bool = True, bound_num_t: int = 16,
                        stop_after: Optional[int] = None, progress: bool = False,
                        report: Optional[Callable[[str], None]] = None, params=None,
                        pretrained=None, weights: str = "ema") -> List[dict]:
  """Bits/dim (images) or NLL (toy) of the `weights` ('ema' or 'raw') of the chosen checkpoints; see the
  module docstring.  Returns one summary dict per checkpoint (also written to `<workdir>/eval/*.summary.json`).

  max_examples: evaluate only the first n examples of the split.  stop_after: stop after computing
  that many new (repeat, batch) entries (simulates an interruption; the summary is then None).
  params: evaluate these parameters instead of a checkpoint (checkpoints is then ignored; step -1).
  pretrained: a `checkpoints.Pretrained` (any checkpoint format) to evaluate instead of the workdir's
  checkpoints; results still go to `<workdir>/eval/`.

  Results files are named by `results_identity` (weights fingerprint, model, SDE, data, settings): a rerun
  with the same identity continues its file; anything else is computed afresh, saying which earlier file of
  the same step differs in what.
  """
  from score_sde_jax import models
  from score_sde_jax.run import config_utils, parallel
  process0 = jax.process_index() == 0
  if report is None:
    report = print if process0 else (lambda *_: None)
  mesh = parallel.make_mesh(devices)
  n_dev = mesh.devices.size
  try:
    config_utils.validate_config(config, 1)
  except config_utils.ConfigError as e:
    raise EvalError(str(e)) from e
  s = settings_from_config(config, batch_size=batch_size, max_examples=max_examples, seed=seed,
                           num_devices=n_dev, bound=bound, bound_num_t=bound_num_t)
  if pretrained is not None:
    params = pretrained.variables
    steps = [pretrained.step if pretrained.step is not None else -1]
  elif params is None:
    steps = select_checkpoints(config, workdir, checkpoints)
  else:
    steps = [-1]
  sde = sde_lib.sde_from_config(config)
  model = models.get_model(config)
  evaluator = LikelihoodEvaluator(config, sde, model, mesh, s, workdir, report=report, progress=progress,
                                  stop_after=stop_after)
  results = []
  writer = metric_writer.MetricWriter(os.path.join(os.path.abspath(workdir), "eval", "logs"))
  try:
    for step in steps:
      pre = pretrained
      if params is None:
        pre = pretrained if pretrained is not None else read_step(config, workdir, step, weights)
        p, fingerprint, which_weights = pre.variables, pre.fingerprint, pre.weights
      else:
        from score_sde_jax import checkpoints as ckpts
        p, fingerprint, which_weights = params, ckpts.fingerprint(params), "given"
      r = evaluator.run(p, step, fingerprint=fingerprint, weights=which_weights, pretrained=pre)
      results.append(r)
      if r is not None:
        writer.write_scalars(step, {f"eval/{k}": r[k] for k in TENSORBOARD_KEYS
                                    if k in r and math.isfinite(r[k])})
        writer.flush()
  finally:
    writer.close()
  return results


# The summary's numbers that go to TensorBoard (toy runs have the nats keys, images the bits keys).
TENSORBOARD_KEYS = ("bits_per_dim", "nll_nats_per_dim", "bound_bits_per_dim", "bound_nats_per_dim")


class LikelihoodEvaluator:
  """Bits/dim (images) or NLL (toy) with ScoreFlow's bound over a split (see the module docstring), for
  any weights: one `run(params, step, ...)` per checkpoint; the data iterator and the compiled batch
  program are built once."""

  def __init__(self, config, sde, model, mesh, settings: EvalSettings, workdir: str, *,
               report: Callable[[str], None], progress: bool = False, stop_after: Optional[int] = None):
    from score_sde_jax import datasets
    self.config, self.mesh, self.s, self.workdir = config, mesh, settings, workdir
    self.report, self.progress, self.stop_after = report, progress, stop_after
    self.toy = config_defaults.is_toy(config)
    s = settings
    try:
      self.it = datasets.get_eval_iterator(config, s.split, batch_size=s.batch_size,
                                           process_index=jax.process_index(), process_count=jax.process_count())
    except Exception as e:  # noqa: BLE001
      raise EvalError(f"cannot open split {s.split!r} of data.dataset={config.data.dataset!r} "
                      f"(eval.bpd_dataset): {type(e).__name__}: {e}") from e
    n = self.it.num_examples
    self.num_examples = n if s.max_examples is None else min(n, s.max_examples)
    self.num_batches = math.ceil(self.num_examples / s.batch_size)
    self.batch_fn = make_batch_fn(config, sde, model, s, mesh, self.toy)

  def run(self, params, step: int, *, fingerprint: str, weights: str, pretrained=None) -> Optional[dict]:
    """The summary of `params` (host or replicated), appended to / resumed from its results file (named
    by `results_identity`); None when stopped early (`stop_after`) or on processes other than 0."""
    from score_sde_jax.run import parallel
    s, it, toy, report, pre = self.s, self.it, self.toy, self.report, pretrained
    process0 = jax.process_index() == 0
    num_examples, num_batches, host_batch = self.num_examples, self.num_batches, it.batch_size
    rep, bsh = parallel.replicated(self.mesh), parallel.batch_sharding(self.mesh)
    unit = "nats/dim" if toy else "bits/dim"
    p = parallel.replicate(params, self.mesh)
    identity = results_identity(self.config, s, fingerprint, weights)
    kind = "nll" if toy else "bpd"
    label = f"step{step}" if pre is None or pre.format == "workdir" else f"{pre.format}_step{step}"
    prefix = f"{kind}_{label}_{s.split}_"
    name = prefix + identity_hash(identity)
    out_dir = os.path.join(os.path.abspath(self.workdir), "eval")
    header = {"step": step, "identity": identity, "settings": dataclasses.asdict(s),
              "dataset": str(self.config.data.dataset), "num_examples": num_examples, "unit": unit}
    if pre is not None:
      header.update(checkpoint=pre.path, format=pre.format, weights=pre.weights, fingerprint=fingerprint)
    if process0:
      for path, parts in other_results(out_dir, prefix, name + ".jsonl", identity):
        report(f"step {step}: the results in {path} were computed with other {', '.join(parts)} "
               f"(their file records what); computing these afresh")
    rf = ResultsFile(os.path.join(out_dir, name + ".jsonl"), header) if process0 else None
    done = set(rf.entries) if rf is not None else set()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      flags = np.zeros((s.num_repeats, num_batches), np.int32)
      for r, i in done:
        flags[r, i] = 1
      flags = np.asarray(multihost_utils.broadcast_one_to_all(flags))
      done = {(r, i) for r in range(s.num_repeats) for i in range(num_batches) if flags[r, i]}
    todo = [(r, i) for r in range(s.num_repeats) for i in range(num_batches) if (r, i) not in done]
    if done:
      report(f"step {step}: resuming, {len(done)} of {s.num_repeats * num_batches} (repeat, batch) "
             f"entries already in {os.path.join(out_dir, name + '.jsonl')}")
    bar = None
    if self.progress and process0 and todo:
      from tqdm.auto import tqdm
      bar = tqdm(total=len(todo), unit="batch", desc=f"{unit} step {step}")
    t0 = time.time()
    new = 0
    interrupted = False
    for r, i in todo:
      if self.stop_after is not None and new >= self.stop_after:
        interrupted = True
        break
      b = it.batch_at(i)
      pos = i * s.batch_size + it.process_index * host_batch + np.arange(host_batch)
      mask = np.asarray(b["mask"], bool) & (pos < num_examples)
      x = np.asarray(b["image"] if toy else b["image_int"])
      tb = time.time()
      value, bnd, nfe = self.batch_fn(p, parallel.host_to_global(x, bsh),
                                 jax.device_put(batch_key(s.seed, r, i), rep))
      value, bnd = parallel.to_host(value), parallel.to_host(bnd)
      nfe = int(parallel.to_host(nfe))
      gmask = parallel.to_host(parallel.host_to_global(mask, bsh)) if jax.process_count() > 1 else mask
      gpos = (i * s.batch_size + np.arange(s.batch_size))
      rec = {"repeat": r, "batch": i, "ids": gpos[gmask].tolist(),
             "value": np.asarray(value, np.float64)[gmask].tolist(),
             "bound": np.asarray(bnd, np.float64)[gmask].tolist(), "nfe": nfe,
             "seconds": time.time() - tb}
      if rf is not None:
        rf.add(rec)
      new += 1
      if bar is not None:
        bar.update(1)
        bar.set_postfix(nfe=nfe, value=f"{np.mean(rec['value']):.4f}")
    if bar is not None:
      bar.close()
    if interrupted or not process0:
      return None
    summary = likelihood_summary(rf, s, num_examples, toy, step, time.time() - t0, self.workdir)
    with open(os.path.join(out_dir, name + ".summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    summary["summary_path"] = os.path.join(out_dir, name + ".summary.json")
    report(format_summary(summary))
    return summary



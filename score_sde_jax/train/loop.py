"""The training loop: data → sharded train step → EMA → logs, snapshots and preemption-safe checkpoints.

`train(config, workdir)` is what `scripts/train.py` runs.  In order, before anything is compiled:
the config is validated (`config_utils.validate_config`), the workdir's saved config is compared with
this one (`config_utils.check_resume_config`), and the training data is opened.  Then the state is
initialised (replicated over a 1-D device mesh) or restored from the newest good checkpoint together with
the data iterator's position, and the loop runs until `training.n_iters` steps are done.

Per step nothing waits on the device: losses stay on the device until the next log (every
`training.log_freq` steps), checkpoint or the end, when they are fetched, checked (a NaN/Inf loss stops
the run naming its step, before anything is saved, so the last good checkpoint stays intact) and written
to TensorBoard and the progress bar.

Checkpoints: every `snapshot_freq_for_preemption` steps (rolling, keep 1), every `snapshot_freq` steps
(kept; also a PNG of samples from the EMA parameters — `training.snapshot_weights='raw'`: the training
weights; one line when the EMA is still young — and the test-split loss), at the end, and on
SIGTERM/SIGINT (saved after the current step, then the run exits).

Reliability: nothing is written before every check passed (config, workdir, resume guard, data); then the
workdir is locked (`train/lock.py`: one training per workdir) before the Checkpointer is created, and the
saved config is replaced only once the resume succeeded.  A checkpoint that cannot be written stops the
run (`checkpoint.CheckpointWriteError`, one line: the caller prints it) with the previous checkpoint
intact; its detail and orbax's error logs go to `<workdir>/logs/errors.log`, not the console.  A problem
that recurs (no evaluation data) is said once.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import numpy as np

from score_sde_jax import config_defaults
from score_sde_jax import datasets
from score_sde_jax import sde as sde_lib
from score_sde_jax.train import actions
from score_sde_jax.run import checkpoint as ckpt_lib
from score_sde_jax.train.actions import NonFiniteLossError  # noqa: F401  (re-exported)
from score_sde_jax.run import config_utils
from score_sde_jax.run import metric_writer
from score_sde_jax.run import parallel
from score_sde_jax.run import state as state_lib
from score_sde_jax.train import step as step_lib


class DataError(config_utils.ConfigError):
  """The configured data cannot be opened."""


@dataclasses.dataclass
class TrainResult:
  state: Any
  step: int
  workdir: str
  checkpoint_dir: str
  log_dir: str
  sample_dir: str
  preempted: bool = False       # stopped by SIGTERM/SIGINT after saving a checkpoint
  signal: Optional[int] = None
  resumed_from: Optional[int] = None
  skipped_checkpoints: List = dataclasses.field(default_factory=list)
  history: List[Dict[str, float]] = dataclasses.field(default_factory=list)  # per-step metrics
  last_samples: Any = None      # samples of the last snapshot (data space, numpy), process 0
  lock: Any = None              # the workdir's lock, still held (train(..., keep_lock=True) only)


is_toy = config_defaults.is_toy


def open_train_iterator(config, batch_size: int):
  """This host's training iterator (its 1/process_count share of every global batch of `batch_size`),
  with a clear error when the data is missing."""
  ds = datasets
  # tfds warns about every folder it probes ("Variant folder ... has no dataset_info.json"): when the data
  # is missing, the DataError below says what to do, in one line.
  quiet = _DropBelowError("tensorflow_datasets")
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(quiet)
  try:
    return ds.get_train_iterator(config, batch_size=batch_size, seed=int(config.seed),
                                 process_index=jax.process_index(), process_count=jax.process_count())
  except (FileNotFoundError, OSError, ImportError, ValueError, RuntimeError) as e:
    raise DataError(f"Cannot open the training data for data.dataset={config.data.dataset!r}: "
                    f"{type(e).__name__}: {e}") from e
  finally:
    absl_logger.removeFilter(quiet)


class _DropBelowError(logging.Filter):
  """Drops the WARNING/INFO records logged from modules whose path contains `where`."""

  def __init__(self, where: str):
    super().__init__()
    self.where = where

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or self.where not in record.pathname


class _SignalCatcher:
  """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint and exit cleanly.  A second
  SIGINT raises KeyboardInterrupt at once."""

  def __init__(self, enabled: bool = True):
    self.signum: Optional[int] = None
    self._old = {}
    if enabled and threading_is_main():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._handle)

  def _handle(self, signum, frame):  # noqa: ARG002
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def restore(self):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}


def threading_is_main() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _stack_batches(batches):
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def train(config, workdir: str, *, devices: Optional[Sequence] = None, force_resume: bool = False,
          progress: bool = True, report: Callable[[str], None] = None, async_checkpoint: bool = True,
          handle_signals: bool = True, keep_history: bool = False,
          on_step: Optional[Callable[[int], None]] = None, keep_lock: bool = False) -> TrainResult:
  """Trains (or resumes) the run of `config` in `workdir`; see the module docstring.

  devices: the devices of the 1-D data-parallel mesh (default: all).  force_resume: continue a workdir
  whose saved config differs (only where its checkpoints fit this config's train state).
  keep_history: keep every step's metrics in the result (tests).  on_step(step): called after each
  dispatched step (tests use it to inject faults).  keep_lock: keep the workdir's lock after returning
  (until the process ends: scripts/train.py, which writes the toy report afterwards).

  Nothing is written before every check has passed (the config, the workdir, the resume guard, the data,
  the workdir's lock: `train/lock.py`); the saved config is replaced only once the resume succeeded.
  """
  process0 = jax.process_index() == 0
  if report is None:
    report = print if process0 else (lambda *_: None)
  workdir = os.path.abspath(workdir)
  mesh = parallel.make_mesh(devices)
  n_dev = mesh.devices.size

  # ---- checks before any compilation (nothing is written) -----------------------------------------
  config_utils.complete_config(config, report)
  for w in config_utils.validate_config(config, n_dev):
    report(f"config note: {w}")
  global_batch = int(config.training.batch_size)
  host_batch = parallel.local_batch_size(global_batch, mesh)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_utils.ConfigError(f"--workdir {workdir} exists and is not a directory: pass a directory "
                                   f"(it is created when missing).")
  ckpt_dir = ckpt_lib.checkpoint_dir(workdir)
  if os.path.exists(ckpt_dir) and not os.path.isdir(ckpt_dir):
    raise config_utils.ConfigError(f"{ckpt_dir} is not a directory: {workdir} is not a training workdir; "
                                   f"use another --workdir.")
  has_checkpoints = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
  # A workdir without checkpoints has nothing to protect: its config is simply replaced.
  diffs = (config_utils.check_resume_config(workdir, config, force=force_resume)
           if has_checkpoints else [])
  for k, a, b in diffs:
    report(f"WARNING (--force_resume): {k} changed from {a!r} to {b!r}")
  if diffs:
    problem = _state_mismatch(workdir, config, mesh)
    if problem:
      raise config_utils.ConfigError(
          f"--force_resume cannot continue {workdir}: its checkpoints hold another train state than this "
          f"config builds ({problem}; changed: {', '.join(k for k, _, _ in diffs[:8])}). Nothing was "
          f"written. Train this config in a new --workdir.")
  train_iter = open_train_iterator(config, global_batch)
  scaler = datasets.get_data_scaler(config)

  # ---- from here on the workdir is written: one training at a time (train/lock.py) ---------------------
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise config_utils.ConfigError(f"cannot create --workdir {workdir}: {e.strerror or e}. Pass a "
                                   f"directory you can write to.") from e
  from score_sde_jax.train import lock as lock_lib
  lock = lock_lib.acquire_for_run(workdir)
  log_dir = os.path.join(workdir, "logs")
  error_log = metric_writer.ErrorLog(log_dir, enabled=process0)
  diverts = [(logging.getLogger("absl"), metric_writer.DivertToErrorLog(
                  error_log, lambda r: r.levelno >= logging.ERROR and "orbax" in r.pathname)),
             (logging.getLogger("asyncio"), metric_writer.DivertToErrorLog(
                  error_log, lambda r: r.levelno >= logging.ERROR and any(
                      h in (r.getMessage() + repr(r.exc_info)) for h in ("tensorstore", "orbax"))))]
  for logger, f in diverts:
    logger.addFilter(f)
  ok = False
  try:
    result = _train_locked(
        config=config, workdir=workdir, progress=progress, report=report, async_checkpoint=async_checkpoint,
        handle_signals=handle_signals, keep_history=keep_history, on_step=on_step, process0=process0,
        mesh=mesh, n_dev=n_dev, global_batch=global_batch, host_batch=host_batch, ckpt_dir=ckpt_dir,
        diffs=diffs, train_iter=train_iter, scaler=scaler, log_dir=log_dir)
    ok = True
    if keep_lock:
      result.lock = lock
    return result
  except (ckpt_lib.CheckpointWriteError, OSError) as e:
    # One line on the console (by the caller); the traceback and the library logs go to errors.log.
    error_log.write(f"training in {workdir} stopped: {e}", exc=e)
    e.details = error_log.where()
    raise
  finally:
    for logger, f in diverts:
      logger.removeFilter(f)
    if not (keep_lock and ok):
      lock.release()


def _state_mismatch(workdir: str, config, mesh) -> Optional[str]:
  """How the train state of `config` differs from the one the workdir's saved config builds (the first
  differing leaf), or None when they match or the saved config cannot be built (the restore decides)."""
  from score_sde_jax.run import restore as restore_lib
  try:
    old = restore_lib.abstract_train_state(restore_lib.load_workdir_config(workdir), mesh)
  except Exception:  # noqa: BLE001
    return None
  new = restore_lib.abstract_train_state(config, mesh)
  a = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(old)[0]}
  b = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(new)[0]}
  for k in sorted(set(a) | set(b)):
    if k not in a or k not in b:
      return f"{k} is {'new' if k not in a else 'gone'}"
    if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype:
      return f"{k} was {a[k].dtype}{list(a[k].shape)}, is now {b[k].dtype}{list(b[k].shape)}"
  return None


def _train_locked(*, config, workdir, progress, report, async_checkpoint, handle_signals, keep_history, on_step,
                  process0, mesh, n_dev, global_batch, host_batch, ckpt_dir, diffs, train_iter, scaler,
                  log_dir) -> TrainResult:
  """The part of `train` that runs with the workdir locked: build, restore (or initialise), loop."""
  from score_sde_jax import models as models_lib
  from score_sde_jax.run import restore as restore_lib

  t_cfg = config.training
  sde = sde_lib.sde_from_config(config)
  model = models_lib.get_model(config)
  tx, lr_fn = state_lib.get_optimizer(config)
  first = next(train_iter)    # the batch of step 1 (a run restored from a checkpoint refetches its own)
  if np.asarray(first["image"]).shape[0] != host_batch:
    raise DataError(f"the training iterator yields batches of {np.asarray(first['image']).shape[0]} "
                    f"examples on this host; expected {host_batch} (global batch {global_batch} over "
                    f"{jax.process_count()} host(s)).")
  data_shape = tuple(np.asarray(first["image"]).shape[1:])
  rep, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  create = jax.jit(lambda k: state_lib.create_train_state(config, model, k, (1,) + data_shape, tx),
                   out_shardings=rep)
  abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                                    jax.eval_shape(create, jax.random.PRNGKey(int(config.seed))))
  checkpointer = ckpt_lib.Checkpointer(workdir, snapshot_freq=int(t_cfg.snapshot_freq),
                                       async_save=async_checkpoint)
  try:
    # The one restore (run/restore.py): onto this run's mesh, whatever topology wrote the checkpoint.
    restored = restore_lib.restore_checkpoint(checkpointer, abstract, mesh=mesh, report=report)
    if restored is not None:
      state, first = restored.state, None
      _resume_data(restored, train_iter, ckpt_dir, n_dev, report)
    else:
      state = create(jax.random.PRNGKey(int(config.seed)))
    # The resume succeeded: now the workdir's config is replaced (the one the earlier steps were trained
    # with is kept as config.superseded.<time>.json).
    if diffs and process0:
      os.replace(os.path.join(workdir, config_utils.CONFIG_FILE),
                 os.path.join(workdir, f"config.superseded.{int(time.time())}.json"))
    if process0:
      config_utils.save_config(workdir, config)
    ctx = actions.RunContext(config=config, sde=sde, model=model, scaler=scaler, mesh=mesh, rep=rep, bsh=bsh,
                             ckpt_dir=ckpt_dir, sample_dir=os.path.join(workdir, "samples"), say=report,
                             process0=process0)
    steps = _compiled_steps(config, sde, model, tx, lr_fn, scaler, mesh)
    return _loop(ctx, state, first, steps, checkpointer, train_iter, data_shape=data_shape, workdir=workdir,
                 log_dir=log_dir, resumed_from=restored.step if restored is not None else None,
                 global_batch=global_batch, progress=progress, handle_signals=handle_signals,
                 keep_history=keep_history, on_step=on_step)
  finally:
    checkpointer.close()


def _resume_data(restored, train_iter, ckpt_dir: str, n_dev: int, report) -> None:
  """Puts the data iterators where the checkpoint left them, and says what was resumed."""
  step, saved = restored.step, restored.data
  try:
    data_state = ckpt_lib.decode_data_state(saved)
    note = None if data_state is None else train_iter.set_state(data_state)
  except ValueError as e:
    raise DataError(f"checkpoint {step} in {ckpt_dir}: {e}") from e
  if data_state is None:
    report(f"Checkpoint {step} was converted from {saved['converted_from']}: the data starts afresh.")
  elif note:
    report(f"Checkpoint {step}: {note}")
  report(f"Resuming from step {step} ({os.path.join(ckpt_dir, str(step))}).")
  hosts, devices = restored.saved_hosts, restored.saved_devices
  if (hosts is not None and hosts != jax.process_count()) or (devices is not None and devices != n_dev):
    report(f"The checkpoint was written on {devices or '?'} device(s) / {hosts or '?'} host(s); this run "
           f"has {n_dev} / {jax.process_count()}: the restored state and the data order are exact, the "
           f"following steps agree with an uninterrupted run to float rounding (the gradient all-reduce "
           f"adds in another order).")


def _compiled_steps(config, sde, model, tx, lr_fn, scaler, mesh):
  """(one step, n_jitted_steps steps or None), jitted over the mesh: (state, batch) -> (state, metrics)."""
  rep = parallel.replicated(mesh)
  train_step = step_lib.make_train_step(config, sde, model, tx, lr_fn, scaler=scaler)
  # Donating the old state halves its memory on accelerators (orbax copies a state to host memory
  # before `save` returns).  On CPU a host copy may alias the device buffer, so nothing is donated there.
  donate = (0,) if mesh.devices.flat[0].platform != "cpu" else ()
  one = jax.jit(train_step, in_shardings=(rep, parallel.batch_sharding(mesh)), out_shardings=(rep, rep),
                donate_argnums=donate)
  n_jit = int(config.training.n_jitted_steps)
  multi = None
  if n_jit > 1:
    multi = jax.jit(step_lib.make_multi_step(train_step, n_jit),
                    in_shardings=(rep, parallel.batch_sharding(mesh, leading_axes=1)),
                    out_shardings=(rep, rep), donate_argnums=donate)
  return one, multi


def _loop(ctx, state, first, steps, checkpointer, train_iter, *, data_shape, workdir, log_dir, resumed_from,
          global_batch, progress, handle_signals, keep_history, on_step) -> TrainResult:
  """The training loop: steps, with the periodic actions of `train/actions.py`."""
  config, t_cfg = ctx.config, ctx.config.training
  n_iters, n_jit = int(t_cfg.n_iters), int(t_cfg.n_jitted_steps)
  log_freq, eval_freq = int(t_cfg.log_freq), int(t_cfg.eval_freq)
  snapshot_freq, preempt_freq = int(t_cfg.snapshot_freq), int(t_cfg.snapshot_freq_for_preemption)
  p_step, p_multi = steps
  step = int(parallel.to_host(state.step))
  bar = None
  if progress and ctx.process0:
    from tqdm.auto import tqdm
    bar = tqdm(total=n_iters, initial=step, unit="step", dynamic_ncols=True, smoothing=0.1, desc="train",
               file=sys.stderr)
  ctx = dataclasses.replace(ctx, say=(lambda msg: bar.write(msg)) if bar is not None else ctx.say)
  writer = metric_writer.MetricWriter(log_dir, enabled=ctx.process0)
  logger = actions.MetricLogger(writer, bar, global_batch=global_batch, ckpt_dir=ctx.ckpt_dir,
                                start_step=step, keep_history=keep_history, clock=time.time)
  ckpt = actions.Checkpointing(checkpointer, train_iter, logger, ctx.mesh.devices.size, resumed_from)
  evaluator = actions.LossEvaluator(ctx, writer)
  sampler = (actions.SnapshotSampler(ctx, data_shape) if str(config.training.task) == "score"
             else actions.AccuracyEvaluator(ctx, writer))
  do_batch_eval = eval_freq > 0 and bool(config.eval.enable_loss)
  catcher = _SignalCatcher(handle_signals)
  samples = None
  batch_keys = ("image", "label") if config_defaults.uses_labels(config) else ("image",)
  if resumed_from is None:
    ctx.say(f"Training from scratch in {workdir} on {ctx.mesh.devices.size} device(s) "
            f"({jax.devices()[0].platform}), global batch {global_batch}.")
  try:
    while step < n_iters:
      # Multi-step chunks stay aligned to multiples of n_jitted_steps (a run resumed from a SIGTERM
      # checkpoint at another step first takes single steps), so that log/snapshot steps are hit.
      n = n_jit if (p_multi is not None and step % n_jit == 0 and n_iters - step >= n_jit) else 1
      batches = [first if i == 0 and first is not None else next(train_iter) for i in range(n)]
      first = None
      state, metrics = _apply(p_step, p_multi, state, batches, ctx.mesh, batch_keys)
      logger.add(step + 1, metrics, n)
      step += n
      if on_step is not None:
        on_step(step)
      if step % log_freq == 0:
        logger.flush(ckpt.last_saved)
      if do_batch_eval and (step - n) // eval_freq != step // eval_freq and evaluator.available:
        evaluator.batch_loss(state.params, step)
      stop = catcher.signum is not None
      if jax.process_count() > 1 and step % log_freq == 0:
        stop = _any_process(stop)
      if step % snapshot_freq == 0 or step == n_iters:
        ckpt.save(step, state)
        samples = _snapshot(ctx, state, step, evaluator, sampler, writer, samples)
      elif step % preempt_freq == 0:
        ckpt.save(step, state)
      if stop:
        ckpt.save(step, state, wait=True)
        name = signal.Signals(catcher.signum).name if catcher.signum else "signal"
        ctx.say(f"Received {name}: saved a checkpoint at step {step} in {ctx.ckpt_dir}; exiting. "
                f"Run the same command again to resume.")
        break
    logger.flush(ckpt.last_saved)
    checkpointer.wait()
  finally:
    catcher.restore()
    if bar is not None:
      bar.close()
    try:
      checkpointer.close()
    finally:
      writer.close()
  preempted = step < n_iters
  if not preempted:
    ctx.say(f"Done: {step} steps. Checkpoints: {ctx.ckpt_dir}  TensorBoard logs: {log_dir}  "
            f"Samples: {ctx.sample_dir}")
  return TrainResult(state=state, step=step, workdir=workdir, checkpoint_dir=ctx.ckpt_dir, log_dir=log_dir,
                     sample_dir=ctx.sample_dir, preempted=preempted, signal=catcher.signum,
                     resumed_from=resumed_from, skipped_checkpoints=list(checkpointer.skipped),
                     history=logger.history, last_samples=samples)


def _apply(p_step, p_multi, state, batches, mesh, keys=("image",)):
  """One compiled step on one batch, or `p_multi` on the stacked batches of n_jitted_steps; `keys`: the
  batch entries the step reads ('label' too for classifiers and class-conditional models)."""
  dtypes = {"image": np.float32, "label": np.int32}
  if len(batches) == 1:
    sh = parallel.batch_sharding(mesh)
    return p_step(state, {k: parallel.host_to_global(np.asarray(batches[0][k], dtypes[k]), sh) for k in keys})
  stacked = _stack_batches([{k: np.asarray(b[k], dtypes[k]) for k in keys} for b in batches])
  sh = parallel.batch_sharding(mesh, leading_axes=1)
  return p_multi(state, {k: parallel.host_to_global(v, sh) for k, v in stacked.items()})


def _snapshot(ctx, state, step, evaluator, sampler, writer, samples):
  """At a snapshot: the EMA weights' test-split loss (eval.enable_loss) and samples
  (training.snapshot_sampling), or a classifier's test accuracy (`sampler` is then an
  `actions.AccuracyEvaluator`); returns the samples (the previous ones when none are drawn)."""
  if bool(ctx.config.eval.enable_loss):
    loss = evaluator.run(state.ema_params, step)
    if loss is not None:
      writer.write_scalars(step, {"eval/loss": loss})
      writer.flush()
      ctx.say(f"step {step}: eval loss (EMA params, test split) = {loss:.5g}")
  if isinstance(sampler, actions.AccuracyEvaluator):
    if bool(ctx.config.eval.enable_loss):
      sampler.run(state.ema_params, step, evaluator)
  elif bool(ctx.config.training.snapshot_sampling):
    return sampler.run(state, step, evaluator.eval_data)
  return samples

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
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from score_sde_jax import config_defaults
from score_sde_jax import draw as draw_lib
from score_sde_jax import sde as sde_lib
from score_sde_jax.train import checkpoint as ckpt_lib
from score_sde_jax.train import config_utils
from score_sde_jax.train import metric_writer
from score_sde_jax.train import parallel
from score_sde_jax.train import state as state_lib
from score_sde_jax.train import step as step_lib


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; nothing was saved after the last good checkpoint."""


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


def _datasets():
  from score_sde_jax import datasets
  return datasets


def get_scalers(config):
  ds = _datasets()
  return ds.get_data_scaler(config), ds.get_data_inverse_scaler(config)


def open_train_iterator(config, batch_size: int):
  """This host's training iterator (its 1/process_count share of every global batch of `batch_size`),
  with a clear error when the data is missing."""
  ds = _datasets()
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


def open_eval_iterator(config, batch_size: int, split: str = "test"):
  """This host's share of the evaluation split, in global batches of `batch_size` (padded, 'mask')."""
  ds = _datasets()
  return ds.get_eval_iterator(config, split, batch_size=batch_size, process_index=jax.process_index(),
                              process_count=jax.process_count())


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
  t_cfg = config.training
  n_iters = int(t_cfg.n_iters)
  n_jit = max(1, int(t_cfg.n_jitted_steps))
  global_batch = int(t_cfg.batch_size)
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
  scaler, inverse_scaler = get_scalers(config)

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
        config=config, workdir=workdir, force_resume=force_resume, progress=progress, report=report,
        async_checkpoint=async_checkpoint, handle_signals=handle_signals, keep_history=keep_history,
        on_step=on_step, process0=process0, mesh=mesh, n_dev=n_dev, t_cfg=t_cfg, n_iters=n_iters,
        n_jit=n_jit, global_batch=global_batch, host_batch=host_batch, ckpt_dir=ckpt_dir, diffs=diffs,
        train_iter=train_iter, scaler=scaler, inverse_scaler=inverse_scaler, log_dir=log_dir)
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
  from score_sde_jax.train import restore as restore_lib
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


def _train_locked(*, config, workdir, force_resume, progress, report, async_checkpoint, handle_signals,
                  keep_history, on_step, process0, mesh, n_dev, t_cfg, n_iters, n_jit, global_batch,
                  host_batch, ckpt_dir, diffs, train_iter, scaler, inverse_scaler, log_dir):
  """The part of `train` that runs with the workdir locked."""
  del force_resume
  sample_dir = os.path.join(workdir, "samples")

  # ---- model, state, compiled functions -----------------------------------------------------------
  from score_sde_jax import models as models_lib
  from score_sde_jax import sampling as sampling_lib

  sde = sde_lib.sde_from_config(config)
  model = models_lib.get_model(config)
  tx, lr_fn = state_lib.get_optimizer(config)
  first = next(train_iter)
  if np.asarray(first["image"]).shape[0] != host_batch:
    raise DataError(f"the training iterator yields batches of {np.asarray(first['image']).shape[0]} "
                    f"examples on this host; expected {host_batch} (global batch {global_batch} over "
                    f"{jax.process_count()} host(s)).")
  data_shape = tuple(np.asarray(first["image"]).shape[1:])
  rep = parallel.replicated(mesh)
  bsh = parallel.batch_sharding(mesh)
  bsh_multi = parallel.batch_sharding(mesh, leading_axes=1)

  init_key = jax.random.PRNGKey(int(config.seed))
  create = jax.jit(lambda k: state_lib.create_train_state(config, model, k, (1,) + data_shape, tx),
                   out_shardings=rep)
  abstract = jax.eval_shape(create, init_key)
  abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                                    abstract)

  snapshot_freq = int(t_cfg.snapshot_freq)
  preempt_freq = int(t_cfg.snapshot_freq_for_preemption)
  checkpointer = ckpt_lib.Checkpointer(workdir, snapshot_freq=snapshot_freq, async_save=async_checkpoint)
  # The one restore (train/restore.py): onto this run's mesh, whatever topology wrote the checkpoint.
  from score_sde_jax.train import restore as restore_lib
  try:
    return _restore_and_run(**locals())
  finally:
    checkpointer.close()


def _restore_and_run(*, config, workdir, progress, report, async_checkpoint, handle_signals, keep_history,
                     on_step, process0, mesh, n_dev, t_cfg, n_iters, n_jit, global_batch, host_batch,
                     ckpt_dir, diffs, train_iter, scaler, inverse_scaler, log_dir, sample_dir, models_lib,
                     sampling_lib, sde, model, tx, lr_fn, first, data_shape, rep, bsh, bsh_multi, init_key,
                     create, abstract, snapshot_freq, preempt_freq, checkpointer, restore_lib):
  """Restore (or initialise), then the loop; `checkpointer` is closed by the caller."""
  del async_checkpoint
  restored = restore_lib.restore_checkpoint(checkpointer, abstract, mesh=mesh, report=report)
  resumed_from = None
  if restored is not None:
    resumed_from, state, data_saved = restored.step, restored.state, restored.data
    try:
      data_state = ckpt_lib.decode_data_state(data_saved)
    except ValueError as e:
      raise DataError(f"checkpoint {resumed_from} in {ckpt_dir}: {e}") from e
    if data_state is not None:
      train_iter.set_state(data_state)
    else:
      report(f"Checkpoint {resumed_from} was converted from {data_saved['converted_from']}: the data "
             f"starts from the beginning.")
    first = None
    report(f"Resuming from step {resumed_from} ({os.path.join(ckpt_dir, str(resumed_from))}).")
    s_hosts, s_devices = restored.saved_hosts, restored.saved_devices
    if (s_hosts is not None and s_hosts != jax.process_count()) or (s_devices is not None and
                                                                    s_devices != n_dev):
      report(f"The checkpoint was written on {s_devices or '?'} device(s) / {s_hosts or '?'} host(s); this run "
             f"has {n_dev} / {jax.process_count()}: the restored state and the data order are exact, the "
             f"following steps agree with an uninterrupted run to float rounding (the gradient all-reduce "
             f"adds in another order).")
  else:
    state = create(init_key)
    # `first` is the batch of step 1; a run restored from a step-0 checkpoint refetches it.
  start_step = int(parallel.to_host(state.step))

  # The resume succeeded: now the workdir's config is replaced (the one the earlier steps were trained
  # with is kept as config.superseded.<time>.json).
  if diffs and process0:
    old = os.path.join(workdir, config_utils.CONFIG_FILE)
    os.replace(old, os.path.join(workdir, f"config.superseded.{int(time.time())}.json"))
  if process0:
    config_utils.save_config(workdir, config)
  writer = metric_writer.MetricWriter(log_dir, enabled=process0)

  train_step = step_lib.make_train_step(config, sde, model, tx, lr_fn, scaler=scaler)
  # Donating the old state halves its memory on accelerators (orbax copies a state to host memory
  # before `save` returns).  On CPU a host copy may alias the device buffer, so nothing is donated there.
  donate = (0,) if mesh.devices.flat[0].platform != "cpu" else ()
  p_step = jax.jit(train_step, in_shardings=(rep, bsh), out_shardings=(rep, rep), donate_argnums=donate)
  p_multi = None
  if n_jit > 1:
    p_multi = jax.jit(step_lib.make_multi_step(train_step, n_jit), in_shardings=(rep, bsh_multi),
                      out_shardings=(rep, rep), donate_argnums=donate)

  # ---- helpers ------------------------------------------------------------------------------------
  pending: List = []          # (first step, metrics on device, number of steps)
  history: List[Dict[str, float]] = []
  last_saved = {"step": resumed_from}
  t_last = {"time": time.time(), "step": start_step}
  bar = None
  if progress and process0:
    from tqdm.auto import tqdm
    bar = tqdm(total=n_iters, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.1,
               desc="train", file=sys.stderr)
  say = (lambda msg: bar.write(msg)) if bar is not None else report

  def flush(force_log: bool = False):
    """Fetches pending metrics; raises NonFiniteLossError naming the first bad step; logs."""
    if not pending:
      return
    fetched = parallel.tree_to_host([m for _, m, _ in pending])
    rows = []
    for (s0, _, n), m in zip(pending, fetched):
      for i in range(n):
        rows.append((s0 + i, {k: float(np.asarray(v).reshape(-1)[i] if n > 1 else v)
                              for k, v in m.items()}))
    pending.clear()
    for s, m in rows:
      if not math.isfinite(m["loss"]):
        good = last_saved["step"]
        where = (f"the last good checkpoint, step {good}, in {ckpt_dir} is intact"
                 if good is not None else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"Training loss is {m['loss']} at step {s}: stopping before saving anything; {where}. "
            f"Lower optim.lr, check the data scaling or use model.dtype='float32'.")
    if keep_history:
      history.extend({"step": s, **m} for s, m in rows)
    now = time.time()
    s_end = rows[-1][0]
    dt = max(now - t_last["time"], 1e-9)
    steps_per_s = (s_end - t_last["step"]) / dt
    t_last["time"], t_last["step"] = now, s_end
    mean = {k: float(np.mean([m[k] for _, m in rows])) for k in rows[-1][1]}
    mean["steps_per_sec"] = steps_per_s
    mean["images_per_sec"] = steps_per_s * global_batch
    writer.write_scalars(s_end, {f"train/{k}": v for k, v in mean.items()})
    writer.flush()
    if bar is not None:
      bar.update(s_end - bar.n)
      bar.set_postfix(loss=f"{mean['loss']:.4g}", steps_s=f"{steps_per_s:.3g}",
                      img_s=f"{mean['images_per_sec']:.4g}", refresh=False)
      bar.refresh()

  def save(step: int, wait: bool = False):
    flush()
    data_state = ckpt_lib.encode_data_states(train_iter.get_state(), num_devices=n_dev)
    checkpointer.save(step, state, data_state, wait=wait)
    last_saved["step"] = step

  # Snapshot extras: samples from the EMA parameters and the test-split loss.
  snap_fns = {}

  def snapshot(step: int):
    out = {}
    if bool(config.eval.enable_loss):
      loss = eval_loss(step)
      if loss is not None:
        out["eval_loss"] = loss
        writer.write_scalars(step, {"eval/loss": loss})
        writer.flush()
        say(f"step {step}: eval loss (EMA params, test split) = {loss:.5g}")
    if bool(t_cfg.snapshot_sampling):
      out["samples"] = snapshot_samples(step)
    return out

  snap_weights = str(t_cfg.snapshot_weights)

  def snapshot_samples(step: int):
    if "sample" not in snap_fns:
      n = int(config.sampling.num_samples)
      # Samples sharded over the devices when they divide evenly (each device draws its share).
      snap_fns["sample"] = draw_lib.draw_program(config, sde, model, (n,) + data_shape, replicated=rep,
                                                 out_sharding=bsh if n % n_dev == 0 else rep)
    key = draw_lib.snapshot_key(config.seed, step)
    if snap_weights == "ema" and "young_ema_said" not in snap_fns:
      note = state_lib.young_ema_note(step, float(config.model.ema_rate), raw_hint=(
          "training.snapshot_weights='raw'"))
      if note:
        snap_fns["young_ema_said"] = True
        say(f"step {step}: {note}")
    params = state.ema_params if snap_weights == "ema" else state.params
    x, nfe = snap_fns["sample"](params, jax.device_put(key, rep))
    x = parallel.to_host(x)
    if process0:
      from score_sde_jax import plotting
      if is_toy(config):
        ref = snap_fns.get("eval_data")
        path = os.path.join(sample_dir, f"samples_{step:08d}.png")
        plotting.save_toy_samples(x, ref if ref is not None else x, path,
                                  title=f"step {step}: {snap_weights.upper() if snap_weights == 'ema' else 'raw'} "
                                        f"samples ({config.sampling.method})")
        sfn = score_field_fn()
        plotting.save_score_field(sfn, ref if ref is not None else x,
                                  os.path.join(sample_dir, f"score_field_{step:08d}.png"))
      else:
        path = os.path.join(sample_dir, f"samples_{step:08d}.png")
        plotting.save_image_grid(x, path)
      say(f"step {step}: {len(x)} samples (NFE {int(parallel.to_host(nfe))}) -> {path}")
    return x

  def score_field_fn():
    if "score" not in snap_fns:
      snap_fns["score"] = draw_lib.score_program(config, sde, model)
    params = state.ema_params if snap_weights == "ema" else state.params
    return lambda x, t: np.asarray(snap_fns["score"](params, scaler(jnp.asarray(x)), jnp.asarray(t)))

  def eval_loss(step: int) -> Optional[float]:
    if "no_eval_data" in snap_fns:     # said once; retrying cannot succeed
      return None
    ebs = int(config.eval.batch_size)
    try:
      it = open_eval_iterator(config, ebs)
    except Exception as e:  # noqa: BLE001
      snap_fns["no_eval_data"] = True
      say(f"step {step}: no evaluation data ({type(e).__name__}: {str(e).splitlines()[0][:300]}); the eval "
          f"loss is skipped for the rest of this run.")
      return None
    if "eval" not in snap_fns:
      snap_fns["eval"] = jax.jit(step_lib.make_eval_step(config, sde, model, scaler=scaler),
                                 in_shardings=(rep, bsh, rep), out_shardings=(rep, rep))
    key0 = jax.random.fold_in(jax.random.PRNGKey(int(config.seed) + 2), step)
    total, count, keep = 0.0, 0.0, []
    for i, b in enumerate(it):
      batch = {"image": parallel.host_to_global(np.asarray(b["image"], np.float32), bsh),
               "mask": parallel.host_to_global(np.asarray(b["mask"], bool), bsh)}
      s, c = snap_fns["eval"](state.ema_params, batch, jax.device_put(jax.random.fold_in(key0, i), rep))
      total += float(parallel.to_host(s))
      count += float(parallel.to_host(c))
      if is_toy(config) and sum(len(k) for k in keep) < 4096:
        keep.append(np.asarray(b["image"])[np.asarray(b["mask"], bool)])
    if keep:
      snap_fns["eval_data"] = np.concatenate(keep)
    return total / max(count, 1.0)

  def batch_eval_loss(step: int) -> None:
    """Every `training.eval_freq` steps, as the official code: the loss of the current (not EMA)
    parameters on one test batch (cycling through the split), logged as eval/batch_loss."""
    it = snap_fns.get("eval_iter")
    b = None
    for _ in range(2):
      if it is None:
        try:
          it = iter(open_eval_iterator(config, int(config.eval.batch_size)))
        except Exception:  # noqa: BLE001  (no test data: the snapshot says so)
          snap_fns["no_eval_data"] = True
          return
      b = next(it, None)
      if b is not None:
        break
      it = None
    snap_fns["eval_iter"] = it
    if b is None:
      return
    if "eval" not in snap_fns:
      snap_fns["eval"] = jax.jit(step_lib.make_eval_step(config, sde, model, scaler=scaler),
                                 in_shardings=(rep, bsh, rep), out_shardings=(rep, rep))
    batch = {"image": parallel.host_to_global(np.asarray(b["image"], np.float32), bsh),
             "mask": parallel.host_to_global(np.asarray(b["mask"], bool), bsh)}
    key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed) + 5), step)
    s_, c_ = snap_fns["eval"](state.params, batch, jax.device_put(key, rep))
    loss = float(parallel.to_host(s_)) / max(float(parallel.to_host(c_)), 1.0)
    writer.write_scalars(step, {"eval/batch_loss": loss})

  eval_freq = int(t_cfg.eval_freq)
  do_batch_eval = eval_freq > 0 and bool(config.eval.enable_loss)

  # ---- the loop -----------------------------------------------------------------------------------
  catcher = _SignalCatcher(handle_signals)
  step = start_step
  result_samples = None
  if resumed_from is None:
    report(f"Training from scratch in {workdir} on {n_dev} device(s) "
           f"({jax.devices()[0].platform}), global batch {global_batch}.")
  try:
    while step < n_iters:
      # Multi-step chunks stay aligned to multiples of n_jitted_steps (a run resumed from a SIGTERM
      # checkpoint at another step first takes single steps), so that log/snapshot steps are hit.
      n = n_jit if (p_multi is not None and step % n_jit == 0 and n_iters - step >= n_jit) else 1
      batches = []
      for _ in range(n):
        if first is not None:
          batches.append(first)
          first = None
        else:
          batches.append(next(train_iter))
      if n == 1:
        gb = parallel.host_to_global(np.asarray(batches[0]["image"], np.float32), bsh)
        state, metrics = p_step(state, {"image": gb})
      else:
        gb = parallel.host_to_global(_stack_batches([{"image": np.asarray(b["image"], np.float32)}
                                                     for b in batches])["image"], bsh_multi)
        state, metrics = p_multi(state, {"image": gb})
      pending.append((step + 1, metrics, n))
      step += n
      if on_step is not None:
        on_step(step)
      if step % int(t_cfg.log_freq) == 0:
        flush()
      if do_batch_eval and (step - n) // eval_freq != step // eval_freq and \
          "no_eval_data" not in snap_fns:
        batch_eval_loss(step)
      stop = catcher.signum is not None
      if jax.process_count() > 1 and step % int(t_cfg.log_freq) == 0:
        stop = _any_process(stop)
      if step % snapshot_freq == 0 or step == n_iters:
        save(step)
        extras = snapshot(step)
        result_samples = extras.get("samples", result_samples)
      elif step % preempt_freq == 0:
        save(step)
      if stop:
        save(step, wait=True)
        name = signal.Signals(catcher.signum).name if catcher.signum else "signal"
        say(f"Received {name}: saved a checkpoint at step {step} in {ckpt_dir}; exiting. "
            f"Run the same command again to resume.")
        break
    flush()
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
    report(f"Done: {step} steps. Checkpoints: {ckpt_dir}  TensorBoard logs: {log_dir}  "
           f"Samples: {sample_dir}")
  return TrainResult(state=state, step=step, workdir=workdir, checkpoint_dir=ckpt_dir, log_dir=log_dir,
                     sample_dir=sample_dir, preempted=preempted, signal=catcher.signum,
                     resumed_from=resumed_from, skipped_checkpoints=list(checkpointer.skipped),
                     history=history, last_samples=result_samples)

"""The trainer's periodic work, one small object each, called by the loop in `loop.py`:

* `MetricLogger`: every `training.log_freq` steps, the pending per-step metrics are fetched, checked
  (a NaN/Inf loss stops the run naming the step and the last good checkpoint), averaged and written to
  TensorBoard (`train/*`, with steps/s and images/s) and the progress bar.
* `Checkpointing`: a save (state and the data iterators' positions) at `snapshot_freq`,
  `snapshot_freq_for_preemption`, the end, and on a signal; metrics are flushed first, so a NaN is never
  saved.
* `LossEvaluator`: the denoising loss of the EMA weights over the whole test split at each snapshot
  (`eval/loss`) and, every `training.eval_freq` steps, of the current weights on one test batch cycling
  through the split (`eval/batch_loss`, as the official code).
* `SnapshotSampler`: samples from the snapshot weights (`training.snapshot_weights`) with the config's
  sampler (`draw.draw_program`), written as a PNG (and, for toy data, the learned score field).

Hand-written rather than `clu.periodic_actions`: each action here owns state the loop must also see (the
last good checkpoint for the NaN message, the test points the snapshot plots), and the triggers follow
the official code's step arithmetic (multi-step chunks of `n_jitted_steps`), which clu's step-interval
callbacks do not express.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from score_sde_jax import config_defaults, datasets
from score_sde_jax import draw as draw_lib
from score_sde_jax.run import checkpoint as ckpt_lib
from score_sde_jax.run import parallel
from score_sde_jax.run import state as state_lib
from score_sde_jax.train import step as step_lib


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; nothing was saved after the last good checkpoint."""


@dataclasses.dataclass
class RunContext:
  """What the actions share: the run's config and model, its mesh and shardings, where results go."""
  config: Any
  sde: Any
  model: Any
  scaler: Callable
  mesh: Any
  rep: Any                 # replicated sharding
  bsh: Any                 # batch sharding
  ckpt_dir: str
  sample_dir: str
  say: Callable[[str], None]
  process0: bool


class MetricLogger:
  """Pending step metrics → NaN check, TensorBoard means, progress bar (see the module docstring)."""

  def __init__(self, writer, bar, *, global_batch: int, ckpt_dir: str, start_step: int, keep_history: bool,
               clock: Callable[[], float]):
    self.writer, self.bar, self.global_batch, self.ckpt_dir = writer, bar, global_batch, ckpt_dir
    self.keep_history, self.clock = keep_history, clock
    self.pending: List = []          # (first step, metrics on device, number of steps)
    self.history: List[Dict[str, float]] = []
    self._t, self._step = clock(), start_step

  def add(self, first_step: int, metrics, n: int) -> None:
    self.pending.append((first_step, metrics, n))

  def flush(self, last_good: Optional[int]) -> None:
    """Fetches the pending metrics; NonFiniteLossError naming the first bad step; logs their means."""
    if not self.pending:
      return
    fetched = parallel.tree_to_host([m for _, m, _ in self.pending])
    rows = []
    for (s0, _, n), m in zip(self.pending, fetched):
      for i in range(n):
        rows.append((s0 + i, {k: float(np.asarray(v).reshape(-1)[i] if n > 1 else v) for k, v in m.items()}))
    self.pending.clear()
    for s, m in rows:
      if not math.isfinite(m["loss"]):
        where = (f"the last good checkpoint, step {last_good}, in {self.ckpt_dir} is intact"
                 if last_good is not None else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"Training loss is {m['loss']} at step {s}: stopping before saving anything; {where}. "
            f"Lower optim.lr, check the data scaling or use model.dtype='float32'.")
    if self.keep_history:
      self.history.extend({"step": s, **m} for s, m in rows)
    now, s_end = self.clock(), rows[-1][0]
    steps_per_s = (s_end - self._step) / max(now - self._t, 1e-9)
    self._t, self._step = now, s_end
    mean = {k: float(np.mean([m[k] for _, m in rows])) for k in rows[-1][1]}
    mean["steps_per_sec"] = steps_per_s
    mean["images_per_sec"] = steps_per_s * self.global_batch
    self.writer.write_scalars(s_end, {f"train/{k}": v for k, v in mean.items()})
    self.writer.flush()
    if self.bar is not None:
      self.bar.update(s_end - self.bar.n)
      self.bar.set_postfix(loss=f"{mean['loss']:.4g}", steps_s=f"{steps_per_s:.3g}",
                           img_s=f"{mean['images_per_sec']:.4g}", refresh=False)
      self.bar.refresh()


class Checkpointing:
  """Saves (state, data positions); `last_saved` is the newest step saved (None before any)."""

  def __init__(self, checkpointer: ckpt_lib.Checkpointer, train_iter, logger: MetricLogger, n_dev: int,
               last_saved: Optional[int]):
    self.checkpointer, self.train_iter, self.logger, self.n_dev = checkpointer, train_iter, logger, n_dev
    self.last_saved = last_saved

  def save(self, step: int, state, wait: bool = False) -> None:
    self.logger.flush(self.last_saved)
    data_state = ckpt_lib.encode_data_states(self.train_iter.get_state(), num_devices=self.n_dev)
    self.checkpointer.save(step, state, data_state, wait=wait)
    self.last_saved = step


class LossEvaluator:
  """The test-split denoising loss (see the module docstring).  `available` turns False, said once, when
  the run has no test data; `eval_data` keeps up to 4096 toy test points for the snapshot plots."""

  def __init__(self, ctx: RunContext, writer):
    self.ctx, self.writer = ctx, writer
    self.available = True
    self.eval_data: Optional[np.ndarray] = None
    self._program = None
    self._batches = None    # the cycling iterator of batch_loss

  def _eval_step(self):
    if self._program is None:
      c = self.ctx
      self._program = jax.jit(step_lib.make_eval_step(c.config, c.sde, c.model, scaler=c.scaler),
                              in_shardings=(c.rep, c.bsh, c.rep), out_shardings=(c.rep, c.rep))
    return self._program

  def open_test_split(self):
    """A fresh iterator over this host's share of the test split (each example once, with a mask)."""
    return datasets.get_eval_iterator(self.ctx.config, "test", batch_size=int(self.ctx.config.eval.batch_size),
                                      process_index=jax.process_index(), process_count=jax.process_count())

  def on_device(self, b):
    """A host batch of `open_test_split` as global arrays (image, mask, and label when the run uses them)."""
    bsh = self.ctx.bsh
    out = {"image": parallel.host_to_global(np.asarray(b["image"], np.float32), bsh),
           "mask": parallel.host_to_global(np.asarray(b["mask"], bool), bsh)}
    if config_defaults.uses_labels(self.ctx.config):
      out["label"] = parallel.host_to_global(np.asarray(b["label"], np.int32), bsh)
    return out

  def run(self, params, step: int) -> Optional[float]:
    """The mean loss of `params` over the whole test split (None without test data)."""
    if not self.available:     # said once; retrying cannot succeed
      return None
    c = self.ctx
    try:
      it = self.open_test_split()
    except Exception as e:  # noqa: BLE001
      self.available = False
      c.say(f"step {step}: no evaluation data ({type(e).__name__}: {str(e).splitlines()[0][:300]}); the eval "
            f"loss is skipped for the rest of this run.")
      return None
    key0 = jax.random.fold_in(jax.random.PRNGKey(int(c.config.seed) + 2), step)
    total, count, keep = 0.0, 0.0, []
    for i, b in enumerate(it):
      s, n = self._eval_step()(params, self.on_device(b), jax.device_put(jax.random.fold_in(key0, i), c.rep))
      total += float(parallel.to_host(s))
      count += float(parallel.to_host(n))
      if config_defaults.is_toy(c.config) and sum(len(k) for k in keep) < 4096:
        keep.append(np.asarray(b["image"])[np.asarray(b["mask"], bool)])
    if keep:
      self.eval_data = np.concatenate(keep)
    return total / max(count, 1.0)

  def batch_loss(self, params, step: int) -> None:
    """The loss of `params` on the next test batch (the split cycles), written as eval/batch_loss."""
    it, b = self._batches, None
    for _ in range(2):
      if it is None:
        try:
          it = iter(self.open_test_split())
        except Exception:  # noqa: BLE001  (no test data: the snapshot says so)
          self.available = False
          return
      b = next(it, None)
      if b is not None:
        break
      it = None
    self._batches = it
    if b is None:
      return
    key = jax.random.fold_in(jax.random.PRNGKey(int(self.ctx.config.seed) + 5), step)
    s, n = self._eval_step()(params, self.on_device(b), jax.device_put(key, self.ctx.rep))
    loss = float(parallel.to_host(s)) / max(float(parallel.to_host(n)), 1.0)
    self.writer.write_scalars(step, {"eval/batch_loss": loss})


class SnapshotSampler:
  """Samples of the snapshot weights as a PNG (see the module docstring); `run` returns them (host)."""

  def __init__(self, ctx: RunContext, data_shape):
    self.ctx, self.data_shape = ctx, tuple(data_shape)
    self.weights = str(ctx.config.training.snapshot_weights)
    self._draw = self._score = None
    self._young_ema_said = False

  def run(self, state, step: int, eval_data: Optional[np.ndarray] = None) -> np.ndarray:
    c = self.ctx
    config = c.config
    if self._draw is None:
      n = int(config.sampling.num_samples)
      n_dev = c.mesh.devices.size
      # Samples sharded over the devices when they divide evenly (each device draws its share).
      self._draw = draw_lib.draw_program(config, c.sde, c.model, (n,) + self.data_shape, replicated=c.rep,
                                         out_sharding=c.bsh if n % n_dev == 0 else c.rep)
    if self.weights == "ema" and not self._young_ema_said:
      note = state_lib.young_ema_note(step, float(config.model.ema_rate),
                                      raw_hint="training.snapshot_weights='raw'")
      if note:
        self._young_ema_said = True
        c.say(f"step {step}: {note}")
    params = state.ema_params if self.weights == "ema" else state.params
    x, nfe = self._draw(params, jax.device_put(draw_lib.snapshot_key(config.seed, step), c.rep))
    x = parallel.to_host(x)
    if c.process0:
      from score_sde_jax import plotting
      path = os.path.join(c.sample_dir, f"samples_{step:08d}.png")
      if config_defaults.is_toy(config):
        ref = eval_data if eval_data is not None else x
        plotting.save_toy_samples(x, ref, path, title=f"step {step}: "
                                  f"{self.weights.upper() if self.weights == 'ema' else 'raw'} samples "
                                  f"({config.sampling.method})")
        plotting.save_score_field(self._score_field(params), ref,
                                  os.path.join(c.sample_dir, f"score_field_{step:08d}.png"))
      else:
        plotting.save_image_grid(x, path)
      c.say(f"step {step}: {len(x)} samples (NFE {int(parallel.to_host(nfe))}) -> {path}")
    return x

  def _score_field(self, params):
    c = self.ctx
    if self._score is None:
      self._score = draw_lib.score_program(c.config, c.sde, c.model)
    return lambda x, t: np.asarray(self._score(params, c.scaler(jnp.asarray(x)), jnp.asarray(t)))


class AccuracyEvaluator:
  """A classifier's test-split accuracy (`training.task` 'classifier' / 'noise_classifier'), written as
  eval/accuracy; a noise-conditional one is measured at each t of `classifier.ACCURACY_TIMES` on x(t)
  drawn from the perturbation kernel (eval/accuracy_t<t>, e.g. eval/accuracy_t0.5): the curve that
  guidance depends on."""

  def __init__(self, ctx: RunContext, writer):
    from score_sde_jax import classifier as classifier_lib
    self.ctx, self.writer = ctx, writer
    noisy = str(ctx.config.training.task) == "noise_classifier"
    self.times = tuple(classifier_lib.ACCURACY_TIMES) if noisy else (None,)
    correct = classifier_lib.accuracy_fn(ctx.sde, step_lib.fp32_apply(ctx.model.apply), ctx.config)

    def count(params, batch, key, t):
      x = ctx.scaler(batch["image"])
      ok = correct(params, key, x, batch["label"], jnp.full((x.shape[0],), t, jnp.float32))
      return jnp.sum(ok * batch["mask"]), jnp.sum(batch["mask"])

    self._count = jax.jit(count, in_shardings=(ctx.rep, ctx.bsh, ctx.rep, None),
                          out_shardings=(ctx.rep, ctx.rep))

  def run(self, params, step: int, loss_evaluator: LossEvaluator) -> Optional[Dict[str, float]]:
    """{"accuracy" or "accuracy_t<t>": fraction correct} over the test split (None without test data)."""
    c = self.ctx
    if not loss_evaluator.available:
      return None
    it = loss_evaluator.open_test_split()
    hits = {t: 0.0 for t in self.times}
    n = 0.0       # global counts: the jitted sums run over the sharded global batch
    key0 = jax.random.fold_in(jax.random.PRNGKey(int(c.config.seed) + 3), step)
    for i, b in enumerate(it):
      batch = loss_evaluator.on_device(b)
      for j, t in enumerate(self.times):
        key = jax.device_put(jax.random.fold_in(key0, i * len(self.times) + j), c.rep)
        h, m = self._count(params, batch, key, 0.0 if t is None else float(t))
        hits[t] += float(parallel.to_host(h))
      n += float(parallel.to_host(m))
    n_global = n
    acc = {("accuracy" if t is None else f"accuracy_t{t:g}"): hits[t] / max(n_global, 1.0) for t in self.times}
    self.writer.write_scalars(step, {f"eval/{k}": v for k, v in acc.items()})
    self.writer.flush()
    c.say(f"step {step}: test accuracy (EMA params) " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    return acc

"""Sample quality of a model's weights: FID, KID and Inception Score of `config.eval.num_samples` samples.

With features f (a feature network of `feature_nets`: FID Inception-v3 pool_3, or an MNIST classifier's
penultimate layer) of the samples (μ₁, Σ₁) and of the reference data (μ₂, Σ₂):

  FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})          (means and ddof=1 covariances)
  KID = mean over subsets of MMD²_u(x, y) with k(x, y) = (xᵀy / d + 1)³, d the feature dimension:
        MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (m(m−1)) − 2 Σ_{i,j} k(x_i, y_j) / m²
        over `eval.kid_num_subsets` subsets of m = `eval.kid_subset_size` features of each set (unbiased),
        drawn from a uniform reservoir of `eval.kid_reservoir_size` features of each set; kid_std is the
        spread of one subset's estimate
  IS  = exp E_x KL(p(y|x) ‖ p(y)), p(y) = E_x p(y|x), over `eval.is_splits` contiguous splits (10 as
        Salimans et al.); is / is_std: mean and std over the splits

(`metrics.fid` computes them in float64; the classifier's logits give p(y|x).)

`SampleQualityEvaluator(config, sde, model, mesh, feature_net, out_dir).run(params, step)` draws with
`draw.draw_program` (any `config.sampling.method`): batch k of `eval.batch_size` samples (rounded up to a
multiple of the device count) with the key `draw.batch_key(config.seed, k)`, sharded over the mesh.  Each
host writes its rows of batch k to `<out_dir>/ckpt_<step>/samples_<host>_<k>.npz` (as the official code's
per-host sample files): the samples as uint8 (clipped to [0, 1], ×255, rounded), their features and
logits (computed from those uint8 images on the host's devices), the global row numbers, the NFE, and the
fingerprints of the weights, of the sampling set-up and of the feature net; atomically (tmp file +
os.replace).  A rerun skips the chunks on disk; a chunk of other weights or another sampling set-up is
drawn again, a chunk featurised by another feature net is featurised again from its images (not redrawn).
The statistics are then streamed from the chunk files in order into `metrics.fid.FeatureStats` (a
reservoir of `eval.kid_reservoir_size` features for KID; the N×C logits for IS), so no more than one chunk of
samples is in memory and a rerun gives identical numbers.  Raising `eval.num_samples` keeps the chunks.

`evaluate_sample_quality(config, workdir, ...)` (`scripts/evaluate.py --config.eval.enable_sampling=True`)
runs it over the chosen checkpoints: samples in `<workdir>/eval/samples_<sampling hash>/ckpt_<step>/`,
one result line per run appended to `<workdir>/eval/fid_step<step>_<hash>.jsonl` (the hash of the
identity: weights fingerprint, sampling set-up, number of samples, feature net, reference, metric
settings; its header records the identity), eval/fid, eval/kid, eval/is to TensorBoard in
`<workdir>/eval/logs`, and one summary line per checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, List, Optional

import jax
import numpy as np

from score_sde_jax import draw, feature_nets
from score_sde_jax.eval_settings import EvalError, SampleQualitySettings, sample_quality_settings
from score_sde_jax.metrics import fid as fid_lib

_OK, _FEATURES, _DRAW = 0, 1, 2   # what a chunk needs


def samples_identity(config, settings: SampleQualitySettings) -> dict:
  """Everything but the weights that determines the samples of a chunk."""
  from score_sde_jax.evaluation import _DATA_FIELDS_NOT_IN_RESULTS
  return {"model": config.model.to_dict(), "sampling": config.sampling.to_dict(),
          "sde": {"sde": str(config.training.sde), "continuous": bool(config.training.continuous)},
          "data": {k: v for k, v in config.data.to_dict().items() if k not in _DATA_FIELDS_NOT_IN_RESULTS},
          "batch_size": settings.batch_size, "seed": settings.seed}


def to_uint8(x) -> np.ndarray:
  """Samples in data space ([0, 1]) as uint8 images: clipped, ×255, rounded."""
  return np.round(np.clip(np.asarray(x, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def _local_rows(x: jax.Array):
  """(global row numbers, rows) of the part of a batch-sharded array held by this host, in row order."""
  parts = {}
  for shard in x.addressable_shards:
    sl = shard.index[0]
    start = sl.start or 0
    if start not in parts:
      parts[start] = np.asarray(shard.data)
  rows = [np.arange(s, s + len(parts[s])) for s in sorted(parts)]
  return np.concatenate(rows), np.concatenate([parts[s] for s in sorted(parts)])


def _save_npz(path: str, **arrays) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


class SampleQualityEvaluator:
  """FID/KID/IS of the samples of given weights (see the module docstring); one `run(params, step)` per
  checkpoint.  The reference statistics are computed (or read) once, at the first run."""

  def __init__(self, config, sde, model, mesh, feature_net: feature_nets.FeatureNet, out_dir: str, *,
               settings: Optional[SampleQualitySettings] = None, progress: bool = False,
               report: Optional[Callable[[str], None]] = None):
    from score_sde_jax import datasets, evaluation
    from score_sde_jax.run import parallel
    self.config, self.mesh, self.net, self.out_dir = config, mesh, feature_net, os.path.abspath(out_dir)
    self.settings = s = settings or sample_quality_settings(config, num_devices=mesh.devices.size)
    if s.batch_size % mesh.devices.size:
      raise EvalError(f"eval.batch_size={s.batch_size} does not divide by the {mesh.devices.size} devices.")
    self.progress = progress
    self.report = report if report is not None else (print if jax.process_index() == 0 else (lambda *_: None))
    self.rep, self.bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    self.shape = (s.batch_size,) + tuple(datasets.data_shape(config))
    self.samples_id = evaluation.identity_hash(samples_identity(config, s))
    self._draw = draw.draw_program(config, sde, model, self.shape, replicated=self.rep, out_sharding=self.bsh)
    self._local = parallel.make_mesh(jax.local_devices())
    self._features = feature_nets.features_program(feature_net, self._local)
    self._fvars = parallel.replicate(feature_net.variables, self._local)
    self._reference: Optional[feature_nets.Reference] = None

  @property
  def num_chunks(self) -> int:
    return math.ceil(self.settings.num_samples / self.settings.batch_size)

  def chunk_path(self, step: int, k: int, host: Optional[int] = None) -> str:
    host = jax.process_index() if host is None else host
    return os.path.join(self.out_dir, f"ckpt_{step}", f"samples_{host}_{k}.npz")

  def reference(self) -> feature_nets.Reference:
    if self._reference is None:
      self._reference = feature_nets.reference_stats(
          self.config, self.net, self.settings, program=self._features, variables=self._fvars,
          mesh=self._local, progress=self.progress, report=self.report)
    return self._reference

  def _need(self, path: str, weights_fp: str) -> int:
    try:
      with np.load(path, allow_pickle=False) as z:
        if (str(z["weights"]) != weights_fp or str(z["sampling"]) != self.samples_id
            or int(z["process_count"]) != jax.process_count()):
          return _DRAW
        return _OK if str(z["feature_net"]) == self.net.fingerprint else _FEATURES
    except (OSError, ValueError, KeyError):
      return _DRAW

  def run(self, params, step: int, *, fingerprint: Optional[str] = None) -> Optional[dict]:
    """Metrics of the samples of `params` (the model's variables; `fingerprint`: theirs, default computed)
    at checkpoint `step`: {fid, kid, kid_std, is, is_std, num_samples, nfe_mean, seconds, ...} on process
    0 (None on the others).  Resumes from the chunks on disk."""
    from score_sde_jax import checkpoints
    from score_sde_jax.run import parallel
    t0 = time.time()
    s, step = self.settings, int(step)
    fp = fingerprint or checkpoints.fingerprint(params)
    os.makedirs(os.path.dirname(self.chunk_path(step, 0)), exist_ok=True)
    need = np.array([self._need(self.chunk_path(step, k), fp) for k in range(self.num_chunks)], np.int32)
    if jax.process_count() > 1:   # every host draws every batch: agree on the most any host needs
      from jax.experimental import multihost_utils
      need = np.asarray(multihost_utils.process_allgather(need)).max(axis=0)
    todo = [k for k in range(self.num_chunks) if need[k] != _OK]
    if len(todo) < self.num_chunks:
      self.report(f"step {step}: {self.num_chunks - len(todo)} of {self.num_chunks} sample chunks already in "
                  f"{os.path.dirname(self.chunk_path(step, 0))}")
    from tqdm.auto import tqdm
    bar = tqdm(total=len(todo), unit="batch", desc=f"samples step {step}",
               disable=not (self.progress and jax.process_index() == 0))
    p, drawn = None, 0
    for k in todo:
      path, tk = self.chunk_path(step, k), time.time()
      if need[k] == _DRAW:
        p = parallel.replicate(params, self.mesh) if p is None else p
        x, nfe = self._draw(p, jax.device_put(draw.batch_key(s.seed, k), self.rep))
        rows, images = _local_rows(x)
        rows, images, nfe, secs = rows + k * s.batch_size, to_uint8(images), int(parallel.to_host(nfe)), None
        drawn += 1
      else:
        with np.load(path, allow_pickle=False) as z:
          rows, images, nfe, secs = z["rows"], z["images"], int(z["nfe"]), float(z["seconds"])
      feats, logits = self._features(self._fvars, images)
      _save_npz(path, images=images, features=np.asarray(feats), logits=np.asarray(logits), rows=rows,
                nfe=nfe, seconds=time.time() - tk if secs is None else secs, weights=fp,
                sampling=self.samples_id, feature_net=self.net.fingerprint, process_count=jax.process_count())
      bar.update(1)
      bar.set_postfix(nfe=nfe)
    bar.close()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"sample quality step {step}")
    if jax.process_index() != 0:
      return None
    return self._metrics(step, drawn, len(todo) - drawn, time.time() - t0)

  def _metrics(self, step: int, drawn: int, featurised: int, seconds: float) -> dict:
    s = self.settings
    stats = fid_lib.FeatureStats(keep=s.kid_reservoir_size, seed=0)
    logits, nfes = [], []
    for k in range(self.num_chunks):
      for h in range(jax.process_count()):
        with np.load(self.chunk_path(step, k, h), allow_pickle=False) as z:
          m = z["rows"] < s.num_samples
          stats.update(z["features"][m])
          logits.append(z["logits"][m])
          if h == 0:
            nfes.append(int(z["nfe"]))
    if stats.n != s.num_samples:
      raise RuntimeError(f"internal: {stats.n} samples counted, expected {s.num_samples}")
    ref = self.reference()
    fid = fid_lib.fid_from_stats(stats, (ref.mean, ref.cov))
    kid = kid_std = float("nan")
    if ref.kept is not None and len(ref.kept) >= 2:
      kid, kid_std = fid_lib.kernel_inception_distance(stats.kept, ref.kept, num_subsets=s.kid_num_subsets,
                                                       subset_size=s.kid_subset_size, seed=0)
    is_mean, is_std = fid_lib.inception_score(np.concatenate(logits), splits=s.is_splits)
    return {"step": step, "fid": fid, "kid": kid, "kid_std": kid_std, "is": is_mean, "is_std": is_std,
            "num_samples": s.num_samples, "nfe_mean": float(np.mean(nfes)), "seconds": seconds,
            "chunks": self.num_chunks, "chunks_drawn": drawn, "chunks_featurised": featurised,
            "samples_dir": os.path.dirname(self.chunk_path(step, 0)), "reference": ref.source,
            "reference_examples": ref.n, "feature_net": self.net.name,
            "feature_net_fingerprint": self.net.fingerprint, "sampling_method": str(self.config.sampling.method)}


# ---------------------------------------------------------------------------------------------------
# Over the checkpoints of a workdir
# ---------------------------------------------------------------------------------------------------
def results_identity(config, settings: SampleQualitySettings, net: feature_nets.FeatureNet, fingerprint: str,
                     weights: str) -> dict:
  """Everything that determines the numbers of a sample-quality evaluation (its results file's name)."""
  return {"weights": {"fingerprint": fingerprint, "set": weights},
          "samples": samples_identity(config, settings), "num_samples": settings.num_samples,
          "feature_net": {"name": net.name, "fingerprint": net.fingerprint},
          "reference": {"stats": settings.ref_stats, "split": "" if settings.ref_stats else settings.ref_split},
          "metrics": {"kid_subset_size": settings.kid_subset_size, "kid_num_subsets": settings.kid_num_subsets,
                      "kid_reservoir_size": settings.kid_reservoir_size, "is_splits": settings.is_splits}}


def _append(path: str, header: dict, record: dict) -> None:
  """Appends `record` as one JSON line (the header first when the file is new; a torn last line dropped)."""
  if os.path.exists(path):
    with open(path, "rb") as f:
      data = f.read()
    if data and not data.endswith(b"\n"):
      with open(path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)
  lines = [] if os.path.exists(path) and os.path.getsize(path) else [dict(header, kind="header")]
  with open(path, "a") as f:
    for rec in lines + [dict(record, kind="result")]:
      f.write(json.dumps(rec) + "\n")
    f.flush()
    os.fsync(f.fileno())


def format_result(r: dict) -> str:
  kid = (f"KID {r['kid']:.5f} ± {r['kid_std']:.5f}" if math.isfinite(r["kid"])
         else "KID n/a (the reference file has no features)")
  return (f"step {r['step']}: FID {r['fid']:.4f}  {kid}  IS {r['is']:.4f} ± {r['is_std']:.4f}  "
          f"({r['num_samples']} {r['sampling_method']} samples, {r['feature_net']} features, mean NFE "
          f"{r['nfe_mean']:.1f}, {r['seconds']:.1f}s, {r['chunks_drawn']} of {r['chunks']} batches drawn now)  "
          f"samples: {r['samples_dir']}  results: {r['results_file']}")


def evaluate_sample_quality(config, workdir: str, *, checkpoints="latest", pretrained=None, weights: str = "ema",
                            devices=None, feature_net: Optional[feature_nets.FeatureNet] = None,
                            progress: bool = False, report: Optional[Callable[[str], None]] = None
                            ) -> List[Optional[dict]]:
  """FID/KID/IS of the `weights` of the chosen checkpoints of `workdir` ('latest', 'range', or steps, as
  `evaluation.select_checkpoints`), or of `pretrained` (a `checkpoints.Pretrained`; results still go to
  `<workdir>/eval/`).  Returns one result dict per checkpoint (None on processes other than 0)."""
  from score_sde_jax import evaluation, models
  from score_sde_jax import sde as sde_lib
  from score_sde_jax.run import parallel
  from score_sde_jax.run import metric_writer
  process0 = jax.process_index() == 0
  report = report if report is not None else (print if process0 else (lambda *_: None))
  mesh = parallel.make_mesh(devices)
  s = sample_quality_settings(config, num_devices=mesh.devices.size)
  net = feature_net if feature_net is not None else feature_nets.load_feature_net(config)
  if pretrained is not None:
    steps = [pretrained.step if pretrained.step is not None else -1]
  else:
    steps = evaluation.select_checkpoints(config, workdir, checkpoints)
  out_root = os.path.join(os.path.abspath(workdir), "eval")
  sde, model = sde_lib.sde_from_config(config), models.get_model(config)
  samples_dir = os.path.join(out_root, f"samples_{evaluation.identity_hash(samples_identity(config, s))}")
  ev = SampleQualityEvaluator(config, sde, model, mesh, net, samples_dir,
                              settings=s, progress=progress, report=report)
  writer, results = metric_writer.MetricWriter(os.path.join(out_root, "logs")), []
  try:
    for step in steps:
      pre = pretrained if pretrained is not None else evaluation.read_step(config, workdir, step, weights)
      r = ev.run(pre.variables, step, fingerprint=pre.fingerprint)
      if r is None:
        results.append(None)
        continue
      identity = results_identity(config, s, net, pre.fingerprint, pre.weights)
      label = f"step{step}" if pre.format == "workdir" else f"{pre.format}_step{step}"
      r["results_file"] = os.path.join(out_root, f"fid_{label}_{evaluation.identity_hash(identity)}.jsonl")
      _append(r["results_file"], {"step": step, "identity": identity, "checkpoint": pre.path}, r)
      writer.write_scalars(step, {f"eval/{k}": r[k] for k in ("fid", "kid", "is") if math.isfinite(r[k])})
      writer.flush()
      report(format_result(r))
      results.append(r)
  finally:
    writer.close()
  return results

"""The feature networks of the sample-quality metrics, and a dataset's reference statistics through them.

`load_feature_net(config)` dispatches on `config.eval.feature_net`:

* 'inception': pytorch-fid's FID Inception-v3 (`metrics.inception`), read from `eval.feature_net_path`
  (default `$SCORE_SDE_INCEPTION`, else `~/.cache/score_sde_jax/pt_inception-2015-12-05-6726825d.pth`);
  features = pool_3 (2048), logits (1008);
* 'mnist': a trained `metrics.mnist_features.MNISTClassifier`, from `eval.feature_net_path`: a `.msgpack`
  of its variables (`flax.serialization.to_bytes({"params": ...})`) or its training workdir (the EMA
  parameters of the newest checkpoint, restored as a raw tree as numpy arrays, so neither the
  classifier's config nor the devices that wrote it are needed; nothing in that workdir is written);
  features = the penultimate layer (128), logits (10).

`FeatureNet.fingerprint` (`checkpoints.fingerprint` of the variables) names the reference-statistics cache
file, so statistics computed through other weights are never reused.

`features_program(net, mesh)`: the jitted (variables, uint8 images [B, H, W, C]) -> (features, logits),
float32, the batch sharded over `mesh`.  Features are always computed from the uint8 images (divided by
255), the form in which samples are written to disk, so features recomputed from a sample file are those
computed when it was written.

`reference_stats(config, net, settings, ...)`: `eval.ref_stats` when given (pytorch-fid `mu`/`sigma`: FID
only, no KID; or the official score_sde `pool_3` features), else the statistics of the dataset's split
`eval.ref_split` (every example once: `datasets.get_eval_iterator` pads the last batch and masks it),
computed on first use and cached in `<stats_dir>/<dataset>_<split>_<fingerprint>_<image size>.npz`
(`mu`, `sigma` as pytorch-fid, plus the example count and a uniform reservoir of `eval.kid_reservoir_size`
features for KID).  `stats_dir`: `eval.stats_dir`, else `$SCORE_SDE_STATS_DIR`, else
`~/.cache/score_sde_jax/stats`.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from score_sde_jax.eval_settings import EvalError, SampleQualitySettings
from score_sde_jax.metrics import fid as fid_lib

STATS_ENV = "SCORE_SDE_STATS_DIR"
DEFAULT_STATS_DIR = os.path.join("~", ".cache", "score_sde_jax", "stats")


@dataclasses.dataclass(frozen=True)
class FeatureNet:
  name: str                                 # 'inception' | 'mnist'
  variables: Any
  source: str                               # the file or workdir the variables were read from
  apply: Callable[[Any, jax.Array], tuple]  # (variables, float images in [0, 1]) -> (features, logits)
  fingerprint: str


def load_feature_net(config) -> FeatureNet:
  """The feature network of `config.eval` (see the module docstring); EvalError when it cannot be read."""
  from score_sde_jax import checkpoints
  name = str(config.eval.feature_net).strip().lower()
  path = os.path.expanduser(str(config.eval.feature_net_path))
  if name == "inception":
    from score_sde_jax.metrics import inception
    try:
      variables = inception.load_fid_inception(path or None)
    except FileNotFoundError as e:
      raise EvalError(f"{e} (eval.feature_net_path)") from None
    except ValueError as e:
      raise EvalError(f"cannot read the FID Inception weights: {e}") from None
    source = path or inception.default_weights_path()

    def apply(v, x):
      out = inception.inception_features(v, x)
      return out["pool_3"], out["logits"]
  elif name == "mnist":
    if not path:
      raise EvalError("eval.feature_net='mnist' needs eval.feature_net_path (a .msgpack of the classifier's "
                      "variables or its training workdir).")
    variables, source = _read_mnist_variables(path)
    apply = _mnist_apply(variables, source)
  else:
    raise EvalError(f"Unknown eval.feature_net {name!r}; allowed values: 'inception', 'mnist'.")
  return FeatureNet(name=name, variables=variables, source=source, apply=apply,
                    fingerprint=checkpoints.fingerprint(variables))


def _read_mnist_variables(path: str):
  """(variables {"params": ...} as numpy, the file or step directory read)."""
  import flax.serialization
  if os.path.isfile(path):
    try:
      with open(path, "rb") as f:
        tree = flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # noqa: BLE001  (msgpack raises several types for cut or corrupt input)
      raise EvalError(f"{path}: not a readable .msgpack of the MNIST classifier's variables "
                      f"({type(e).__name__}: {str(e)[:200]}); write one with "
                      f"flax.serialization.to_bytes({{'params': ...}}) or pass its training workdir.") from None
    source = path
  else:
    tree, source = _read_workdir_ema(path)
  if not isinstance(tree, dict):
    raise EvalError(f"{source}: expected the classifier's variables (a map), got {type(tree).__name__}.")
  if "ema_params" in tree:
    tree = tree["ema_params"]
  if "params" not in tree:
    tree = {"params": tree}
  return jax.tree_util.tree_map(np.asarray, dict(tree)), source


def _read_workdir_ema(path: str):
  """(the EMA parameters, the step directory read) of the newest checkpoint of a training workdir (or of
  its checkpoints/ or one step directory), restored without a target, read-only, as numpy arrays."""
  import orbax.checkpoint as ocp
  if os.path.basename(os.path.normpath(path)).isdigit() and os.path.isdir(os.path.join(path, "state")):
    step_dir = path
  else:
    cdir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    steps = sorted(int(n) for n in os.listdir(cdir) if n.isdigit()) if os.path.isdir(cdir) else []
    if not steps:
      raise EvalError(f"{path}: neither a .msgpack file nor a training workdir with checkpoints; train the "
                      f"classifier (python scripts/train.py --config configs/mnist/feature_net.py --workdir "
                      f"<dir>) or pass its variables as a .msgpack.")
    step_dir = os.path.join(cdir, str(steps[-1]))
  item = os.path.join(os.path.abspath(step_dir), "state")
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      meta = ckptr.metadata(item)
      tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
      if not isinstance(tree, dict) or "ema_params" not in tree:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"the checkpoint has no ema_params (keys: {keys})")
      args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree["ema_params"])
      out = ckptr.restore(item, args=ocp.args.PyTreeRestore(
          item={"ema_params": tree["ema_params"]}, restore_args={"ema_params": args}, partial_restore=True))
  except Exception as e:  # noqa: BLE001  (whatever orbax raises for an unreadable checkpoint)
    raise EvalError(f"{step_dir}: cannot read the classifier's EMA parameters: {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
  return out["ema_params"], step_dir


def _mnist_apply(variables, source: str):
  from score_sde_jax.metrics import mnist_features as mf
  try:
    feature_dim = int(np.shape(variables["params"]["fc1"]["kernel"])[1])
    num_classes = int(np.shape(variables["params"]["fc2"]["kernel"])[1])
  except (KeyError, TypeError, IndexError):
    raise EvalError(f"{source}: not the variables of metrics.mnist_features.MNISTClassifier (no params/fc1 "
                    f"and params/fc2 kernels; top-level keys {sorted(variables['params'])[:8]}).") from None
  want = jax.eval_shape(lambda k: mf.init_mnist_classifier(k, feature_dim=feature_dim, num_classes=num_classes),
                        jax.random.PRNGKey(0))
  have = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
  for p, leaf in jax.tree_util.tree_flatten_with_path(want)[0]:
    key = jax.tree_util.keystr(p)
    if have.get(key) != tuple(leaf.shape):
      raise EvalError(f"{source}: does not fit MNISTClassifier(feature_dim={feature_dim}, num_classes="
                      f"{num_classes}): {key} has shape {have.get(key)}, expected {tuple(leaf.shape)}.")

  def apply(v, x):
    out = mf.mnist_features(v, x, feature_dim=feature_dim, num_classes=num_classes)
    return out["features"], out["logits"]
  return apply


def features_program(net: FeatureNet, mesh):
  """Jitted (variables, uint8 images [B, H, W, C]) -> (features [B, d], logits [B, C]) float32, batch sharded
  over `mesh` (B a multiple of its size), variables replicated."""
  from score_sde_jax.run import parallel
  rep, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)

  def fn(variables, images):
    f, logits = net.apply(variables, images.astype(jnp.float32) / 255.0)
    return f.astype(jnp.float32), logits.astype(jnp.float32)
  return jax.jit(fn, in_shardings=(rep, bsh), out_shardings=(bsh, bsh))


# ---------------------------------------------------------------------------------------------------
# Reference statistics
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Reference:
  mean: np.ndarray
  cov: np.ndarray
  n: int
  kept: Optional[np.ndarray]   # a uniform sample of the features, for KID (None: the file had only moments)
  source: str                  # the statistics file read or written
  computed: bool = False       # computed by this call (False: read from a file)


def stats_dir(settings: SampleQualitySettings) -> str:
  return os.path.expanduser(settings.stats_dir or os.environ.get(STATS_ENV, "").strip() or DEFAULT_STATS_DIR)


def stats_cache_path(config, net: FeatureNet, settings: SampleQualitySettings) -> str:
  """`<stats_dir>/<dataset>_<split>_<feature-net fingerprint>_<image size>.npz`."""
  dataset = str(config.data.dataset)
  if "category" in config.data and config.data.category:   # LSUN
    dataset += f"-{config.data.category}"
  split = re.sub(r"[^A-Za-z0-9]+", "-", settings.ref_split).strip("-")
  return os.path.join(stats_dir(settings), f"{dataset}_{split}_{net.name}-{net.fingerprint[:12]}_"
                                           f"{int(config.data.image_size)}.npz")


def _check_dim(ref: Reference, net: FeatureNet, dim: int) -> Reference:
  if ref.mean.shape[0] != dim:
    raise EvalError(f"{ref.source}: statistics of {ref.mean.shape[0]}-d features, but eval.feature_net="
                    f"{net.name!r} gives {dim}-d features; pass statistics of the same feature network.")
  return ref


def _subsample(kept: np.ndarray, keep: int) -> np.ndarray:
  """At most `keep` of a uniform sample of features, still uniform (a fixed-seed random subset)."""
  if len(kept) <= keep:
    return kept
  return kept[np.sort(np.random.default_rng(0).choice(len(kept), keep, replace=False))]


def _read_explicit(path: str, keep: int) -> Reference:
  try:
    with np.load(path, allow_pickle=False) as z:
      files = set(z.files)
    if "pool_3" in files:
      stats = fid_lib.FeatureStats(keep=keep, seed=0).update(fid_lib.load_official_features(path)["pool_3"])
      return Reference(stats.mean, stats.cov, stats.n, stats.kept, path)
    mu, sigma = fid_lib.load_stats(path)
    with np.load(path, allow_pickle=False) as z:
      kept = _subsample(np.asarray(z["kept"], np.float32), keep) if "kept" in z.files else None
      n = int(z["n"]) if "n" in z.files else 0
    return Reference(mu, sigma, n, kept, path)
  except (OSError, ValueError) as e:
    raise EvalError(f"eval.ref_stats: {e}") from None


def _read_cache(path: str, split: str, keep: int) -> Optional[Reference]:
  """The cached statistics, or None when absent, unreadable, of another split or with a smaller reservoir."""
  try:
    with np.load(path, allow_pickle=False) as z:
      if str(z["split"]) != split:
        return None
      n, kept = int(z["n"]), np.asarray(z["kept"], np.float32)
      if len(kept) < min(keep, n):
        return None
      return Reference(np.asarray(z["mu"]), np.asarray(z["sigma"]), n, _subsample(kept, keep), path)
  except (OSError, ValueError, KeyError):
    return None


def reference_stats(config, net: FeatureNet, settings: SampleQualitySettings, *, program=None, variables=None,
                    mesh=None, progress: bool = False, report: Callable[[str], None] = print) -> Reference:
  """The reference statistics (see the module docstring).  `program`/`variables`: a `features_program`
  and the variables placed for it (default: built here over `mesh`, default this host's devices)."""
  from score_sde_jax import datasets
  from score_sde_jax.run import parallel
  if settings.ref_stats:
    return _check_dim(_read_explicit(settings.ref_stats, settings.kid_reservoir_size), net, _feature_dim(net))
  path = stats_cache_path(config, net, settings)
  ref = _read_cache(path, settings.ref_split, settings.kid_reservoir_size)
  if ref is not None:
    return ref
  if program is None:
    mesh = mesh if mesh is not None else parallel.make_mesh(jax.local_devices())
    program, variables = features_program(net, mesh), parallel.replicate(net.variables, mesh)
  n_local = len(jax.local_devices()) if mesh is None else mesh.devices.size
  batch = -(-settings.batch_size // n_local) * n_local
  try:
    it = datasets.get_eval_iterator(config, settings.ref_split, batch_size=batch, process_index=0,
                                    process_count=1)
  except Exception as e:  # noqa: BLE001
    raise EvalError(f"cannot open split {settings.ref_split!r} of data.dataset={config.data.dataset!r} "
                    f"(eval.ref_split) for the reference statistics: {type(e).__name__}: {e}") from e
  report(f"reference statistics: {it.num_examples} examples of {config.data.dataset} split "
         f"{settings.ref_split!r} through the {net.name} feature net (once; cached in {path})")
  from tqdm.auto import tqdm
  stats = fid_lib.FeatureStats(keep=settings.kid_reservoir_size, seed=0)
  for b in tqdm(it, total=len(it), unit="batch", desc="reference statistics", disable=not progress):
    feats, _ = program(variables, b["image_int"])
    stats.update(np.asarray(feats)[np.asarray(b["mask"], bool)])
  if stats.n < 2:
    raise EvalError(f"split {settings.ref_split!r} of {config.data.dataset} has {stats.n} example(s); the "
                    f"reference statistics need at least 2 (eval.ref_split).")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, mu=stats.mean, sigma=stats.cov, n=stats.n, kept=stats.kept, split=settings.ref_split,
             dataset=str(config.data.dataset), feature_net=net.name, fingerprint=net.fingerprint)
  os.replace(tmp, path)
  return Reference(stats.mean, stats.cov, stats.n, stats.kept, path, computed=True)


def _feature_dim(net: FeatureNet) -> int:
  if net.name == "inception":
    return 2048
  return int(np.shape(net.variables["params"]["fc1"]["kernel"])[1])

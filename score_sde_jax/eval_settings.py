"""Settings of a likelihood evaluation (`config.eval`), validated: what `evaluation.evaluate_likelihood` runs
with and what `train/config_utils.validate_config` builds once before any work; and the settings of a
sample-quality evaluation (FID/KID/IS, `sample_quality.evaluate_sample_quality`), checked before any work."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from score_sde_jax import checks
from score_sde_jax import ode as ode_lib
from score_sde_jax.likelihood import DIVERGENCES


class EvalError(RuntimeError):
  """A missing workdir/checkpoint or an evaluation config that cannot work (message says what to do)."""


@dataclasses.dataclass
class EvalSettings:
  split: str
  batch_size: int
  num_repeats: int
  divergence: str
  num_probes: int
  rtol: float
  atol: float
  eps: float
  solver: str
  seed: int
  bound: bool
  bound_num_t: int
  max_examples: Optional[int]


def settings_from_config(config, *, batch_size: Optional[int] = None, max_examples: Optional[int] = None,
                         seed: Optional[int] = None, num_devices: int = 1, bound: bool = True,
                         bound_num_t: int = 16) -> EvalSettings:
  """Validated evaluation settings from `config.eval` (clear ValueError on bad values)."""
  if "eval" not in config:
    raise EvalError("the config has no 'eval' section (use a config built from score_sde_jax.config_defaults).")
  ev = config.eval
  bs = int(ev.batch_size if batch_size is None else batch_size)
  checks.check_positive_int("eval.batch_size", bs)
  n = int(num_devices)
  if bs % n:
    bs = -(-bs // n) * n   # pad the global batch to a multiple of the device count
  num_repeats = ev.num_repeats
  checks.check_positive_int("eval.num_repeats", num_repeats)
  divergence = checks.check_choice("eval.divergence", ev.divergence, DIVERGENCES)
  num_probes = ev.num_probes
  checks.check_positive_int("eval.num_probes", num_probes)
  rtol, atol, eps = ev.rtol, ev.atol, ev.eps
  solver = checks.normalize_name(ev.solver)
  ode_lib.check_solver_args(solver, rtol, atol, None)
  checks.check_eps(eps, 1.0, "eval.eps")
  split = ev.bpd_dataset
  if not isinstance(split, str) or not split:
    raise ValueError(f"eval.bpd_dataset must be a split name such as 'test'; got {split!r}.")
  if max_examples is not None:
    checks.check_positive_int("max_examples", max_examples)
  checks.check_positive_int("bound_num_t", bound_num_t)
  return EvalSettings(split=split, batch_size=bs, num_repeats=int(num_repeats), divergence=divergence,
                      num_probes=int(num_probes), rtol=float(rtol), atol=float(atol), eps=float(eps),
                      solver=solver, seed=int(config.seed if seed is None else seed), bound=bool(bound),
                      bound_num_t=int(bound_num_t), max_examples=max_examples)


# ---------------------------------------------------------------------------------------------------
# Sample quality (FID / KID / IS): `sample_quality.evaluate_sample_quality`
# ---------------------------------------------------------------------------------------------------
FEATURE_NETS = ("inception", "mnist")


@dataclasses.dataclass
class SampleQualitySettings:
  num_samples: int
  batch_size: int          # global, a multiple of the device count
  feature_net: str
  feature_net_path: str
  ref_stats: str
  ref_split: str
  stats_dir: str
  kid_subset_size: int
  kid_reservoir_size: int  # features kept per set (uniform reservoir) for KID
  kid_num_subsets: int
  is_splits: int
  seed: int


def sample_quality_settings(config, *, num_devices: int = 1) -> SampleQualitySettings:
  """Validated FID/KID/IS settings from `config.eval` (EvalError naming the field and what to do).

  Any eval.num_samples >= 2 works with any batch: the global batch eval.batch_size is rounded up to a
  multiple of the device count, the last batch's surplus samples are drawn but not counted."""
  if "eval" not in config:
    raise EvalError("the config has no 'eval' section (use a config built from score_sde_jax.config_defaults).")
  from score_sde_jax import config_defaults
  if config_defaults.is_toy(config):
    raise EvalError(f"eval.enable_sampling computes FID/KID/IS of images; data.dataset="
                    f"{config.data.dataset!r} is toy data (evaluate it with eval.enable_bpd=True).")
  ev = config.eval
  try:
    name = checks.check_choice("eval.feature_net", ev.feature_net, FEATURE_NETS)
    for field in ("num_samples", "batch_size", "kid_subset_size", "kid_reservoir_size", "kid_num_subsets",
                  "is_splits"):
      checks.check_positive_int(f"eval.{field}", ev[field])
  except ValueError as e:
    raise EvalError(f"{e} Set it with --config.eval.<field>=... or --set eval.<field>=...") from None
  n = int(ev.num_samples)
  if n < 2:
    raise EvalError(f"eval.num_samples must be >= 2 (FID needs a covariance); got {n}.")
  if int(ev.is_splits) > n:
    raise EvalError(f"eval.is_splits={ev.is_splits} exceeds eval.num_samples={n}: the Inception Score needs "
                    f"at least one sample per split; lower eval.is_splits or raise eval.num_samples.")
  if not 2 <= int(ev.kid_subset_size) <= int(ev.kid_reservoir_size):
    raise EvalError(f"eval.kid_subset_size must be >= 2 and <= eval.kid_reservoir_size (the features kept "
                    f"to draw the subsets from); got {ev.kid_subset_size} and {ev.kid_reservoir_size}.")
  path = os.path.expanduser(str(ev.feature_net_path))
  if name == "mnist":
    shape = (int(config.data.image_size), int(config.data.num_channels))
    if shape != (28, 1):
      raise EvalError(f"eval.feature_net='mnist' reads 28x28x1 images; data.image_size="
                      f"{config.data.image_size}, data.num_channels={config.data.num_channels}. Use "
                      f"eval.feature_net='inception' for this dataset.")
    if not path:
      raise EvalError("eval.feature_net='mnist' needs eval.feature_net_path: the .msgpack of a trained "
                      "MNISTClassifier's variables or its training workdir (train one with `python "
                      "scripts/train.py --config configs/mnist/feature_net.py --workdir <dir>`).")
  if path and not os.path.exists(path):
    raise EvalError(f"eval.feature_net_path={path!r} does not exist. " + (
        "Pass the .msgpack of a trained MNISTClassifier or its training workdir." if name == "mnist" else
        "Download pytorch-fid's pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/pytorch-fid "
        "releases, 'fid_weights') and pass its path, or leave the field empty to use ~/.cache/score_sde_jax/."))
  ref = os.path.expanduser(str(ev.ref_stats))
  if ref and not os.path.isfile(ref):
    raise EvalError(f"eval.ref_stats={ref!r} is not a file: pass a statistics .npz (pytorch-fid's mu/sigma "
                    f"or the official score_sde pool_3 file), or leave it empty to compute the statistics of "
                    f"the dataset's eval.ref_split.")
  split = ev.ref_split
  if not ref and (not isinstance(split, str) or not split.strip()):
    raise EvalError(f"eval.ref_split must be a split name such as 'train'; got {split!r}.")
  bs = int(ev.batch_size)
  bs = -(-bs // int(num_devices)) * int(num_devices)
  return SampleQualitySettings(num_samples=n, batch_size=bs, feature_net=name, feature_net_path=path,
                               ref_stats=ref, ref_split=str(split).strip(),
                               stats_dir=os.path.expanduser(str(ev.stats_dir)),
                               kid_subset_size=int(ev.kid_subset_size),
                               kid_reservoir_size=int(ev.kid_reservoir_size),
                               kid_num_subsets=int(ev.kid_num_subsets), is_splits=int(ev.is_splits),
                               seed=int(config.seed))

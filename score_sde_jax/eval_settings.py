"""Settings of a likelihood evaluation (`config.eval`), validated: what `evaluation.evaluate_likelihood` runs
with and what `train/config_utils.validate_config` builds once before any work."""
from __future__ import annotations

import dataclasses
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

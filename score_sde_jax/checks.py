"""Argument checks shared by the public entry points.

They run on static information (Python values and array shapes) before or while tracing, so bad input
fails with a ValueError that names the parameter and the allowed values instead of an XLA error.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Mapping


def normalize_name(name) -> str:
  """The one normalisation of every name chosen from a fixed set (samplers, SDEs, solvers, losses, …):
  surrounding spaces dropped, lower case ('None' → 'none', ' RK45' → 'rk45')."""
  if not isinstance(name, str):
    raise ValueError(f"expected a name (str), got {name!r} of type {type(name).__name__}.")
  return name.strip().lower()


def check_choice(param: str, value, allowed: Iterable[str] | Mapping) -> str:
  """`value` normalised (`normalize_name`, when a str) and checked against `allowed`; returns the
  normalised name, which callers use from then on."""
  allowed = sorted(allowed)
  if isinstance(value, str):
    value = normalize_name(value)
  if value not in allowed:
    raise ValueError(f"Unknown {param} {value!r}; allowed values: {', '.join(map(repr, allowed))}.")
  return value


def check_positive(param: str, value) -> None:
  try:
    ok = float(value) > 0 and math.isfinite(float(value))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"{param} must be a positive finite number; got {value!r}.")


def check_positive_int(param: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
    raise ValueError(f"{param} must be a positive integer; got {value!r}.")


def check_non_negative_int(param: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
    raise ValueError(f"{param} must be a non-negative integer; got {value!r}.")


def check_eps(eps, T: float, param: str = "eps") -> None:
  try:
    ok = 0.0 < float(eps) < float(T)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"{param} must lie in the open interval (0, T={T}); got {eps!r}.")


def check_x_t(x, t) -> None:
  """x is [B, *D] and t is [B]."""
  xs, ts = getattr(x, "shape", None), getattr(t, "shape", None)
  if xs is None or len(xs) < 1:
    raise ValueError(f"x must be an array shaped [B, *D]; got shape {xs}.")
  if ts is None or len(ts) != 1 or ts[0] != xs[0]:
    raise ValueError(f"t must be shaped [B] with B = x.shape[0] = {xs[0]}; got t of shape {ts} for "
                     f"x of shape {tuple(xs)}.")


def check_shape(param: str, shape) -> tuple:
  try:
    shape = tuple(int(s) for s in shape)
  except TypeError:
    raise ValueError(f"{param} must be a tuple of positive ints [B, *D]; got {shape!r}.") from None
  if len(shape) < 2 or any(s <= 0 for s in shape):
    raise ValueError(f"{param} must be a tuple of positive ints [B, *D] with at least one data "
                     f"dimension; got {shape!r}.")
  return shape


def check_score_output(score, x) -> None:
  if getattr(score, "shape", None) != getattr(x, "shape", None):
    raise ValueError(f"score_fn(x, t) must return an array shaped like x {tuple(x.shape)}; got "
                     f"shape {getattr(score, 'shape', None)}.")


def check_score_fn(score_fn, shape) -> None:
  """Checks once, by abstract evaluation, that score_fn maps x [B, *D] and t [B] to [B, *D]."""
  import jax
  import jax.numpy as jnp
  if not callable(score_fn):
    raise ValueError(f"score_fn must be a callable score_fn(x, t); got {score_fn!r}.")
  x = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
  t = jax.ShapeDtypeStruct(tuple(shape)[:1], jnp.float32)
  check_score_output(jax.eval_shape(score_fn, x, t), x)


def check_finite_data(param: str, x) -> None:
  """A concrete array holding NaN/Inf is refused (an adaptive solver would otherwise shrink its step to
  the step limit and fail with a message about the solver).  Traced arrays are not checked: their values
  are unknown while tracing."""
  import jax
  import numpy as np
  if isinstance(x, jax.core.Tracer):
    return
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return   # a global array of several hosts: each host checks what it passes in
  a = np.asarray(x)
  if np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating):
    bad = a.size - int(np.count_nonzero(np.isfinite(a)))
    if bad:
      first = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
      raise ValueError(f"{param} holds {bad} NaN/Inf value(s) of {a.size} (first at index {first}); "
                       f"the likelihood needs finite data. Check the data pipeline or drop those examples.")

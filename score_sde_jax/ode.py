"""One diffrax solve of an ODE dy/dt = f(t, y) on the device, with its true count of f evaluations.

Shared by the probability-flow ODE sampler, encode/decode and the likelihood.  The whole solve is one
compiled XLA while-loop (diffrax), adaptive (Tsit5, Dopri5 with a PID controller on rtol/atol) or with a
fixed number of steps (any solver with `num_steps`).
"""
from __future__ import annotations

from typing import Callable

import diffrax
import jax
import jax.numpy as jnp

from score_sde_jax import checks

SOLVERS = {
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "heun": diffrax.Heun,
    "euler": diffrax.Euler,
}
ADAPTIVE_SOLVERS = ("tsit5", "dopri5")


def check_solver_args(solver: str, rtol, atol, num_steps) -> str:
  solver = checks.normalize_name(solver)
  checks.check_choice("solver", solver, SOLVERS)
  if num_steps is None:
    if solver not in ADAPTIVE_SOLVERS:
      raise ValueError(f"solver {solver!r} has no error estimate here: pass num_steps (fixed steps), or "
                       f"use an adaptive solver ({', '.join(ADAPTIVE_SOLVERS)}).")
    checks.check_positive("rtol", rtol)
    checks.check_positive("atol", atol)
  else:
    checks.check_positive_int("num_steps", num_steps)
  return solver


def evals_per_step(solver: diffrax.AbstractSolver) -> int:
  """Vector-field evaluations per step attempt: the Runge–Kutta stages, less one when the last stage
  of a step is the first of the next (FSAL: Tsit5, Dopri5)."""
  tableau = getattr(solver, "tableau", None)
  if tableau is None:  # Euler
    return 1
  stages = tableau.num_stages
  return stages - 1 if tableau.fsal else stages


def num_function_evals(solver: diffrax.AbstractSolver, num_steps: jax.Array) -> jax.Array:
  """The number of vector-field evaluations a diffrax solve made, from its step-attempt count.

  Derived from diffrax's algorithm and checked against a direct count (tests/test_sampling.py):
  every step attempt (accepted or rejected) costs `evals_per_step`, and an FSAL solver evaluates f once
  more at t0 to start (diffrax's automatic choice of the first step reuses that evaluation).
  """
  tableau = getattr(solver, "tableau", None)
  fsal = bool(tableau is not None and tableau.fsal)
  return num_steps * evals_per_step(solver) + int(fsal)


def solve(f: Callable, y0, t0: float, t1: float, *, solver: str = "tsit5", rtol: float = 1e-5,
          atol: float = 1e-5, num_steps: int | None = None, max_steps: int = 16384):
  """Integrates dy/dt = f(t, y) from t0 to t1; returns (y(t1), number of f evaluations)."""
  solver_name = check_solver_args(solver, rtol, atol, num_steps)
  solver_obj = SOLVERS[solver_name]()
  term = diffrax.ODETerm(lambda t, y, args: f(t, y))
  adaptive = num_steps is None
  if adaptive:
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    dt0 = None
  else:
    controller = diffrax.ConstantStepSize()
    dt0 = (t1 - t0) / num_steps
    max_steps = num_steps
  sol = diffrax.diffeqsolve(term, solver_obj, t0=t0, t1=t1, dt0=dt0, y0=y0,
                            stepsize_controller=controller, saveat=diffrax.SaveAt(t1=True),
                            max_steps=max_steps)
  y1 = jax.tree_util.tree_map(lambda a: a[-1], sol.ys)
  nfe = num_function_evals(solver_obj, sol.stats["num_steps"])
  return y1, jnp.asarray(nfe, jnp.int32)

"""One diffrax solve of an ODE dy/dt = f(t, y) on the device(s), with its true count of f evaluations.

Shared by the probability-flow ODE sampler, encode/decode and the likelihood.  The whole solve is one
compiled XLA while-loop (diffrax), adaptive on rtol/atol (RK45, Tsit5, Dopri5, Bosh3) or with a fixed
number of steps (any solver with `num_steps`).  docs/ode_solvers.md compares the adaptive solvers, and
scipy's RK45 (the official code's), by NFE at equal accuracy, and explains the defaults.

Error control.  A step is accepted when

    RMS over every element of y of  err_i / (atol + rtol · max(|y0_i|, |y1_i|))  <  1,

err the solver's embedded error estimate — scipy's rule, and diffrax's (`PIDController`, norm
`optimistix.rms_norm` over all leaves).  The step size then changes by a factor 0.9 · err^(−1/k) (k the
error order: 5 for the 5(4) pairs, 3 for Bosh3), clipped to [0.2, 10]; no dtmin/dtmax.  `step_control`
picks the remaining details:

* 'scipy' (the default of 'rk45'): scipy's RK45/RK23 exactly — the first step by Hairer's algorithm
  (`_initial_step`, one extra evaluation of f), an accepted step may also shrink (factor ≥ 0.9 · …), and
  a step right after a rejection does not grow (`ScipyStepController`);
* 'diffrax' (the default of the others, as before): diffrax's I controller (an accepted step never
  shrinks) and diffrax 0.7.2's first step, which is always 0.01 (see `_initial_step`).

'rk45' with 'scipy' steps is the official solver (scipy's `solve_ivp(method='RK45')`) reproduced on the
device: the same method, error estimate and steps, hence the same NFE (benchmarks/ode_solvers.py).

`controller` chooses what the RMS runs over:

* 'batch' (default; the official code's choice, whose scipy `solve_ivp` sees the flattened batch): all
  examples of the batch together, so the whole batch takes the same steps.  For the likelihood the state
  is (x [B, *D], Δlog p [B]): each Δlog p is one element among B·(D + 1), as in the official flattened
  [x, logp] state.
* 'per_example': every example has its own controller (the solve is vmapped over the batch axis).  A
  vmapped while-loop runs until its slowest example is done, evaluating f on the whole batch each
  iteration, so the cost is that of the slowest example; the NFE reported is that example's.

Sharding.  The solve runs wherever its inputs are: with y0 sharded along the batch (or the caller's
`jit` asking for a batch-sharded result, or `sharding` given here), XLA's SPMD partitioner splits every
evaluation of f along the batch over the devices, and each step's error norm is one small all-reduce, so
the devices step in lockstep under one controller, as one device would.  diffrax's own failure check
(`throw=True`) would defeat this: it passes the whole solution through a host callback placed on one
device, and the partitioner then computes the entire solve on device 0 (with 8 simulated devices 6x
slower than with 1).  So the solve runs with `throw=False` and the same check is made on the step count
instead (and the result is NaN if the solve failed).
"""
from __future__ import annotations

from typing import Callable, Optional

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from score_sde_jax import checks


class RK45(diffrax.Dopri5):
  """Dormand–Prince 5(4) with the error estimate of scipy's RK45 (Dormand & Prince's own embedded
  4th-order weights, E = b − b̂ = (−71/57600, 0, 71/16695, −71/1920, 17253/339200, −22/525, 1/40)):
  the official solver's method.  diffrax's Dopri5 has the same 5th-order solution and stages but
  Shampine's (1986) embedded weights, so its error estimate, and so its steps, differ."""
  tableau = diffrax.ButcherTableau(
      a_lower=diffrax.Dopri5.tableau.a_lower, c=diffrax.Dopri5.tableau.c,
      b_sol=diffrax.Dopri5.tableau.b_sol,
      b_error=np.array([-71 / 57600, 0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40]))


SOLVERS = {
    "rk45": RK45,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "bosh3": diffrax.Bosh3,
    "heun": diffrax.Heun,
    "euler": diffrax.Euler,
}
ADAPTIVE_SOLVERS = ("rk45", "tsit5", "dopri5", "bosh3")
# The default solver of the sampler and the likelihood (and of config_defaults): the official solver, on
# the device — docs/ode_solvers.md gives the measurements behind the choice.
DEFAULT_SOLVER = "rk45"
CONTROLLERS = ("batch", "per_example")
STEP_CONTROLS = ("scipy", "diffrax")
# The step control each solver gets unless told otherwise: 'rk45' is the official solver (scipy's
# method and steps); the others keep diffrax's, as before 'rk45' was added (their results unchanged).
DEFAULT_STEP_CONTROL = {"rk45": "scipy"}


class _NoArgs:
  def __repr__(self):
    return "NO_ARGS"


NO_ARGS = _NoArgs()  # `solve`'s default: f is f(t, y), without args


def check_solver_args(solver: str, rtol, atol, num_steps) -> str:
  solver = checks.check_choice("solver", solver, SOLVERS)
  if num_steps is None:
    if solver not in ADAPTIVE_SOLVERS:
      raise ValueError(f"solver {solver!r} has no error estimate here: pass num_steps (fixed steps), or "
                       f"use an adaptive solver ({', '.join(ADAPTIVE_SOLVERS)}).")
    checks.check_positive("rtol", rtol)
    checks.check_positive("atol", atol)
  else:
    checks.check_positive_int("num_steps", num_steps)
  return solver


def check_controller(controller: str) -> str:
  return checks.check_choice("controller", controller, CONTROLLERS)


def check_step_control(step_control: Optional[str], solver: str) -> str:
  """The step control to use: `step_control`, or (None) the solver's default."""
  if step_control is None:
    return DEFAULT_STEP_CONTROL.get(checks.normalize_name(solver), "diffrax")
  return checks.check_choice("step_control", step_control, STEP_CONTROLS)


def evals_per_step(solver: diffrax.AbstractSolver) -> int:
  """Vector-field evaluations per step attempt: the Runge–Kutta stages, less one when the last stage
  of a step is the first of the next (FSAL: RK45, Tsit5, Dopri5, Bosh3)."""
  tableau = getattr(solver, "tableau", None)
  if tableau is None:  # Euler
    return 1
  stages = tableau.num_stages
  return stages - 1 if tableau.fsal else stages


def _fsal(solver) -> bool:
  tableau = getattr(solver, "tableau", None)
  return bool(tableau is not None and tableau.fsal)


def num_function_evals(solver: diffrax.AbstractSolver, num_steps: jax.Array) -> jax.Array:
  """The number of vector-field evaluations a diffrax solve made from its step-attempt count, for
  diffrax's own start (fixed steps, or step_control='diffrax'); `solve` adds those of its own choice of
  the first step (step_control='scipy': f(t0) and one trial evaluation, f(t0) then reused by the first
  step of an FSAL solver, as in scipy).

  Derived from diffrax's algorithm and checked against a direct count (tests/test_sampling.py):
  every step attempt (accepted or rejected) costs `evals_per_step`, and an FSAL solver evaluates f once
  more at t0 to start (diffrax 0.7.2's automatic choice of the first step evaluates nothing, see
  `_initial_step`).
  """
  return num_steps * evals_per_step(solver) + int(_fsal(solver))


def _initial_step(f, t0, t1, y0, f0, args, error_order, rtol, atol, norm):
  """|dt0| by Hairer, Nørsett & Wanner (1993, II.4), as scipy's `select_initial_step` (one evaluation of
  f besides f0 = f(t0, y0)).  diffrax has the same algorithm for `dt0=None`, but in diffrax 0.7.2 it never
  runs: the controller sees the ODE term wrapped (`WrapTerm`), fails its `isinstance(terms, ODETerm)`
  test and takes its SDE fallback, a first step of 0.01 whatever the problem."""
  tmap = jax.tree_util.tree_map
  direction = jnp.sign(t1 - t0)
  scale = tmap(lambda y: atol + jnp.abs(y) * rtol, y0)
  d0 = norm(tmap(jnp.divide, y0, scale))
  d1 = norm(tmap(jnp.divide, f0, scale))
  h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.where(d1 > 0, d1, 1.0))
  h0 = jnp.minimum(h0, jnp.abs(t1 - t0))
  f1 = f(t0 + direction * h0, tmap(lambda y, g: y + direction * h0 * g, y0, f0), args)
  d2 = norm(tmap(lambda a, b, c: (a - b) / c, f1, f0, scale)) / h0
  dmax = jnp.maximum(d1, d2)
  h1 = jnp.where(dmax <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3),
                 (0.01 / jnp.where(dmax > 0, dmax, 1.0)) ** (1.0 / error_order))
  return jax.lax.stop_gradient(jnp.minimum(jnp.minimum(100 * h0, h1), jnp.abs(t1 - t0)))


class ScipyStepController(diffrax.PIDController):
  """diffrax's I controller with the step-size rule of scipy's RK45/RK23 (the official solver), which is
  Hairer's: after an accepted step h ← h · min(10, 0.9 · err^(−1/k)) — which may shrink the step, where
  diffrax's own rule never shrinks an accepted step — and no growth right after a rejection (the factor
  is capped at 1); a rejected step shrinks by max(0.2, 0.9 · err^(−1/k)), as in diffrax.  k is the error
  order (5 for Tsit5/Dopri5, 3 for Bosh3), the norm and tolerances diffrax's.  The first slot of the
  controller state, unused by an I controller, holds 0.0 after a rejected attempt, 1.0 otherwise."""

  def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
    del args
    last_ok, prev_prev, at_dtmin = controller_state
    error_order = self._get_error_order(error_order)
    prev_dt = t1 - t0

    def _scale(_y0, _y1, _err):
      _y1 = jnp.where(jnp.isnan(_y1).any(), _y0, _y1)
      with jax.numpy_dtype_promotion("standard"):
        return _err / (self.atol + jnp.maximum(jnp.abs(_y0), jnp.abs(_y1)) * self.rtol)

    err = self.norm(jax.tree_util.tree_map(_scale, y0, y1_candidate, y_error))
    keep = err < 1
    raw = self.safety * jnp.where(err > 0, err, 1.0) ** (-1.0 / error_order)
    raw = jnp.where(err > 0, raw, self.factormax)
    grow = jnp.minimum(self.factormax, raw)
    grow = jnp.where(last_ok > 0.5, grow, jnp.minimum(grow, 1.0))
    shrink = jnp.where(jnp.isfinite(raw), jnp.maximum(self.factormin, raw), self.factormin)
    factor = jax.lax.stop_gradient(jnp.where(keep, grow, shrink))
    dt = prev_dt * factor.astype(jnp.result_type(prev_dt))
    next_t0 = jnp.where(keep, t1, t0)
    state = (jnp.where(keep, 1.0, 0.0).astype(jnp.result_type(last_ok)), prev_prev, at_dtmin)
    return keep, next_t0, next_t0 + dt, False, state, diffrax.RESULTS.successful


def _constrain(tree, sharding):
  if sharding is None:
    return tree
  return jax.tree_util.tree_map(lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)


@eqx.filter_jit   # one program also when called outside jit (the scipy first step evaluates f outside diffrax)
def _diffeqsolve(f, y0, args, t0, t1, solver_name, rtol, atol, num_steps, max_steps, step_control):
  """(y(t1), nfe, result) of one diffrax solve of the whole y0 (one controller), no host callback."""
  solver_obj = SOLVERS[solver_name]()
  term = diffrax.ODETerm(lambda t, y, a: f(t, y, a))
  dt0, solver_state, extra = None, None, 0
  if num_steps is not None:
    controller, dt0, max_steps = diffrax.ConstantStepSize(), (t1 - t0) / num_steps, num_steps
  elif step_control == "diffrax":
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
  else:
    controller = ScipyStepController(rtol=rtol, atol=atol)
    t0 = jnp.asarray(t0, jnp.result_type(t0, t1, float))
    t1 = jnp.asarray(t1, t0.dtype)
    f0 = f(t0, y0, args)
    dt0 = jnp.sign(t1 - t0) * _initial_step(f, t0, t1, y0, f0, args, solver_obj.error_order(term), rtol,
                                            atol, controller.norm)
    extra = 2   # f0 and the trial evaluation of `_initial_step`
    if _fsal(solver_obj):
      solver_state, extra = (jnp.array(False), f0), 1   # the first step reuses f0
  sol = diffrax.diffeqsolve(term, solver_obj, t0=t0, t1=t1, dt0=dt0, y0=y0, args=args,
                            stepsize_controller=controller, saveat=diffrax.SaveAt(t1=True),
                            max_steps=max_steps, throw=False, solver_state=solver_state)
  y1 = jax.tree_util.tree_map(lambda a: a[-1], sol.ys)
  nfe = jnp.asarray(num_function_evals(solver_obj, sol.stats["num_steps"]) + extra, jnp.int32)
  return y1, nfe, sol.result


def solve_per_example_nfe(f: Callable, y0, t0: float, t1: float, *, args=NO_ARGS,
                          solver: str = DEFAULT_SOLVER, rtol: float = 1e-5, atol: float = 1e-5,
                          num_steps: Optional[int] = None, max_steps: int = 16384, controller: str = "batch",
                          step_control: Optional[str] = None, sharding=None):
  """Like `solve`, but returns (y(t1), nfe [B]): each example's own count of f evaluations for
  controller='per_example' (the batch's count, repeated, for 'batch')."""
  solver_name = check_solver_args(solver, rtol, atol, num_steps)
  return _solve(f, y0, t0, t1, args=args, solver=solver_name, rtol=rtol, atol=atol, num_steps=num_steps,
                max_steps=max_steps, controller=check_controller(controller),
                step_control=check_step_control(step_control, solver_name), sharding=sharding)


def _solve(f, y0, t0, t1, *, args, solver, rtol, atol, num_steps, max_steps, controller, step_control,
           sharding):
  """`solve_per_example_nfe` without the argument checks (rtol and atol may be traced)."""
  if args is NO_ARGS:
    fa, args = (lambda t, y, a: f(t, y)), ()
  else:
    fa = f
  y0, args = _constrain(y0, sharding), _constrain(args, sharding)
  batch = jax.tree_util.tree_leaves(y0)[0].shape[0]
  if controller == "batch" or num_steps is not None:
    y1, nfe, result = _diffeqsolve(fa, y0, args, t0, t1, solver, rtol, atol, num_steps, max_steps,
                                   step_control)
    nfe = jnp.full((batch,), nfe)
  else:
    add = lambda tree: jax.tree_util.tree_map(lambda a: a[None], tree)
    drop = lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree)

    def one(y, a):
      y1, nfe, result = _diffeqsolve(fa, add(y), add(a), t0, t1, solver, rtol, atol, None, max_steps,
                                     step_control)
      return drop(y1), nfe, result

    y1, nfe, result = jax.vmap(one)(y0, args)
  # diffrax's throw=True, on the step count rather than on y (see the module docstring): an error (or
  # NaN under EQX_ON_ERROR=nan) if any example's solve failed (e.g. max_steps reached); y is NaN too.
  failed = jnp.invert(diffrax.is_okay(result))
  nfe = result.error_if(nfe, failed)
  any_failed = jnp.any(failed)
  y1 = jax.tree_util.tree_map(lambda a: jnp.where(any_failed, jnp.nan, a), y1)
  return _constrain(y1, sharding), nfe


def solve(f: Callable, y0, t0: float, t1: float, *, args=NO_ARGS, solver: str = DEFAULT_SOLVER,
          rtol: float = 1e-5, atol: float = 1e-5, num_steps: Optional[int] = None, max_steps: int = 16384,
          controller: str = "batch", step_control: Optional[str] = None, sharding=None):
  """Integrates dy/dt = f(t, y) (or f(t, y, args) when `args` is given, None included) from t0 to t1;
  returns (y(t1), number of f evaluations).

  Every leaf of y0 (and of `args`) has the batch as its leading axis, and f treats examples
  independently (needed for controller='per_example', which vmaps the solve over that axis; batch-shaped
  data f needs, such as Hutchinson probes, must come through `args` for that, not a closure).  The
  number of evaluations is of f on the whole batch: for 'per_example', the largest example's count (the
  vmapped loop runs that many batched evaluations; `solve_per_example_nfe` gives every example's).
  sharding: optional `jax.sharding.Sharding` of the batch axis to pin y0, args and y(t1) to (else they
  stay wherever the caller's inputs and `jit` shardings put them).
  """
  y1, nfe = solve_per_example_nfe(f, y0, t0, t1, args=args, solver=solver, rtol=rtol, atol=atol,
                                  num_steps=num_steps, max_steps=max_steps, controller=controller,
                                  step_control=step_control, sharding=sharding)
  return y1, jnp.max(nfe)

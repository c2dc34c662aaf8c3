"""NFE and accuracy of the adaptive solvers on the likelihood ODE, against the official solver (issue 11).

  python benchmarks/ode_solvers.py                      # all four problems (about an hour on 2 cores)
  python benchmarks/ode_solvers.py --problems toy_vp,toy_ve --reps 1

The ODE is the likelihood's: (x, Δlog p) under the probability-flow drift and its divergence
(`likelihood.likelihood_vector_field`), from eps = 1e-5 to T, on one fixed set of inputs per problem:

* toy_vp / toy_ve: 256 points drawn from `toy.ring8()`, its exact (analytic) perturbed score, the exact
  divergence (what `evaluation` uses for toy data); error in nats/dim;
* img_vp / img_ve: a random-weight DDPM++ (VP) / NCSN++ (VE) from `models.get_model` on 8x8x1 images
  (16 uniformly dequantized random 8-bit images through the config's scaler), the Hutchinson divergence
  with one Rademacher probe drawn once and used by every solve (so the differences are solver error
  only); error in bits/dim.

Rows: `solver / step control` is `ode.solve` on the device (diffrax) with that solver and step control
('diffrax': diffrax's I controller and its fixed first step; 'scipy': scipy's rules, see `ode`), and
`scipy RK45 (host, official)` is the official code's solver: scipy's `solve_ivp(method='RK45')` on the
flattened [x, Δlog p] of the whole batch in float64 on the host, calling the same vector field jitted
in the rows' dtype (float32: the official code evaluates its model in float32 too).  The device rows
run in float32 (the library's dtype) unless --dtype float64.  The controller table compares the
batch-wide error norm (one RMS over the whole batch, the official choice) with a per-example one (the
solve vmapped over examples).

Error: |log p − log p_ref| per example, divided by D (nats/dim) or D ln 2 (bits/dim), mean and max over
the batch; log p_ref from Tsit5 at rtol = atol = 1e-8 in float64 (model and state; `jax_enable_x64` is
set in this process only).  `ref spread` is the largest difference between that reference and RK45 at
1e-8 and Tsit5 at 1e-9 (both float64): the reference's own error is below it.

NFE: evaluations of the vector field on the whole batch (for 'per_example', the largest example's count:
the vmapped while-loop runs that many batched evaluations); `mean NFE/ex.` is the mean over examples of
each one's own count.  The equal-accuracy table sweeps rtol = atol over --frontier_tols and gives, for
each solver and error target, the fewest NFE of a solve whose mean error met the target.  Wall: seconds
per solve, the median of --reps rounds in which every row runs once in turn (interleaved: the CPU is
shared and noisy), after a first (compiling) run; scipy's includes a host round trip per evaluation.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from score_sde_jax import likelihood  # noqa: E402
from score_sde_jax import ode as ode_lib  # noqa: E402

EPS = 1e-5
SAMPLE_EPS = 1e-3
PROBLEMS = ("toy_vp", "toy_ve", "img_vp", "img_ve")   # also: toy_vp_sample, toy_ve_sample
SOLVERS = ("tsit5", "dopri5", "bosh3")

# The image models compute in `config.model.dtype` (float32); the reference needs float64 throughout,
# so the benchmark swaps the dtype the layers read while it traces each program.
_COMPUTE_DTYPE = [jnp.float32]


def _patch_model_dtype():
  from score_sde_jax.models import layers
  layers.get_dtype = lambda config: _COMPUTE_DTYPE[0]


def build_problem(name, args):
  """dict(sde, field(dtype) -> f(t, (x, ·), probes), x [B, *D] float64, probes [B, 1, *D] or None,
  d, unit, scale: error in logp → error per dim)."""
  from score_sde_jax import sde as sde_lib
  rng = np.random.default_rng(0)
  if name.startswith("toy"):
    from score_sde_jax.datasets import toy
    from score_sde_jax.sampling import probability_flow_drift
    mix = toy.ring8()
    sde = (sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000) if name.startswith("toy_vp")
           else sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0, N=1000))
    score_fn = mix.perturbed_score_fn(sde)
    if name.endswith("_sample"):
      # The sampling ODE: x(T) ~ prior (fixed draws) to x(1e-3); error: RMS over the 2 coordinates.
      x = np.asarray(sde.prior_sampling(jax.random.PRNGKey(0), (args.toy_batch, 2)), np.float64)
      drift = probability_flow_drift(sde, score_fn)
      return dict(sde=sde, field=lambda dtype: (lambda t, y, a: drift(t, y)), x=x, probes=None, d=2,
                  unit="RMS of x", scale=None, t0=sde.T, t1=SAMPLE_EPS)

    x = np.asarray(mix.sample(jax.random.PRNGKey(0), args.toy_batch), np.float64)

    def field(dtype):
      return likelihood.likelihood_vector_field(sde, score_fn, "exact")

    return dict(sde=sde, field=field, x=x, probes=None, d=2, unit="nats/dim", scale=1 / 2)

  from score_sde_jax import models
  from score_sde_jax.image_configs import mnist_ncsnpp
  from score_sde_jax.score import time_labels
  _patch_model_dtype()
  config = mnist_ncsnpp("vpsde" if name == "img_vp" else "vesde")
  size = args.image_size
  config.data.image_size = size
  m = config.model
  m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout = args.nf, (1, 2), 1, (), 0.0
  sde = sde_lib.sde_from_config(config)
  model = models.get_model(config)
  _COMPUTE_DTYPE[0] = jnp.float32
  variables = model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, size, size, 1), jnp.float32),
                         time_labels(sde, jnp.full((1,), 0.5, jnp.float32), True), train=False)
  u = (rng.integers(0, 256, (args.img_batch, size, size, 1)) + rng.uniform(size=(args.img_batch, size,
                                                                                 size, 1))) / 256.0
  x = 2.0 * u - 1.0 if config.data.centered else u
  probes = rng.choice([-1.0, 1.0], size=(args.img_batch, 1, size, size, 1))

  def field(dtype):
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), variables)
    return likelihood.likelihood_vector_field(sde, models.get_score_fn(sde, model, params),
                                              "hutchinson_rademacher")

  d = size * size
  return dict(sde=sde, field=field, x=x, probes=probes, d=d, unit="bits/dim", scale=1 / (d * math.log(2)))


def diffrax_program(p, dtype, solver, step_control, controller, max_steps=16384):
  """call(tol) -> (logp [B], nfe [B]) for one row: one compiled program, rtol = atol = tol traced."""
  sde, f = p["sde"], p["field"](dtype)
  x = jnp.asarray(p["x"], dtype)
  probes = None if p["probes"] is None else jnp.asarray(p["probes"], dtype)
  t0, t1 = jnp.asarray(EPS, dtype), jnp.asarray(sde.T, dtype)

  sample = p["scale"] is None
  if sample:
    t0, t1 = jnp.asarray(p["t0"], dtype), jnp.asarray(p["t1"], dtype)

  @jax.jit
  def run(x, probes, tol):
    kw = dict(args=probes, solver=solver, rtol=tol, atol=tol, num_steps=None, max_steps=max_steps,
              controller=controller, step_control=step_control, sharding=None)
    if sample:
      x1, nfe = ode_lib._solve(f, x, t0, t1, **kw)  # pylint: disable=protected-access
      return x1.reshape(x.shape[0], -1), nfe
    (z, dlogp), nfe = ode_lib._solve(  # pylint: disable=protected-access
        f, (x, jnp.zeros((x.shape[0],), dtype)), t0, t1, **kw)
    return sde.prior_logp(z) + dlogp, nfe

  def call(tol):
    _COMPUTE_DTYPE[0] = dtype
    logp, nfe = run(x, probes, jnp.asarray(tol, dtype))
    return np.asarray(logp, np.float64), np.asarray(nfe)

  return call


def scipy_program(p, dtype):
  """The official solver: scipy RK45 on the flattened [x, Δlog p] of the batch (float64 state), the
  vector field jitted in `dtype` and called from the host.  call(tol) -> (logp [B], nfe [B] = nfev)."""
  from scipy import integrate
  sde, f = p["sde"], p["field"](dtype)
  shape = p["x"].shape
  b = shape[0]
  probes = None if p["probes"] is None else jnp.asarray(p["probes"], dtype)

  @jax.jit
  def flat_field(t, y):
    x = y[:-b].reshape(shape).astype(dtype)
    dx, ddiv = f(t.astype(dtype), (x, jnp.zeros((b,), dtype)), probes)
    return jnp.concatenate([dx.reshape(-1), ddiv]).astype(jnp.float64)

  @jax.jit
  def prior(z):
    return sde.prior_logp(z)

  def fun(t, y):
    return np.asarray(flat_field(jnp.asarray(t, jnp.float64), jnp.asarray(y)))

  y0 = np.concatenate([p["x"].reshape(-1), np.zeros(b)])

  if p["scale"] is None:   # the sampling ODE: x only
    @jax.jit
    def flat_x(t, y):
      return f(t.astype(dtype), y.reshape(shape).astype(dtype), None).reshape(-1).astype(jnp.float64)

    def call_sample(tol):
      _COMPUTE_DTYPE[0] = dtype
      sol = integrate.solve_ivp(lambda t, y: np.asarray(flat_x(jnp.asarray(t, jnp.float64), jnp.asarray(y))),
                                (p["t0"], p["t1"]), p["x"].reshape(-1), rtol=tol, atol=tol, method="RK45")
      return sol.y[:, -1].reshape(b, -1), np.full((b,), sol.nfev)

    return call_sample

  def call(tol):
    _COMPUTE_DTYPE[0] = dtype
    sol = integrate.solve_ivp(fun, (EPS, p["sde"].T), y0, rtol=tol, atol=tol, method="RK45")
    y = sol.y[:, -1]
    logp = np.asarray(prior(jnp.asarray(y[:-b].reshape(shape)))) + y[-b:]
    return logp, np.full((b,), sol.nfev)

  return call


# (solver, step_control) pairs of the solver table and the frontier; None: scipy's RK45 on the host.
SOLVER_ROWS = (("tsit5", "diffrax"), ("dopri5", "diffrax"), ("bosh3", "diffrax"),
               ("tsit5", "scipy"), ("dopri5", "scipy"), ("bosh3", "scipy"), ("rk45", "scipy"),
               ("scipy RK45", None))


def _label(solver, step_control):
  return "scipy RK45 (host, official)" if step_control is None else f"{solver} / {step_control} steps"


def run_problem(name, args):
  p = build_problem(name, args)
  dtype = jnp.float32 if args.dtype == "float32" else jnp.float64
  t = time.time()
  ref, ref_nfe = diffrax_program(p, jnp.float64, "tsit5", "diffrax", "batch", max_steps=200000)(1e-8)
  ref_info = dict(nfe=int(np.max(ref_nfe)), seconds=time.time() - t, spread=0.0)
  if not args.no_ref_check:
    for solver, sc, tol in (("rk45", "scipy", 1e-8), ("tsit5", "diffrax", 1e-9)):
      other, _ = diffrax_program(p, jnp.float64, solver, sc, "batch", max_steps=200000)(tol)
      ref_info["spread"] = max(ref_info["spread"],
                               float(np.max(np.abs(other - ref))) * (p["scale"] or 1.0))

  def measure(call, tol):
    value, nfe = call(tol)
    if p["scale"] is None:   # samples: RMS over the coordinates of each example
      err = np.sqrt(np.mean((value - ref) ** 2, axis=-1))
    else:
      err = np.abs(value - ref) * p["scale"]
    return dict(tol=tol, nfe=int(np.max(nfe)), mean_nfe=float(np.mean(nfe)), err_mean=float(np.mean(err)),
                err_max=float(np.max(err)), times=[])

  programs = {}
  for solver, sc in SOLVER_ROWS:
    if sc is None:
      if not args.no_scipy:
        programs[(solver, sc, "batch")] = scipy_program(p, dtype)
    else:
      programs[(solver, sc, "batch")] = diffrax_program(p, dtype, solver, sc, "batch")
  for solver in args.per_example_solvers:
    programs[(solver, args.step_control, "per_example")] = diffrax_program(p, dtype, solver,
                                                                          args.step_control, "per_example")
  timed = {}   # (solver, step_control, controller, tol) -> row, for the tables at args.tols
  for key, call in programs.items():
    for tol in args.tols:
      timed[key + (tol,)] = measure(call, tol)
  for _ in range(args.reps):                      # interleaved timing rounds
    for key, row in timed.items():
      t = time.time()
      programs[key[:3]](key[3])
      row["times"].append(time.time() - t)
  frontier = {}
  for key, call in programs.items():
    if key[2] == "batch":
      frontier[key] = [timed[key + (tol,)] if tol in args.tols else measure(call, tol)
                       for tol in args.frontier_tols]
  return p, timed, frontier, ref_info


def _wall(row):
  return f"{np.median(row['times']):.3f}" if row["times"] else "-"


def format_tables(name, p, timed, frontier, ref, args):
  unit = p["unit"]
  out = [f"### {name}: B = {p['x'].shape[0]}, D = {p['d']}, error in {unit}", "",
         f"Reference: Tsit5, rtol = atol = 1e-8, float64: NFE {ref['nfe']}; ref spread {ref['spread']:.1e} "
         f"{unit}.", "",
         f"Solvers, batch-wide controller (NFE = evaluations on the batch; wall = s per solve):", "",
         f"| rtol = atol | solver / step control | NFE | mean err | max err | wall (s) |",
         "|---|---|---:|---:|---:|---:|"]
  for tol in args.tols:
    for solver, sc in SOLVER_ROWS:
      row = timed.get((solver, sc, "batch", tol))
      if row is not None:
        out.append(f"| {tol:.0e} | {_label(solver, sc)} | {row['nfe']} | {row['err_mean']:.2e} | "
                   f"{row['err_max']:.2e} | {_wall(row)} |")
  out += ["", f"Error norm: batch-wide vs per-example controller ({args.step_control} steps; NFE = batched "
          f"evaluations = the largest example's count for per-example; mean NFE/ex. = mean of each "
          f"example's own count):", "",
          "| rtol = atol | solver | controller | NFE | mean NFE/ex. | mean err | max err | wall (s) |",
          "|---|---|---|---:|---:|---:|---:|---:|"]
  for tol in args.tols:
    for solver in args.per_example_solvers:
      for controller in ("batch", "per_example"):
        row = timed[(solver, args.step_control, controller, tol)]
        out.append(f"| {tol:.0e} | {solver} | {controller} | {row['nfe']} | {row['mean_nfe']:.1f} | "
                   f"{row['err_mean']:.2e} | {row['err_max']:.2e} | {_wall(row)} |")
  targets = [10.0 ** -k for k in range(args.targets[0], args.targets[1] + 1)]
  out += ["", f"NFE at equal accuracy: the fewest NFE among the solves at rtol = atol ∈ "
          f"{{{', '.join(f'{t:.0e}' for t in args.frontier_tols)}}} whose mean error is ≤ the target "
          f"({unit}; '>' : no tolerance tried reached it):", "",
          "| solver / step control | " + " | ".join(f"≤ {t:.0e}" for t in targets) + " |",
          "|---|" + "---:|" * len(targets)]
  for (solver, sc, _), rows in frontier.items():
    cells = []
    for target in targets:
      ok = [r["nfe"] for r in rows if r["err_mean"] <= target]
      cells.append(str(min(ok)) if ok else f"> {max(r['nfe'] for r in rows)}")
    out.append(f"| {_label(solver, sc)} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--problems", default=",".join(PROBLEMS))
  ap.add_argument("--tols", default="1e-3,1e-4,1e-5")
  ap.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                  help="dtype of the diffrax and scipy rows' vector field (and the diffrax state)")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--toy_batch", type=int, default=256)
  ap.add_argument("--img_batch", type=int, default=16)
  ap.add_argument("--image_size", type=int, default=8)
  ap.add_argument("--nf", type=int, default=16)
  ap.add_argument("--frontier_tols", default="1e-2,3e-3,1e-3,3e-4,1e-4,3e-5,1e-5,3e-6,1e-6",
                  help="tolerances of the equal-accuracy table")
  ap.add_argument("--targets", default="3,6", help="error targets 1e-a .. 1e-b of that table")
  ap.add_argument("--per_example_solvers", default="tsit5,rk45")
  ap.add_argument("--step_control", default="scipy", help="step control of the controller table")
  ap.add_argument("--no_scipy", action="store_true")
  ap.add_argument("--no_ref_check", action="store_true")
  args = ap.parse_args()
  args.tols = [float(t) for t in args.tols.split(",")]
  args.frontier_tols = sorted({float(t) for t in args.frontier_tols.split(",")} | set(args.tols),
                              reverse=True)
  args.targets = [int(k) for k in args.targets.split(",")]
  args.per_example_solvers = [s for s in args.per_example_solvers.split(",") if s]
  print(f"# {' '.join(sys.argv)}")
  print(f"# jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()})")
  for name in args.problems.split(","):
    t = time.time()
    p, timed, frontier, ref = run_problem(name, args)
    print(format_tables(name, p, timed, frontier, ref, args))
    print(f"\n({time.time() - t:.0f} s for this problem)\n", flush=True)


if __name__ == "__main__":
  main()

"""Cost of one vector-field evaluation inside the diffrax solve vs the same evaluation on its own.

  python benchmarks/ode_loop.py                  # DDPM++ (ncsnpp family) on 28x28 MNIST, nf=32 (~1.2M
                                                 # parameters), batch 4, the colleague's setting
  python benchmarks/ode_loop.py --small          # nf=8, batch 2, a quick CPU run
  python benchmarks/ode_loop.py --odes likelihood --solvers euler,tsit5 --reps 5

For the likelihood ODE (`likelihood.log_likelihood`: x and Δlog p, Hutchinson/Rademacher divergence, one
probe) and the sampling ODE (`sampling.ode_sample`: the probability-flow drift), each row is one jitted
program, parameters passed as arguments (as `evaluation.make_batch_fn` and the samplers' callers do):

* `<ode>/standalone`: one evaluation of the ODE's vector field exactly as the solve calls it
  (`likelihood.augmented_dynamics`, `sampling.probability_flow_drift`), NFE = 1;
* `<ode>/<solver>`: the whole solve, `--steps` fixed steps for euler/heun (the NFE is exact) or adaptive
  tsit5 at --rtol/--atol; the NFE is the one the library returns;
* `likelihood/standalone_vjp_ref` (reference only): one forward pass and one VJP, the Hutchinson estimator
  as computed before the fix, which the colleague timed at 129 ms for the 1.26M-parameter model.

Timing: every program is compiled and run once, then --reps rounds each run every program once, in turn
(interleaved, because the CPU is shared and noisy).  ms/call is the median over rounds; ratio is the
median over rounds of (ms/NFE of the row) / (ms of its ODE's standalone evaluation in the same round).
Weights are the network's random initialisation.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def load_config(name):
  from score_sde_jax.run.config_utils import load_config_file
  return load_config_file(name if name.endswith(".py") else os.path.join(REPO, "configs", name + ".py"))


def build_programs(args):
  """{name: (jitted fn, args tuple, ode name)} plus the parameter count."""
  from score_sde_jax import likelihood, models, sampling
  from score_sde_jax import sde as sde_lib
  from score_sde_jax.score import time_labels

  config = load_config(args.config)
  config.model.nf = args.nf
  if args.small:
    config.model.ch_mult = (1, 2)
  sde = sde_lib.sde_from_config(config)
  model = models.get_model(config)
  size, ch = int(config.data.image_size), int(config.data.num_channels)
  shape = (args.batch, size, size, ch)
  x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32)
  labels = time_labels(sde, jnp.full((1,), 0.5), True)
  variables = jax.jit(lambda k: model.init({"params": k}, x[:1], labels, train=False))(
      jax.random.PRNGKey(0))
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))
  key = jax.random.PRNGKey(1)
  probes = jax.random.rademacher(key, (1,) + shape, dtype=jnp.float32)
  t = jnp.asarray(0.5, jnp.float32)
  eps_ll, eps_s = 1e-5, 1e-3
  tol = dict(rtol=args.rtol, atol=args.atol)

  def score(params):
    return models.get_score_fn(sde, model, params, continuous=True)

  progs = {}
  if "likelihood" in args.odes:
    def ll_vf(params, x, t):
      f = likelihood.augmented_dynamics(sde, score(params), "hutchinson_rademacher", probes)
      return f(t, (x, jnp.zeros((x.shape[0],), x.dtype)))

    def ll_vjp_ref(params, x, t):
      drift = sampling.probability_flow_drift(sde, score(params))
      out, vjp = jax.vjp(lambda y: drift(t, y), x)
      v = probes[0]
      return out, jnp.sum((vjp(v)[0] * v).reshape(x.shape[0], -1), -1)

    progs["likelihood/standalone"] = (jax.jit(ll_vf), (variables, x, t), "likelihood", None)
    if args.vjp_ref:
      progs["likelihood/standalone_vjp_ref"] = (jax.jit(ll_vjp_ref), (variables, x, t), "likelihood",
                                                None)
    for solver in args.solvers:
      num_steps = None if solver in ("tsit5", "dopri5") else args.steps
      fn = jax.jit(lambda params, x, key, solver=solver, num_steps=num_steps: likelihood.log_likelihood(
          key, sde, score(params), x, solver=solver, num_steps=num_steps, eps=eps_ll, **tol))
      progs[f"likelihood/{solver}" + (f"({num_steps})" if num_steps else "")] = (
          fn, (variables, x, key), "likelihood", -1)
  if "sampling" in args.odes:
    def s_vf(params, x, t):
      return sampling.probability_flow_drift(sde, score(params))(t, x)

    progs["sampling/standalone"] = (jax.jit(s_vf), (variables, x, t), "sampling", None)
    for solver in args.solvers:
      num_steps = None if solver in ("tsit5", "dopri5") else args.steps
      fn = jax.jit(lambda params, key, solver=solver, num_steps=num_steps: sampling.ode_sample(
          key, sde, score(params), shape, solver=solver, num_steps=num_steps, eps=eps_s, **tol))
      progs[f"sampling/{solver}" + (f"({num_steps})" if num_steps else "")] = (
          fn, (variables, key), "sampling", -1)
  return progs, n_params


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="mnist/vp_cpu", help="config name under configs/ (or a .py path)")
  p.add_argument("--nf", type=int, default=None, help="model width (default 32; --small: 8)")
  p.add_argument("--batch", type=int, default=None, help="batch size (default 4; --small: 2)")
  p.add_argument("--odes", default="likelihood,sampling")
  p.add_argument("--solvers", default="euler,heun,tsit5",
                 help="euler/heun take --steps fixed steps; tsit5/dopri5 are adaptive")
  p.add_argument("--steps", type=int, default=10, help="fixed steps for euler/heun")
  p.add_argument("--rtol", type=float, default=1e-3)
  p.add_argument("--atol", type=float, default=1e-3)
  p.add_argument("--reps", type=int, default=3, help="interleaved timed rounds (after one warm-up)")
  p.add_argument("--no-vjp-ref", dest="vjp_ref", action="store_false",
                 help="leave out the fwd+VJP reference row")
  p.add_argument("--small", action="store_true", help="nf=8, ch_mult=(1, 2), batch 2: a quick CPU run")
  args = p.parse_args(argv)
  args.nf = args.nf or (8 if args.small else 32)
  args.batch = args.batch or (2 if args.small else 4)
  args.odes = args.odes.split(",")
  args.solvers = [s.strip().lower() for s in args.solvers.split(",")]

  progs, n_params = build_programs(args)
  dev = jax.devices()[0]
  print(f"{args.config} nf={args.nf} ({n_params:,} parameters), batch {args.batch}; "
        f"{dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
        f"fixed steps={args.steps}, tsit5 rtol={args.rtol} atol={args.atol}; {args.reps} rounds",
        flush=True)
  nfe, compile_s = {}, {}
  for name, (fn, fargs, _, kind) in progs.items():
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*fargs))
    compile_s[name] = time.perf_counter() - t0
    nfe[name] = 1 if kind is None else int(out[-1])
  times = {name: [] for name in progs}
  for _ in range(args.reps):
    for name, (fn, fargs, _, _) in progs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*fargs))
      times[name].append(time.perf_counter() - t0)
  header = (f"{'program':32s} {'ms/call':>10s} {'NFE':>5s} {'ms/NFE':>9s} {'ratio':>6s} "
            f"{'1st call s':>10s}")
  print(header)
  print("-" * len(header))
  for name, (_, _, ode, _) in progs.items():
    base = np.asarray(times[f"{ode}/standalone"])
    per_nfe = np.asarray(times[name]) / nfe[name]
    ratio = float(np.median(per_nfe / base))
    print(f"{name:32s} {np.median(times[name]) * 1e3:10.1f} {nfe[name]:5d} "
          f"{np.median(per_nfe) * 1e3:9.1f} {ratio:6.2f} {compile_s[name]:10.1f}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

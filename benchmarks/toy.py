"""Benchmark on the 2-D toy (ring8, MLP score network): compile time and run time of

  * training:        `losses.get_loss_fn` + an optax Adam step, `--train_steps` steps in one jitted
                     `lax.scan` (fresh ring8 batches drawn inside the scan); reported as steps/s;
  * PC sampling:     `sampling.pc_sample` with the toy config's predictor/corrector over N steps;
  * ODE sampling:    `sampling.ode_sample` (adaptive tsit5, rtol = atol = 1e-5);
  * ODE likelihood:  `likelihood.log_likelihood` with the exact divergence (rtol = atol = 1e-5, eps = 1e-5)
                     of held-out ring8 points;

for each requested SDE.  Every stage is compiled ahead of time (`jax.jit(f).lower(...).compile()`, timed
as "compile", tracing included) and then run `--repeats` times (timed as "run", the best of the repeats,
each ended by `block_until_ready`), so the run time excludes compilation.  Sampling and likelihood use
the parameters the timed training produced, so that adaptive solvers see a trained score (their NFE
depends on it).

    python benchmarks/toy.py                       # VE and VP, defaults below
    python benchmarks/toy.py --sdes vp --batch_size 256 --train_steps 500 --num_points 500
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from score_sde_jax import likelihood  # noqa: E402
from score_sde_jax import losses  # noqa: E402
from score_sde_jax import models  # noqa: E402
from score_sde_jax import sampling  # noqa: E402
from score_sde_jax import sde as sde_lib  # noqa: E402
from score_sde_jax.config_defaults import toy_config  # noqa: E402
from score_sde_jax.datasets import toy  # noqa: E402

SDE_NAMES = {"ve": "vesde", "vp": "vpsde", "subvp": "subvpsde"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sdes", default="ve,vp", help="comma-separated subset of ve, vp, subvp")
  p.add_argument("--batch_size", type=int, default=512, help="training batch size")
  p.add_argument("--train_steps", type=int, default=1000, help="training steps per timed run")
  p.add_argument("--num_points", type=int, default=1000,
                 help="points drawn by each sampler and scored by the likelihood")
  p.add_argument("--num_scales", type=int, default=None,
                 help="N, the number of PC steps (default: the toy config's model.num_scales)")
  p.add_argument("--nf", type=int, default=None, help="MLP width (default: the toy config's)")
  p.add_argument("--num_layers", type=int, default=None, help="MLP blocks (default: the toy config's)")
  p.add_argument("--repeats", type=int, default=1, help="timed runs per stage (the best is reported)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  names = [s.strip().lower() for s in args.sdes.split(",") if s.strip()]
  for s in names:
    if s not in SDE_NAMES:
      p.error(f"--sdes: unknown SDE {s!r}; allowed values: {', '.join(SDE_NAMES)}")
  args.sdes = names
  for flag in ("batch_size", "train_steps", "num_points", "repeats"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag} must be a positive integer; got {getattr(args, flag)}")
  return args


def compile_and_time(fn, *args, repeats=1):
  """(compile seconds, best run seconds, output of the last run) for `jax.jit(fn)(*args)`."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  best, out = float("inf"), None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - t0)
  return compile_s, best, out


def make_config(sde_name, args):
  config = toy_config(sde_name, "ring8")
  if args.num_scales is not None:
    config.model.num_scales = args.num_scales
  if args.nf is not None:
    config.model.nf = args.nf
  if args.num_layers is not None:
    config.model.num_layers = args.num_layers
  config.training.batch_size = args.batch_size
  return config


def bench_sde(short_name, args):
  config = make_config(SDE_NAMES[short_name], args)
  sde = sde_lib.sde_from_config(config)
  model = models.get_model(config)
  data = toy.ring8()
  key = jax.random.PRNGKey(args.seed)
  k_init, k_train, k_test, k_pc, k_ode, k_ll = jax.random.split(key, 6)
  params = model.init(k_init, jnp.zeros((1, data.dim)), jnp.ones((1,)))
  loss_fn = losses.get_loss_fn(sde, model.apply, config)
  optimizer = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip),
                          optax.adam(config.optim.lr))
  opt_state = optimizer.init(params)
  batch_size, steps = args.batch_size, args.train_steps

  def train(params, opt_state, key):
    def step(carry, k):
      p, o = carry
      k_data, k_loss = jax.random.split(k)
      batch = {"image": data.sample(k_data, batch_size)}
      (loss, _), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(k_loss, p, batch)
      updates, o = optimizer.update(grads, o, p)
      return (optax.apply_updates(p, updates), o), loss

    (params, opt_state), loss = jax.lax.scan(step, (params, opt_state), jax.random.split(key, steps))
    return params, opt_state, loss

  rows = []
  c, r, (params, _, loss) = compile_and_time(train, params, opt_state, k_train, repeats=args.repeats)
  rows.append((short_name, f"train (bs={batch_size})", c, r, f"{steps / r:,.0f} steps/s", "-",
               f"final loss {float(loss[-50:].mean()):.3f}"))

  n = args.num_points
  shape = (n, data.dim)
  s = config.sampling

  def score_fn_of(p):
    return models.get_score_fn(sde, model, p)

  def pc(p, key):
    return sampling.pc_sample(key, sde, score_fn_of(p), shape, predictor=s.predictor,
                              corrector=s.corrector, snr=float(s.snr),
                              n_corrector_steps=int(s.n_steps_each), eps=float(s.eps))

  c, r, (_, nfe) = compile_and_time(pc, params, k_pc, repeats=args.repeats)
  rows.append((short_name, f"PC sample ({s.predictor}+{s.corrector})", c, r, f"{n / r:,.0f} points/s",
               str(int(nfe)), f"N={sde.N}"))

  def ode(p, key):
    return sampling.ode_sample(key, sde, score_fn_of(p), shape, solver="tsit5", rtol=1e-5, atol=1e-5,
                               eps=float(s.eps))

  c, r, (_, nfe) = compile_and_time(ode, params, k_ode, repeats=args.repeats)
  rows.append((short_name, "ODE sample (tsit5)", c, r, f"{n / r:,.0f} points/s", str(int(nfe)),
               "rtol=atol=1e-5"))

  x_test = data.sample(k_test, n)

  def nll(p, x, key):
    logp, _, nfe = likelihood.log_likelihood(key, sde, score_fn_of(p), x, divergence="exact",
                                             rtol=1e-5, atol=1e-5, eps=1e-5)
    return -jnp.mean(logp), nfe

  c, r, (value, nfe) = compile_and_time(nll, params, x_test, k_ll, repeats=args.repeats)
  true_nll = -float(jnp.mean(data.log_prob(x_test)))
  rows.append((short_name, "ODE likelihood (exact div.)", c, r, f"{n / r:,.0f} points/s",
               str(int(nfe)), f"NLL {float(value):.3f} (true {true_nll:.3f})"))
  return rows


def format_table(rows):
  header = ("SDE", "stage", "compile s", "run s", "throughput", "NFE", "note")
  cells = [header] + [(a, b, f"{c:.2f}", f"{d:.3f}", e, f, g) for a, b, c, d, e, f, g in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  right = {2, 3, 4, 5}
  lines = []
  for j, row in enumerate(cells):
    lines.append(" | ".join(v.rjust(w) if i in right else v.ljust(w)
                            for i, (v, w) in enumerate(zip(row, widths))))
    if j == 0:
      lines.append("-+-".join("-" * w for w in widths))
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  dev = jax.devices()[0]
  print(f"device: {dev.platform} ({dev.device_kind}), {os.cpu_count()} CPU cores visible; "
        f"batch_size={args.batch_size}, train_steps={args.train_steps}, num_points={args.num_points}, "
        f"repeats={args.repeats}")
  rows = []
  for name in args.sdes:
    rows.extend(bench_sde(name, args))
  print(format_table(rows))
  return rows


if __name__ == "__main__":
  main()

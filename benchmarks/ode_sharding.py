"""Adaptive ODE solves over 1, 2, 4, 8 simulated CPU devices: samples/s and images/s (issue 12).

  python benchmarks/ode_sharding.py                       # devices 1,2,4,8; batch 64; all variants
  python benchmarks/ode_sharding.py --devices 1,4 --variants gspmd,shard_map --reps 2

Each device count runs in its own process (XLA_FLAGS=--xla_force_host_platform_device_count=N must be
set before jax starts) on the same total batch, as the scripts run it: one jitted program, parameters and
key replicated, the batch sharded over a 1-D mesh of all devices.

* sample: `sampling.ode_sample` (probability-flow ODE, RK45, rtol = atol = --tol, from T to 1e-3), jitted
  with a batch-sharded output as scripts/sample.py and the training snapshots do;
* bpd: `evaluation.make_batch_fn` (bits/dim of random 8-bit images, Hutchinson with one Rademacher probe,
  RK45 at --tol, no ScoreFlow bound), the program scripts/evaluate.py runs per batch.

The model is a random-weight DDPM++ (VP) on 8x8x1 images (nf=16, two resolutions).  Variants of the
solve (the library's code path, with one function swapped in this process):

* before: the solve as it was: diffrax's `throw=True` (its failure check passes the solution through a
  host callback, which the SPMD partitioner places on one device: the whole solve runs there) and no
  sharding constraint of its own (`sharding` ignored);
* gspmd: the library (`ode.solve`, controller 'batch'): SPMD-partitioned over the devices, one
  step-size controller for the whole batch (an all-reduce of the error norm per step);
* per_example: the library with controller 'per_example' (the solve vmapped over examples, SPMD-
  partitioned; every example its own steps; the loop runs until the slowest example is done);
* shard_map: `jax.shard_map` over the mesh, each device solving its shard with its own controller
  (no communication in the loop; NFE = the largest shard's, results depend on the device count).

Timing: one compiling run, then --reps rounds in which every program runs once in turn; the median.
`max |Δ| vs 1 dev` compares the outputs (samples; bits/dim) with the same variant on 1 device.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("before", "gspmd", "per_example", "shard_map")


def child(args):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import PartitionSpec as P
  sys.path.insert(0, REPO)
  import diffrax
  from score_sde_jax import evaluation, models, sampling
  from score_sde_jax import ode as ode_lib
  from score_sde_jax import sde as sde_lib
  from score_sde_jax.image_configs import mnist_ncsnpp
  from score_sde_jax.score import time_labels
  from score_sde_jax.run import parallel

  config = mnist_ncsnpp("vpsde")
  size = args.image_size
  config.data.image_size = size
  m = config.model
  m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout = args.nf, (1, 2), 1, (), 0.0
  config.eval.rtol = config.eval.atol = args.tol
  config.eval.solver = config.sampling.ode_solver = "rk45"
  config.sampling.method = "ode"
  config.sampling.ode_rtol = config.sampling.ode_atol = args.tol
  config.sampling.noise_removal = False
  sde = sde_lib.sde_from_config(config)
  model = models.get_model(config)
  variables = model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, size, size, 1)),
                         time_labels(sde, jnp.full((1,), 0.5), True), train=False)
  mesh = parallel.make_mesh()
  n = mesh.devices.size
  rep, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  params = parallel.replicate(variables, mesh)
  key = jax.device_put(jax.random.PRNGKey(1), rep)
  ximg = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 1), dtype=np.uint8)
  ximg = parallel.host_to_global(ximg, bsh)
  settings = evaluation.settings_from_config(config, batch_size=args.batch, num_devices=n, bound=False)
  shape = (args.batch, size, size, 1)

  orig_solve = ode_lib.solve_per_example_nfe

  class ThrowingDiffrax:
    """diffrax as `ode` used it before: diffeqsolve with its failure check on (throw=True)."""

    def __getattr__(self, name):
      return getattr(diffrax, name)

    @staticmethod
    def diffeqsolve(*a, **k):
      return diffrax.diffeqsolve(*a, **dict(k, throw=True))

  def unpinned_solve(*a, **k):   # `sharding` is new: the old code had only the caller's shardings
    return orig_solve(*a, **dict(k, sharding=None))

  def per_example_solve(*a, **k):
    return orig_solve(*a, **dict(k, controller="per_example"))

  def shard_map_solve(f, y0, t0, t1, *, args=ode_lib.NO_ARGS, **k):
    if args is ode_lib.NO_ARGS:
      f, args = (lambda t, y, _, f=f: f(t, y)), ()
    args = () if args is None else args
    k.pop("sharding", None)
    b = jax.tree_util.tree_leaves(y0)[0].shape[0]

    def body(y, a):
      y1, nfe = orig_solve(f, y, t0, t1, args=a, **k)
      return y1, jax.lax.pmax(jnp.max(nfe), parallel.AXIS)

    y1, nfe = jax.shard_map(body, mesh=mesh, in_specs=(P(parallel.AXIS), P(parallel.AXIS)),
                            out_specs=(P(parallel.AXIS), P()), check_vma=False)(y0, args)
    return y1, jnp.full((b,), nfe)

  @contextlib.contextmanager
  def variant(name):
    if name == "before":
      ode_lib.diffrax = ThrowingDiffrax()
      ode_lib.solve_per_example_nfe = unpinned_solve
    elif name == "per_example":
      ode_lib.solve_per_example_nfe = per_example_solve
    elif name == "shard_map":
      ode_lib.solve_per_example_nfe = shard_map_solve
    try:
      yield
    finally:
      ode_lib.diffrax, ode_lib.solve_per_example_nfe = diffrax, orig_solve

  programs = {}
  for v in args.variants:
    sample_fn = sampling.get_sampler(config, sde, shape)

    def draw(p, k, sample_fn=sample_fn):
      return sample_fn(k, models.get_score_fn(sde, model, p))

    programs[("sample", v)] = (jax.jit(draw, in_shardings=(rep, rep), out_shardings=(bsh, rep)),
                               (params, key))
    programs[("bpd", v)] = (evaluation.make_batch_fn(config, sde, model, settings, mesh, False),
                            (params, ximg, key))
  results = {}
  for (task, v), (fn, fargs) in programs.items():
    with variant(v):
      t = time.time()
      out = jax.block_until_ready(fn(*fargs))
      first = time.time() - t
    value = np.asarray(parallel.to_host(out[0]), np.float64)
    shards = len({s.device for s in out[0].addressable_shards})
    np.save(os.path.join(args.out, f"{task}_{v}_{n}.npy"), value)
    results[(task, v)] = dict(task=task, variant=v, devices=n, nfe=int(out[-1]), first_s=first,
                              shards=shards, times=[])
  for _ in range(args.reps):
    for (task, v), (fn, fargs) in programs.items():
      t = time.time()
      jax.block_until_ready(fn(*fargs))
      results[(task, v)]["times"].append(time.time() - t)
  for r in results.values():
    r["seconds"] = float(np.median(r["times"]))
    r["per_s"] = args.batch / r["seconds"]
    print("RESULT " + json.dumps(r), flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--devices", default="1,2,4,8")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--tol", type=float, default=1e-5)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--image_size", type=int, default=8)
  ap.add_argument("--nf", type=int, default=16)
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  args.variants = args.variants.split(",")
  if args.child:
    return child(args)
  print(f"# python benchmarks/ode_sharding.py {' '.join(sys.argv[1:])}")
  print(f"# {os.cpu_count()} CPUs ({platform.machine()}), simulated devices share them; batch {args.batch}, "
        f"rtol = atol = {args.tol}")
  rows = []
  with tempfile.TemporaryDirectory() as out:
    for n in [int(d) for d in args.devices.split(",")]:
      env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu",
                 TF_CPP_MIN_LOG_LEVEL="3")
      cmd = [sys.executable, os.path.abspath(__file__), "--child", "--out", out,
             "--variants", ",".join(args.variants), "--batch", str(args.batch), "--tol", str(args.tol),
             "--reps", str(args.reps), "--image_size", str(args.image_size), "--nf", str(args.nf)]
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
      if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"child for {n} devices failed")
      for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
          rows.append(json.loads(line[7:]))
    import numpy as np
    for r in rows:
      base = os.path.join(out, f"{r['task']}_{r['variant']}_1.npy")
      mine = os.path.join(out, f"{r['task']}_{r['variant']}_{r['devices']}.npy")
      r["diff"] = (float(np.max(np.abs(np.load(base) - np.load(mine)))) if os.path.exists(base) else None)
  for task, unit in (("sample", "samples/s"), ("bpd", "images/s")):
    print(f"\n{task}: {unit} (median s per batch), NFE, output shards, max |Δ| vs 1 device")
    print("| variant | devices | " + unit + " | s/batch | NFE | shards | max abs diff vs 1 dev |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v in args.variants:
      for r in rows:
        if r["task"] == task and r["variant"] == v:
          diff = "-" if r["diff"] is None else f"{r['diff']:.1e}"
          print(f"| {v} | {r['devices']} | {r['per_s']:.1f} | {r['seconds']:.3f} | {r['nfe']} | "
                f"{r['shards']} | {diff} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())

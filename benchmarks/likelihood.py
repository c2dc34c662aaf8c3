"""Speed of the bits/dim pipeline: images/s and milliseconds per score-function evaluation (NFE).

  python benchmarks/likelihood.py                          # DDPM++ cont. (VP), batch 128, fp32 and bf16
  python benchmarks/likelihood.py --batch 128,256 --configs vp/cifar10_ddpmpp_continuous
  python benchmarks/likelihood.py --small                  # tiny width, batch 8: a quick CPU run

What is timed is the program `scripts/evaluate.py` runs for one batch (`evaluation.make_batch_fn`):
uniform dequantization of random 8-bit images, the probability-flow ODE with the Hutchinson (Rademacher)
divergence solved by diffrax (Tsit5, rtol = atol = 1e-5 unless --rtol/--atol) from eps = 1e-5 to T, one
forward pass and one JVP (per probe) of the network per NFE, everything in one compiled program with the batch
sharded over all devices.  Weights are random (the network's initialisation), as in the official
implementation's reported speed; the NFE a trained model needs differs.  Each row: the solve is compiled
and run once (warm-up), then timed over --iters runs with the same inputs; ms/NFE = seconds per batch /
NFE, images/s = batch / seconds per batch.  The compute dtype is `config.model.dtype` (bfloat16: bf16
activations and matmuls, fp32 parameters and ODE state).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name):
  from score_sde_jax.run.config_utils import load_config_file
  return load_config_file(name if name.endswith(".py") else os.path.join(REPO, "configs", name + ".py"))


def bench_one(config, batch, rtol, atol, iters):
  from score_sde_jax import evaluation, models
  from score_sde_jax import sde as sde_lib
  from score_sde_jax.score import time_labels
  from score_sde_jax.run import parallel

  config.eval.rtol, config.eval.atol = rtol, atol
  config.eval.divergence = "hutchinson_rademacher"
  config.eval.eps = 1e-5
  config.eval.solver = "tsit5"
  mesh = parallel.make_mesh()
  settings = evaluation.settings_from_config(config, batch_size=batch, num_devices=mesh.devices.size,
                                             bound=False)
  batch = settings.batch_size
  sde = sde_lib.sde_from_config(config)
  model = models.get_model(config)
  size, ch = int(config.data.image_size), int(config.data.num_channels)
  x = np.random.default_rng(0).integers(0, 256, size=(batch, size, size, ch), dtype=np.uint8)
  t = jax.numpy.full((1,), 0.5)
  variables = jax.jit(lambda k: model.init({"params": k}, jax.numpy.zeros((1, size, size, ch)),
                                           time_labels(sde, t, True), train=False))(jax.random.PRNGKey(0))
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))
  fn = evaluation.make_batch_fn(config, sde, model, settings, mesh, is_toy=False)
  variables = parallel.replicate(variables, mesh)
  xs = parallel.host_to_global(x, parallel.batch_sharding(mesh))
  key = jax.device_put(jax.random.PRNGKey(1), parallel.replicated(mesh))
  t0 = time.perf_counter()
  out = fn(variables, xs, key)
  jax.block_until_ready(out)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn(variables, xs, key)
  jax.block_until_ready(out)
  sec = (time.perf_counter() - t0) / iters
  bpd, _, nfe = out
  nfe = int(nfe)
  return dict(batch=batch, params=n_params, nfe=nfe, sec=sec, ms_per_nfe=sec / max(nfe, 1) * 1e3,
              ips=batch / sec, compile_s=first - sec, bpd=float(np.mean(parallel.to_host(bpd))))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", default="vp/cifar10_ddpmpp_continuous",
                 help="comma-separated config names under configs/ (or .py paths)")
  p.add_argument("--batch", default="128", help="comma-separated global batch sizes")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--rtol", type=float, default=None, help="default 1e-5 (--small: 1e-3)")
  p.add_argument("--atol", type=float, default=None, help="default 1e-5 (--small: 1e-3)")
  p.add_argument("--iters", type=int, default=1, help="timed solves per row (after one warm-up)")
  p.add_argument("--small", action="store_true",
                 help="tiny width (nf=8, one resolution, no attention), batch 8, rtol=atol=1e-3: a quick "
                      "CPU run of the same pipeline, not a measurement")
  args = p.parse_args(argv)
  batches = [int(b) for b in args.batch.split(",")]
  tol = 1e-3 if args.small else 1e-5
  rtol = args.rtol if args.rtol is not None else tol
  atol = args.atol if args.atol is not None else tol
  if args.small:
    batches = [8]
  dev = jax.devices()[0]
  print(f"devices: {len(jax.devices())} x {dev.device_kind} ({jax.default_backend()}); rtol={rtol} "
        f"atol={atol}, Tsit5, Hutchinson (Rademacher, 1 probe), eps=1e-5, random weights")
  header = (f"{'config':34s} {'dtype':9s} {'batch':>5s} {'params':>11s} {'NFE':>5s} {'s/batch':>8s} "
            f"{'ms/NFE':>8s} {'img/s':>8s} {'compile s':>9s} {'bpd':>7s}")
  print(header)
  print("-" * len(header))
  for name in args.configs.split(","):
    for dtype in args.dtypes.split(","):
      for batch in batches:
        config = load_config(name)
        config.model.dtype = dtype
        if args.small:
          config.model.nf = 8
          config.model.ch_mult = (1,)
          config.model.num_res_blocks = 1
          config.model.attn_resolutions = ()
        r = bench_one(config, batch, rtol, atol, args.iters)
        print(f"{name:34s} {dtype:9s} {r['batch']:5d} {r['params']:11,d} {r['nfe']:5d} {r['sec']:8.2f} "
              f"{r['ms_per_nfe']:8.2f} {r['ips']:8.2f} {r['compile_s']:9.1f} {r['bpd']:7.3f}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

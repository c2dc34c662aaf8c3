"""Throughput and model FLOPs utilisation of the paper's CIFAR-10 score networks.

  python benchmarks/models.py                       # paper configs, batch 128, float32 and bfloat16
  python benchmarks/models.py --batch 128,256,512   # more batch sizes
  python benchmarks/models.py --find_max_batch      # also the largest power-of-two batch that fits
  python benchmarks/models.py --small               # tiny widths and batch, a quick CPU smoke run

For each config, compute dtype and batch size it times

* forward: the jitted network in eval mode (ms per batch, images/s);
* train step: denoising score matching loss (the VE or VP/sub-VP objective of the config, continuous
  time), its gradient, gradient clipping and Adam with the update applied (params and optimiser state
  donated), images/s.

FLOPs are XLA's cost analysis of the *same* programs lowered and compiled for the CPU backend (on GPUs the
cost analysis leaves out the convolutions cuDNN runs), and MFU = FLOPs per step / step time / peak, with
the peak given by --peak (default 800e12: the bf16 dense matrix peak measured on an H100 SXM).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = ("vp/cifar10_ddpmpp_continuous", "ve/cifar10_ncsnpp_continuous",
                   "subvp/cifar10_ddpmpp_deep_continuous")


def load_config(name):
  from score_sde_jax.run.config_utils import load_config_file
  return load_config_file(name if name.endswith(".py") else os.path.join(REPO, "configs", name + ".py"))


def build(config, batch):
  """(init_fn, forward_fn, train_step_fn, example inputs) for a config."""
  from score_sde_jax.models import get_model
  from score_sde_jax.sde import sde_from_config
  from score_sde_jax.score import time_labels
  from score_sde_jax import sde as sde_lib

  model = get_model(config)
  sde = sde_from_config(config)
  size, ch = int(config.data.image_size), int(config.data.num_channels)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, size, size, ch)), jnp.float32)
  t = jnp.asarray(np.random.default_rng(1).uniform(1e-3, 1.0, size=(batch,)), jnp.float32)
  is_ve = isinstance(sde, sde_lib.VESDE)
  labels = time_labels(sde, t, True)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(2e-4))

  def init(key):
    params = model.init({"params": key}, x, labels, train=False)["params"]
    return params, tx.init(params)

  def forward(params, x, labels):
    return model.apply({"params": params}, x, labels, train=False)

  def loss_fn(params, x, key):
    k1, k2, k3 = jax.random.split(key, 3)
    tt = jax.random.uniform(k1, (x.shape[0],), minval=1e-5, maxval=1.0)
    z = jax.random.normal(k2, x.shape)
    mean_coeff, std = sde.mean_coeff_and_std(tt)
    xt = mean_coeff[:, None, None, None] * x + std[:, None, None, None] * z
    out = model.apply({"params": params}, xt, time_labels(sde, tt, True), train=True,
                      rngs={"dropout": k3})
    if is_ve:   # score parameterisation, λ = σ²:  |σ s + z|²
      r = out * std[:, None, None, None] + z
    else:       # noise parameterisation:  |ε̂ - z|²
      r = out - z
    return jnp.mean(jnp.sum(jnp.square(r).reshape(x.shape[0], -1), axis=-1))

  def train_step(params, opt_state, x, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return init, forward, train_step, (x, labels)


def _flops(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def cpu_flops(fn, *args, compiler_options=None):
  """FLOPs of `fn(*args)` from XLA's cost analysis of the program compiled for the CPU backend."""
  cpu = jax.devices("cpu")[0]
  sharding = jax.sharding.SingleDeviceSharding(cpu)
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
  return _flops(jax.jit(fn, compiler_options=compiler_options).lower(*shapes).compile())


def time_fn(fn, args, iters, warmup):
  for _ in range(warmup):
    out = fn(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters


def bench_one(config, batch, iters, warmup, do_flops=True, compiler_options=None):
  """Times the forward pass and the train step (each compiled once, ahead of time)."""
  init, forward, train_step, (x, labels) = build(config, batch)
  jit = functools.partial(jax.jit, compiler_options=compiler_options)
  params, opt_state = jit(init)(jax.random.PRNGKey(0))
  fwd = jit(forward).lower(params, x, labels).compile()
  fwd_t = time_fn(fwd, (params, x, labels), iters, warmup)

  key = jax.random.PRNGKey(1)
  step = jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, x, key).compile()
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, opt_state))
  state = {"params": params, "opt": opt_state}

  def run_step(x, key):
    state["params"], state["opt"], loss = step(state["params"], state["opt"], x, key)
    return loss

  step_t = time_fn(run_step, (x, key), iters, warmup)
  fwd_flops = step_flops = float("nan")
  if do_flops:
    if jax.default_backend() == "cpu":   # the timed programs are CPU programs already
      fwd_flops, step_flops = _flops(fwd), _flops(step)
    else:
      fwd_flops = cpu_flops(forward, shapes[0], x, labels)
      step_flops = cpu_flops(train_step, shapes[0], shapes[1], x, key)
  return dict(params=n_params, fwd_ms=fwd_t * 1e3, fwd_ips=batch / fwd_t, step_ms=step_t * 1e3,
              step_ips=batch / step_t, fwd_flops=fwd_flops, step_flops=step_flops)


def fits(config, batch):
  try:
    bench_one(config, batch, iters=1, warmup=1, do_flops=False)
    return True
  except Exception as e:  # noqa: BLE001  (XlaRuntimeError: RESOURCE_EXHAUSTED)
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      return False
    raise


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", default=None,
                 help="comma-separated config names under configs/ (or .py paths); default: DDPM++ cont., "
                      "NCSN++ cont., DDPM++ cont. deep (sub-VP); with --small the first two")
  p.add_argument("--batch", default="128", help="comma-separated batch sizes")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--peak", type=float, default=800e12, help="peak FLOP/s for MFU (default: H100 bf16)")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--remat", action="store_true", help="rematerialise the residual blocks")
  p.add_argument("--find_max_batch", action="store_true",
                 help="also time the largest power-of-two batch that fits in memory")
  p.add_argument("--small", action="store_true",
                 help="tiny widths (nf=16, 1 block), batch 4, 2 iterations: a quick CPU smoke run")
  args = p.parse_args(argv)

  batches = [int(b) for b in args.batch.split(",")]
  iters, warmup = args.iters, args.warmup
  compiler_options = None
  if args.small:
    batches, iters, warmup = [4], 2, 1
    if jax.default_backend() == "cpu":   # compile fast; this is a smoke run, not a measurement
      compiler_options = {"xla_backend_optimization_level": 0}
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), peak {args.peak:.3g} FLOP/s")
  header = (f"{'config':40s} {'dtype':9s} {'batch':>5s} {'params':>12s} {'fwd ms':>9s} {'fwd img/s':>10s} "
            f"{'step ms':>9s} {'step img/s':>10s} {'step TFLOP/s':>12s} {'MFU':>7s}")
  print(header)
  print("-" * len(header))
  names = args.configs.split(",") if args.configs else list(
      DEFAULT_CONFIGS[:2] if args.small else DEFAULT_CONFIGS)
  for name in names:
    for dtype in args.dtypes.split(","):
      config = load_config(name)
      config.model.dtype = dtype
      config.model.remat = bool(args.remat)
      if args.small:
        config.model.nf = 16
        config.model.num_res_blocks = 1
      bs = list(batches)
      if args.find_max_batch and not args.small:
        b = max(bs)
        while fits(config, b * 2):
          b *= 2
        if b not in bs:
          bs.append(b)
      for batch in bs:
        r = bench_one(config, batch, iters, warmup, compiler_options=compiler_options)
        tflops = r["step_flops"] / (r["step_ms"] / 1e3) / 1e12
        mfu = r["step_flops"] / (r["step_ms"] / 1e3) / args.peak
        print(f"{name:40s} {dtype:9s} {batch:5d} {r['params']:12,d} {r['fwd_ms']:9.2f} "
              f"{r['fwd_ips']:10.1f} {r['step_ms']:9.2f} {r['step_ips']:10.1f} {tflops:12.2f} "
              f"{mfu:7.2%}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""FID-MNIST, KID and IS of the MNIST CPU stand-in model with the PC, ODE and fast samplers (issues 16, 17).

  python scripts/train.py --config configs/mnist/vp_cpu.py --workdir runs/mnist_vp_cpu
  python scripts/train.py --config configs/mnist/feature_net.py --workdir runs/mnist_feature_net
  python benchmarks/mnist_quality.py --workdir runs/mnist_vp_cpu --feature_net runs/mnist_feature_net

Features: the penultimate layer (128-d) of the MNIST feature net (`metrics.mnist_features`, trained by the
project's trainer), its 10-way softmax for IS; reference statistics from the 60k training images (cached,
`feature_nets.reference_stats`).  Every row is `sample_quality.evaluate_sample_quality` on --num_samples
samples of the EMA weights drawn with one `sampling.method` setting (resumable chunks under
`<workdir>/eval/`: a rerun reuses them).  FID with n samples is biased upwards by roughly tr(Σ)/n, so
compare rows at the same n only.  Sanity rows: real test images (10k) against the training statistics
(the floor), the same with the pixels of each image permuted, and with Gaussian noise of std 0.3 (both
must be far above it).

Prints one table (FID-MNIST, KID, IS, NFE per sample, seconds) and the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# (row label, config overrides): the config's own PC sampler first.
SAMPLERS = [
    ("PC (Euler-Maruyama, N=1000)", {"sampling.method": "pc"}),
    ("ODE (RK45, rtol=atol=1e-5)", {"sampling.method": "ode"}),
    ("DDIM eta=0, 20 steps", {"sampling.method": "ddim", "sampling.num_steps": 20}),
    ("EDM Euler, 20 steps", {"sampling.method": "edm_euler", "sampling.num_steps": 20}),
    ("EDM Heun, 10 steps (19 NFE)", {"sampling.method": "edm_heun", "sampling.num_steps": 10}),
    ("DPM-Solver-2, NFE 20", {"sampling.method": "dpm_solver", "sampling.num_steps": 20,
                              "sampling.solver_order": 2}),
    ("DPM-Solver-3, NFE 20", {"sampling.method": "dpm_solver", "sampling.num_steps": 20}),
    ("DPM-Solver++(2M), NFE 20", {"sampling.method": "dpm_solver_pp", "sampling.num_steps": 20}),
    ("DPM-Solver++(2M), NFE 10", {"sampling.method": "dpm_solver_pp", "sampling.num_steps": 10}),
    ("DDIM eta=0, 50 steps", {"sampling.method": "ddim", "sampling.num_steps": 50}),
]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="the stand-in model's training workdir")
  p.add_argument("--feature_net", required=True, help="workdir (or .msgpack) of the MNIST feature net")
  p.add_argument("--num_samples", type=int, default=256)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--rows", default="", help="comma-separated row indices of SAMPLERS (default: all)")
  p.add_argument("--no_sanity", action="store_true", help="skip the real-image sanity rows")
  args = p.parse_args(argv)

  import jax
  from score_sde_jax import datasets, eval_settings, feature_nets, sample_quality
  from score_sde_jax.metrics import fid as fid_lib
  from score_sde_jax.run import config_utils, parallel, restore

  base = restore.load_workdir_config(args.workdir)
  config_utils.complete_config(base, lambda *_: None)
  sets = {"eval.enable_sampling": True, "eval.feature_net": "mnist", "eval.feature_net_path": args.feature_net,
          "eval.num_samples": args.num_samples, "eval.batch_size": args.batch_size}
  config_utils.apply_overrides(base, [f"{k}={v}" for k, v in sets.items()])
  net = feature_nets.load_feature_net(base)
  rows = []
  settings = eval_settings.sample_quality_settings(base)
  ref = feature_nets.reference_stats(base, net, settings, report=print)
  if not args.no_sanity:
    program = feature_nets.features_program(net, parallel.make_mesh(jax.local_devices()[:1]))
    it = datasets.get_eval_iterator(base, "test", batch_size=1000)
    real = np.concatenate([np.asarray(b["image_int"])[np.asarray(b["mask"], bool)] for b in it])
    rng = np.random.default_rng(0)
    permuted = np.stack([x.reshape(-1)[rng.permutation(x.size)].reshape(x.shape) for x in real])
    noisy = real.astype(np.float32) + 0.3 * 255.0 * rng.standard_normal(real.shape)
    variants = {      # uint8 images, as the feature program takes them
        "real test images (10k)": real,
        "test images, pixels permuted": permuted,
        "test images + N(0, 0.3^2) noise": np.clip(np.rint(noisy), 0, 255).astype(np.uint8),
    }
    for label, x in variants.items():
      feats, logits = zip(*(program(net.variables, x[i:i + 1000]) for i in range(0, len(x), 1000)))
      feats, logits = np.concatenate(feats), np.concatenate(logits)
      s = fid_lib.FeatureStats.from_features(feats)
      fid = fid_lib.frechet_distance(s.mean, s.cov, ref.mean, ref.cov)
      is_mean, _ = fid_lib.inception_score(logits, splits=10)
      rows.append((label, fid, float("nan"), is_mean, 0.0, 0.0, len(x)))
  chosen = [SAMPLERS[int(i)] for i in args.rows.split(",")] if args.rows else SAMPLERS
  for label, overrides in chosen:
    config = base.copy_and_resolve_references()
    config_utils.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])
    t0 = time.time()
    r = sample_quality.evaluate_sample_quality(config, args.workdir, checkpoints="latest", feature_net=net,
                                               report=print)[0]
    rows.append((label, r["fid"], r["kid"], r["is"], r["nfe_mean"], time.time() - t0, r["num_samples"]))
  print(f"\nMNIST CPU stand-in ({args.workdir}), FID-MNIST features ({net.source}), reference: training split; "
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{jax.devices()[0].platform}")
  print(f"| {'samples':34s} | {'n':>6s} | {'FID-MNIST':>9s} | {'KID':>8s} | {'IS':>5s} | {'NFE':>6s} | {'s':>6s} |")
  print(f"|{'-' * 36}|{'-' * 8}|{'-' * 11}|{'-' * 10}|{'-' * 7}|{'-' * 8}|{'-' * 8}|")
  for label, fid, kid, is_, nfe, sec, n in rows:
    kid_s = "" if not np.isfinite(kid) else f"{kid:.4f}"
    print(f"| {label:34s} | {n:6d} | {fid:9.3f} | {kid_s:>8s} | {is_:5.2f} | {nfe:6.0f} | {sec:6.0f} |")


if __name__ == "__main__":
  main()

"""Fast samplers against the exact probability-flow ODE and the exact distribution (issue 16).

  python benchmarks/samplers.py                        # VE, VP, sub-VP: 6 min on an idle 2-core CPU
  python benchmarks/samplers.py --sdes vp --n 2048 --nfe 10,20

Problem: the 2-D toy `toy.ring8()` (eight isotropic Gaussians, std 0.25, on a circle of radius 2) with its
exact perturbed score, under VE (σ ∈ [0.01, 10], the toy config's), VP and sub-VP (β ∈ [0.1, 20]);
eps = 1e-3, no final denoising (every row targets p_eps).  One batch of --n starting points
x(T) = prior_sampling(PRNGKey(--seed)), shared by every row (all samplers take x(T) from the key as
`sampling.ode_sample` does).

Columns: NFE ∈ --nfe (default 5, 10, 20, 35, 50, 100), the budget of score evaluations on the batch.  A
method that cannot spend it exactly uses the largest count below it (EDM Heun: 2K − 1 for K steps, so
NFE 10, 20, 50, 100 run 9, 19, 49, 99 evaluations); the cell then shows the NFE used as "@n".

* ODE error: RMS over the batch of ‖x − x_ref‖ (Euclidean, 2-D), x_ref the probability-flow ODE from the
  same x(T) solved by diffrax Tsit5 at rtol = atol = 1e-9 in float64 (the samplers run in --dtype,
  float32 by default, the library's: errors below ~1e-5 are round-off).  Deterministic samplers only.
* SW: sliced Wasserstein-2 distance between the n samples and 8n exact samples of p_eps
  (m(eps) x₀ + s(eps) z, x₀ ~ ring8), over 256 random directions (fixed).  The floor is the same
  statistic for independent exact n-sets (mean ± sd over 8): the Monte-Carlo level a perfect sampler
  shows at this n (dominated by the multinomial spread of the mode counts); values within about two sd
  of it are indistinguishable from exact.

Rows: DDIM (η = 0, t uniform; and η = 1, stochastic), EDM Euler and Heun (Karras σ, ρ = 7; Heun with
churn S_churn = 40, stochastic), DPM-Solver-2 and -3 ('fast' order schedules, λ uniform), DPM-Solver++(2M)
(λ uniform); baselines: PC with 1000 reverse-diffusion steps and no corrector (NFE 1000), and the adaptive
RK45 probability-flow sampler (`sampling.ode_sample` defaults, rtol = atol = 1e-5; its own NFE).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from score_sde_jax import dpm_solver  # noqa: E402
from score_sde_jax import fast_samplers as fs  # noqa: E402
from score_sde_jax import ode as ode_lib  # noqa: E402
from score_sde_jax import sampling  # noqa: E402
from score_sde_jax import sde as sde_lib  # noqa: E402
from score_sde_jax.datasets import toy  # noqa: E402

EPS = 1e-3
EXACT_FACTOR = 8    # the exact reference set has 8 n points (its own Monte-Carlo error then small)
FLOOR_DRAWS = 8     # independent exact n-sets measured against it: the floor's mean and spread
SDES = {
    "ve": lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0, N=1000),
    "vp": lambda: sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000),
    "subvp": lambda: sde_lib.SubVPSDE(beta_min=0.1, beta_max=20.0, N=1000),
}


def _fixed(fn, **kw):
  return lambda nfe: (nfe, lambda k, sde, f, shape: fn(k, sde, f, shape, num_steps=nfe, eps=EPS, **kw))


def _heun(**kw):
  def make(nfe):
    steps = (nfe + 1) // 2            # 2K − 1 evaluations (the last step is Euler)
    return 2 * steps - 1, lambda k, sde, f, shape: fs.edm_sample(k, sde, f, shape, num_steps=steps, eps=EPS, **kw)
  return make


# (label, deterministic?, nfe -> (nfe used, sampler) or None)
ROWS = [
    ("DDIM (η = 0)", True, _fixed(fs.ddim_sample)),
    ("EDM Euler", True, _fixed(fs.edm_sample, solver="euler")),
    ("EDM Heun", True, _heun()),
    ("DPM-Solver-2 (fast)", True, _fixed(dpm_solver.dpm_solver_sample, order=2)),
    ("DPM-Solver-3 (fast)", True, _fixed(dpm_solver.dpm_solver_sample, order=3)),
    ("DPM-Solver++(2M)", True, _fixed(dpm_solver.dpm_solver_pp_sample)),
    ("DDIM (η = 1)", False, _fixed(fs.ddim_sample, eta=1.0)),
    ("EDM Heun + churn 40", False, _heun(s_churn=40.0)),
]


def sliced_w2(a, b, key, num_dirs=256):
  """Sliced Wasserstein-2 between point sets a [n, D] and b [N, D] (N a multiple of n) over `num_dirs`
  random directions: per direction, the n sorted projections of a against b's quantiles at the same
  levels (i + ½)/n."""
  n, big = a.shape[0], b.shape[0]
  d = jax.random.normal(key, (num_dirs, a.shape[1]), jnp.float64)
  d = d / jnp.linalg.norm(d, axis=1, keepdims=True)
  pa = jnp.sort(jnp.asarray(a, jnp.float64) @ d.T, axis=0)
  pb = jnp.sort(jnp.asarray(b, jnp.float64) @ d.T, axis=0)[((np.arange(n) + 0.5) * big / n).astype(int)]
  return float(jnp.sqrt(jnp.mean((pa - pb) ** 2)))


def exact_samples(mix, sde, key, n):
  """n exact draws from p_eps: m(eps) x₀ + s(eps) z, x₀ from the mixture."""
  k1, k2 = jax.random.split(key)
  m, s = sde.mean_coeff_and_std(jnp.asarray(EPS))
  return np.asarray(m * mix.sample(k1, n) + s * jax.random.normal(k2, (n, mix.dim)), np.float64)


def run_sde(name, args):
  mix = toy.ring8()
  sde = SDES[name]()
  dtype = jnp.float32 if args.dtype == "float32" else jnp.float64
  key = jax.random.PRNGKey(args.seed)
  shape = (args.n, 2)
  with jax.enable_x64(True):
    sw_key = jax.random.PRNGKey(args.seed + 1)
    exact = exact_samples(mix, sde, jax.random.PRNGKey(args.seed + 2), EXACT_FACTOR * args.n)
    floors = [sliced_w2(exact_samples(mix, sde, jax.random.PRNGKey(args.seed + 3 + i), args.n), exact, sw_key)
              for i in range(FLOOR_DRAWS)]
    floor = (float(np.mean(floors)), float(np.std(floors)))

  def program(sampler):
    score_fn = mix.perturbed_score_fn(sde)
    return jax.jit(lambda k: sampler(k, sde, score_fn, shape))

  def prior():
    if dtype == jnp.float64:
      with jax.enable_x64(True):
        return np.asarray(sde.prior_sampling(key, shape))
    return np.asarray(sde.prior_sampling(key, shape))

  # The reference starts from the samplers' own x(T) (a float32 draw differs from a float64 one).
  x_T = prior()
  with jax.enable_x64(True):
    t = time.time()
    drift = sampling.probability_flow_drift(sde, mix.perturbed_score_fn(sde))
    ref, ref_nfe = ode_lib.solve(drift, jnp.asarray(x_T, jnp.float64), sde.T, EPS, solver="tsit5", rtol=1e-9,
                                 atol=1e-9, max_steps=200000)
    ref = np.asarray(ref)
    ref_info = f"reference: Tsit5 rtol = atol = 1e-9, float64, NFE {int(ref_nfe)} ({time.time() - t:.0f} s)"

  def measure(sampler):
    if dtype == jnp.float64:
      with jax.enable_x64(True):
        x, nfe = program(sampler)(key)
        x = np.asarray(x)
    else:
      x, nfe = program(sampler)(key)
      x = np.asarray(x, np.float64)
    if not np.all(np.isfinite(x)):
      return int(nfe), float("nan"), float("nan")
    err = float(np.sqrt(np.mean(np.sum((x - ref) ** 2, axis=1))))
    with jax.enable_x64(True):
      sw = sliced_w2(x, exact, sw_key)
    return int(nfe), err, sw

  results = {}
  for label, deterministic, make in ROWS:
    for nfe in args.nfe:
      made = make(nfe)
      if made is None:
        results[(label, nfe)] = None
        continue
      used, sampler = made
      got, err, sw = measure(sampler)
      assert got == used, (label, nfe, got, used)
      results[(label, nfe)] = (used, err if deterministic else None, sw)
  baselines = []
  for label, sampler in (
      ("PC: reverse diffusion, 1000 steps", lambda k, sde, f, shape: sampling.pc_sample(
          k, sde, f, shape, predictor="reverse_diffusion", corrector="none", eps=EPS, denoise=False)),
      ("ODE: RK45 adaptive, rtol = atol = 1e-5", lambda k, sde, f, shape: sampling.ode_sample(
          k, sde, f, shape, eps=EPS))):
    got, err, sw = measure(sampler)
    baselines.append((label, got, None if label.startswith("PC") else err, sw))
  return dict(results=results, baselines=baselines, floor=floor, ref_info=ref_info, sde=sde)


def _cell(entry, which, nfe):
  if entry is None:
    return "–"
  used, err, sw = entry
  v = err if which == "err" else sw
  if v is None:
    return "–"
  return f"{v:.2e}" + ("" if used == nfe else f" @{used}")


def format_tables(name, out, args):
  head = "| sampler | " + " | ".join(f"NFE {n}" for n in args.nfe) + " |"
  rule = "|---|" + "---:|" * len(args.nfe)
  lines = [f"### {name}: {type(out['sde']).__name__}, ring8, n = {args.n}, eps = {EPS}", "",
           out["ref_info"], "", "ODE error (RMS ‖x − x_ref‖ over the batch, deterministic samplers):", "",
           head, rule]
  for label, deterministic, _ in ROWS:
    if deterministic:
      lines.append(f"| {label} | " + " | ".join(_cell(out["results"][(label, n)], "err", n)
                                               for n in args.nfe) + " |")
  fm, fsd = out["floor"]
  lines += ["", f"Sliced W2 to exact samples of p_eps (floor, an exact n-set: {fm:.2e} ± {fsd:.1e}):", "",
            head, rule]
  for label, _, _ in ROWS:
    lines.append(f"| {label} | " + " | ".join(_cell(out["results"][(label, n)], "sw", n)
                                             for n in args.nfe) + " |")
  lines += ["", "| baseline | NFE | ODE error | SW |", "|---|---:|---:|---:|"]
  for label, nfe, err, sw in out["baselines"]:
    lines.append(f"| {label} | {nfe} | {'–' if err is None else f'{err:.2e}'} | {sw:.2e} |")
  lines.append(f"| exact n-set (floor, mean ± sd of {FLOOR_DRAWS}) | – | – | {fm:.2e} ± {fsd:.1e} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sdes", default="ve,vp,subvp")
  ap.add_argument("--nfe", default="5,10,20,35,50,100")
  ap.add_argument("--n", type=int, default=8192, help="batch: trajectories and samples")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                  help="dtype of the samplers (the reference is always float64)")
  args = ap.parse_args()
  args.nfe = [int(v) for v in args.nfe.split(",")]
  print(f"# {' '.join(sys.argv)}")
  print(f"# jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), samplers in {args.dtype}")
  for name in args.sdes.split(","):
    t = time.time()
    out = run_sde(name, args)
    print(format_tables(name, out, args))
    print(f"\n({time.time() - t:.0f} s for this SDE)\n", flush=True)


if __name__ == "__main__":
  main()

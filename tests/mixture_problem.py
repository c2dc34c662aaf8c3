"""The sampler tests' common problem: the 1-D two-mode mixture (weights 0.3 / 0.7 at ∓2, std 0.5) with its
exact score, under VE (σ ∈ [0.01, 10]), VP and sub-VP with N = 1000, sampled to eps = 1e-3 with n =
10,000 (the tolerances this n supports are derived in tests/test_sampling.py's docstring).  Shared by
tests/test_sampling.py and tests/test_fast_samplers.py."""
from score_sde_jax import sde as sde_lib
from score_sde_jax.datasets import toy

MIX = toy.mixture1d()
SDES = {
    "ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0, N=1000),
    "vp": sde_lib.VPSDE(N=1000),
    "subvp": sde_lib.SubVPSDE(N=1000),
}
EPS = 1e-3
N_SAMPLES = 10000

"""Test set-up: four simulated CPU devices (for the data-parallel tests), float32 defaults.

XLA_FLAGS must be set before jax is imported; every test module therefore sees 4 host devices.  Single-
device code is unaffected (arrays live on device 0 unless sharded).
"""
import os

_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# JAX's persistent compilation cache, shared by both xdist workers and the script subprocesses the tests
# start (they inherit the environment): the same tiny programs (toy train steps, samplers, the scripts'
# start-up) are compiled once per run instead of once per process.  XLA compiles slowly on 2 cores, and
# the cache key covers the program, the compile options and the device assignment, so a hit is the same
# executable.  A clean checkout starts it empty; `.jax-cache/` is git-ignored.  Every program is kept,
# however quick to compile: a script run compiles ~90 small programs (eager ops, data generation, the PRNG)
# of ~60 ms each, 6 of the 17 s of a tiny toy `train.py`, which every later process then reads back.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_REPO, ".jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

REPO_ROOT = _REPO
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")


@pytest.fixture(scope="session")
def shared_dir():
  """`../shared` beside the checkout (real MNIST and official fixtures)."""
  if not os.path.isdir(SHARED):
    pytest.skip(f"{SHARED} is not present")
  return SHARED

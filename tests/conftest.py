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

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")


@pytest.fixture(scope="session")
def shared_dir():
  """`../shared` beside the checkout (real MNIST and official fixtures)."""
  if not os.path.isdir(SHARED):
    pytest.skip(f"{SHARED} is not present")
  return SHARED

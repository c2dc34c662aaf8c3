"""The notebooks under notebooks/: every one is valid nbformat v4 JSON without stored outputs (fast), and
every one executes top to bottom with nbclient on a python3 kernel (slow: each trains a small model).

Execution: `pytest -m slow tests/test_notebooks.py`.  Notebooks run with notebooks/ as the working
directory and a per-cell timeout of 300 s.
"""
import glob
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO_ROOT, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
CELL_TIMEOUT_S = 300
IDS = [os.path.basename(p) for p in NOTEBOOKS]


def test_notebooks_exist():
  assert NOTEBOOKS, f"no notebooks under {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_valid(path):
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, "a notebook without code cells"
  for cell in code:
    assert not cell.get("outputs") and cell.get("execution_count") is None, (
        "commit notebooks without outputs (clear them before committing)")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_executes(path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  nb = nbformat.read(path, as_version=4)
  env_backup = dict(os.environ)
  # The kernel inherits this process's environment; make sure it finds this interpreter's packages
  # and runs on the CPU without the simulated multi-device flag the test suite's conftest sets.
  os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
  os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                     if not f.startswith("--xla_force_host_platform_device_count"))
  try:
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute()
  finally:
    os.environ.clear()
    os.environ.update(env_backup)
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors

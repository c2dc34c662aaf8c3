"""Where the test suite's time goes: a pytest plugin that splits each test's wall time (setup, call and
teardown) into XLA backend compilation, jaxpr tracing and lowering to MLIR, from JAX's own monitoring
events, and prints one table per file and one for the slowest tests at the end of the run.

    PYTHONPATH=benchmarks python -m pytest -q -n auto -p suite_profile      # the default run
    PYTHONPATH=benchmarks python -m pytest -q -n auto -p suite_profile -m slow

Works under pytest-xdist: each worker appends its rows to a JSON-lines file in a temporary directory
and the controller reads them all.  Script subprocesses that tests start are not split (their time is
the test's "other"), and a persistent-cache hit counts as no compile.  Use a fresh cache
(`rm -rf .jax-cache`) to see what a clean CI checkout pays.  Nothing is written into the checkout.

Why by hand: pytest's --durations gives wall time only, and JAX's profiler traces one process at a time;
neither says whether a test's time is XLA compilation, tracing or running.
"""
import collections
import json
import os
import tempfile
import time

import pytest

_EVENTS = {"/jax/core/compile/backend_compile_duration": "compile",
           "/jax/core/compile/jaxpr_trace_duration": "trace",
           "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower"}
_ENV = "SCORE_SDE_SUITE_PROFILE_DIR"


class _Profile:
  def __init__(self, directory):
    self.directory = directory
    self.acc = collections.Counter()
    self.listening = False

  def listen(self, event, duration, **_):
    if event in _EVENTS:
      self.acc[_EVENTS[event]] += duration

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(self, item, nextitem):
    if not self.listening:   # jax is imported by then (conftest.py sets its flags first)
      import jax.monitoring   # pylint: disable=import-outside-toplevel
      jax.monitoring.register_event_duration_secs_listener(self.listen)
      self.listening = True
    self.acc.clear()
    start = time.perf_counter()
    yield
    row = dict(test=item.nodeid, wall=time.perf_counter() - start, **self.acc)
    with open(os.path.join(self.directory, f"rows_{os.getpid()}.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")


def pytest_configure(config):
  if not hasattr(config, "workerinput"):   # the controller (or a run without xdist) makes the directory
    os.environ[_ENV] = tempfile.mkdtemp(prefix="suite_profile_")
  config.pluginmanager.register(_Profile(os.environ[_ENV]), "suite_profile_impl")


def _table(title, rows, key_name):
  lines = [title, f"{'wall s':>8} {'compile':>8} {'trace':>7} {'lower':>7} {'other':>8}  {key_name}"]
  for name, r in rows:
    other = r["wall"] - r["compile"] - r["trace"] - r["lower"]
    lines.append(f"{r['wall']:8.1f} {r['compile']:8.1f} {r['trace']:7.1f} {r['lower']:7.1f} {other:8.1f}  {name}")
  return lines


def pytest_terminal_summary(terminalreporter, config):
  if hasattr(config, "workerinput"):
    return
  directory = os.environ[_ENV]
  rows = []
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name)) as f:
      rows += [json.loads(line) for line in f]
  if not rows:
    return
  zero = dict(wall=0.0, compile=0.0, trace=0.0, lower=0.0)
  by_file = collections.defaultdict(lambda: dict(zero))
  total = dict(zero)
  for r in rows:
    for k in zero:
      by_file[r["test"].split("::")[0]][k] += r.get(k, 0.0)
      total[k] += r.get(k, 0.0)
  out = [""]
  out += _table(f"suite profile: {len(rows)} tests, seconds summed over workers", [("all", total)], "")
  out += [""] + _table("by file", sorted(by_file.items(), key=lambda kv: -kv[1]["wall"]), "file")
  slowest = sorted(rows, key=lambda r: -r["wall"])[:25]
  out += [""] + _table("slowest tests", [(r["test"], {**zero, **r}) for r in slowest], "test")
  for line in out:
    terminalreporter.write_line(line)
  terminalreporter.write_line(f"(rows: {directory})")

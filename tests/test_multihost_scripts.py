"""scripts/train.py, sample.py and evaluate.py across 2 processes, started exactly as the README documents
("Sampling and evaluating on a pod"): SCORE_SDE_DISTRIBUTED=1, JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>,
JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i, each process with simulated CPU devices (XLA_FLAGS).  The outputs
equal one single-process run over the same number of devices; a process that dies does not leave the
other hanging.

One workdir (module fixture, built once even under xdist): trained to step 8 by 1 process, resumed to
step 16 by 2 processes (1 host → 2 hosts), so it holds a 1-host and a 2-host checkpoint.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_topology import CONFIG, OVERRIDES, REPO, ok, run_script, shared_dir, tree


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(i, port, devices, extra=None):
  e = dict(os.environ)
  e["XLA_FLAGS"] = " ".join([f for f in e.get("XLA_FLAGS", "").split()
                             if not f.startswith("--xla_force_host_platform_device_count")]
                            + [f"--xla_force_host_platform_device_count={devices}"])
  e.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=REPO + os.pathsep + e.get("PYTHONPATH", ""),
           SCORE_SDE_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
           JAX_PROCESS_ID=str(i), SCORE_SDE_INIT_TIMEOUT="120", SCORE_SDE_HEARTBEAT_TIMEOUT="30")
  e.update(extra or {})
  return e


class Run:
  """2 processes of one command; output in files (readable while they run)."""

  def __init__(self, argv, devices, logdir, extra_env=None):
    port = _free_port()
    os.makedirs(logdir, exist_ok=True)
    self.logs = [(os.path.join(logdir, f"p{i}.out"), os.path.join(logdir, f"p{i}.err")) for i in range(2)]
    self.procs = []
    for i in range(2):
      out, err = open(self.logs[i][0], "w"), open(self.logs[i][1], "w")
      self.procs.append(subprocess.Popen([sys.executable] + list(argv), cwd=REPO, stdout=out, stderr=err,
                                         env=_env(i, port, devices, extra_env)))
      out.close()
      err.close()

  def text(self, i, which=0):
    with open(self.logs[i][which]) as f:
      return f.read()

  def wait(self, timeout=300):
    deadline = time.time() + timeout
    try:
      for p in self.procs:
        p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
      self.kill()
    return [(p.returncode, self.text(i, 0), self.text(i, 1)) for i, p in enumerate(self.procs)]

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def ok2(results):
  for i, (rc, out, err) in enumerate(results):
    assert rc == 0, (i, rc, out[-2000:], err[-4000:])
  return results


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
  """A workdir with a 1-host checkpoint (step 8) and a 2-host checkpoint (step 16)."""
  def build(d):
    work = d / "work"
    train = ["scripts/train.py", f"--config={CONFIG}", f"--workdir={work}", "--noprogress", "--notoy_report"]
    ok(run_script(train + OVERRIDES + ["--config.training.n_iters=8"], devices=1))
    (rc0, out0, _), _ = ok2(Run(train + OVERRIDES + ["--config.training.n_iters=16"], 1, d / "logs").wait())
    assert "Resuming from step 8" in out0, out0
    assert "written on 1 device(s) / 1 host(s); this run has 2 / 2" in out0, out0

  d = shared_dir(tmp_path_factory, "multihost_scripts", build)
  work = d / "work"
  assert sorted(int(s) for s in os.listdir(work / "checkpoints") if s.isdigit()) == [8, 16]
  return work


def test_two_processes_sample_as_one(hosts, tmp_path):
  """2 processes × 1 device sample the 1-host checkpoint (step 8): one .npz with exactly --num_samples
  samples, written by process 0 alone, equal to 1 process × 2 devices."""
  before = tree(hosts / "checkpoints")
  args = ["scripts/sample.py", f"--workdir={hosts}", "--step=8", "--num_samples=40", "--batch_size=16",
          "--noprogress"]
  res = ok2(Run(args + [f"--out={tmp_path / 'two.npz'}"], 1, tmp_path / "logs").wait())
  assert "-> " + str(tmp_path / "two.npz") in res[0][1]
  quiet = [ln for ln in res[1][1].splitlines() if ln.strip() and not ln.startswith("[Gloo]")]
  assert quiet == [], res[1][1]            # process 1 writes and prints nothing
  ok(run_script(args + [f"--out={tmp_path / 'one.npz'}"], devices=2))
  two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
  assert two["samples"].shape == (40, 2) and int(two["step"]) == 8
  np.testing.assert_allclose(two["samples"], one["samples"], rtol=0, atol=1e-6)
  assert sorted(os.listdir(tmp_path)) == ["logs", "one.npz", "one.png", "two.npz", "two.png"]
  assert tree(hosts / "checkpoints") == before


def test_two_processes_evaluate_as_one(hosts, tmp_path):
  """2 processes × 2 devices evaluate the 2-host checkpoint (step 16) like 1 process × 4 devices: every
  test example counted once, the same per-example NLL, one results file, one summary and one TensorBoard
  event file (process 0)."""
  before = tree(hosts / "checkpoints")
  args = ["scripts/evaluate.py", f"--config={CONFIG}"] + OVERRIDES + [
      f"--checkpoint={hosts}/checkpoints/16", "--nobound", "--noprogress"]
  ok2(Run(args + [f"--workdir={tmp_path / 'two'}"], 2, tmp_path / "logs").wait())
  ok(run_script(args + [f"--workdir={tmp_path / 'one'}"], devices=4))
  results = {}
  for k in ("two", "one"):
    files = sorted(f for f in os.listdir(tmp_path / k / "eval") if f != "logs")
    assert len(files) == 2 and files[0].endswith(".jsonl") and files[1].endswith(".summary.json"), files
    # TensorBoard: one event file, written by process 0 only
    assert len([f for f in os.listdir(tmp_path / k / "eval" / "logs") if f.startswith("events.out")]) == 1
    entries = [json.loads(ln) for ln in open(tmp_path / k / "eval" / files[0]) if '"entry"' in ln]
    ids = [i for e in entries for i in e["ids"]]
    assert sorted(ids) == list(range(32))               # every example once
    results[k] = (dict(zip(ids, (v for e in entries for v in e["value"]))),
                  json.load(open(tmp_path / k / "eval" / files[1])))
  (v2, s2), (v1, s1) = results["two"], results["one"]
  assert s2["step"] == s1["step"] == 16 and s2["num_examples"] == 32
  np.testing.assert_allclose([v2[i] for i in range(32)], [v1[i] for i in range(32)], rtol=1e-4, atol=1e-4)
  assert abs(s2["nll_nats_per_dim"] - s1["nll_nats_per_dim"]) <= 1e-4
  assert tree(hosts / "checkpoints") == before


def test_a_killed_process_does_not_leave_the_other_hanging(hosts, tmp_path):
  """SIGKILL process 1 while both sample: process 0 stops within seconds with one clear line and exit
  status 4 (it waited for process 1 in a collective)."""
  run = Run(["scripts/sample.py", f"--workdir={hosts}", "--num_samples=100000", "--batch_size=16",
             "--set", "model.num_scales=1000", "--noprogress", f"--out={tmp_path / 'never.npz'}"], 1,
            tmp_path / "logs")
  try:
    deadline = time.time() + 120
    while "weights of step" not in run.text(0) and time.time() < deadline:
      assert run.procs[0].poll() is None and run.procs[1].poll() is None, (run.text(0), run.text(0, 1))
      time.sleep(0.5)
    time.sleep(2)
    os.kill(run.procs[1].pid, signal.SIGKILL)
    t0 = time.time()
    rc = run.procs[0].wait(timeout=90)
    seconds = time.time() - t0
  finally:
    run.kill()
  err = run.text(0, 1)
  print(f"process 0 stopped {seconds:.1f}s after process 1 was killed; its last line: "
        f"{err.strip().splitlines()[-1]}")
  assert rc == 4, (rc, err[-3000:])
  assert "ERROR: multi-host run aborted on process 0 of 2:" in err, err[-3000:]
  assert not (tmp_path / "never.npz").exists()


_SNIPPET = """
import os, sys, time
from score_sde_jax.run import parallel
parallel.initialize_distributed()
import jax
import numpy as np
from jax.experimental import multihost_utils

def main():
  multihost_utils.process_allgather(np.ones(2))
  if jax.process_index() == 1:
    time.sleep(1)
    if sys.argv[1] == "die":
      os._exit(9)                       # no error published: only the heartbeat stops
    raise ValueError("boom in process 1")
  time.sleep(120)                        # process 0 waits outside any collective
  print("not noticed")

parallel.run_main(main)
"""


@pytest.mark.parametrize("how", ["die", "raise"])
def test_watchdog_stops_the_survivor(tmp_path, how):
  """Process 1 dies silently (heartbeat stops) or fails with an error (published): process 0, busy
  outside any collective, exits within the heartbeat timeout (5 s here) naming process 1."""
  script = tmp_path / "snippet.py"
  script.write_text(_SNIPPET)
  t0 = time.time()
  res = Run([str(script), how], 1, tmp_path / "logs", {"SCORE_SDE_HEARTBEAT_TIMEOUT": "5"}).wait(timeout=100)
  seconds = time.time() - t0
  (rc0, out0, err0), (rc1, _, err1) = res
  print(f"{how}: both processes ended after {seconds:.1f}s; process 0: {err0.strip().splitlines()[-1]}")
  assert rc0 == 4 and "not noticed" not in out0, (rc0, out0, err0[-3000:])
  if how == "die":
    assert rc1 == 9
    assert "process 1 sent no heartbeat for" in err0, err0[-3000:]
  else:
    assert rc1 == 1 and "ValueError: boom in process 1" in err1, err1[-3000:]
    assert "process 1 failed (process 1: ValueError: boom in process 1)" in err0, err0[-3000:]
  assert seconds < 60


def test_distributed_settings_from_the_environment(monkeypatch):
  from score_sde_jax.run import parallel
  for k in ("SCORE_SDE_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
            "SCORE_SDE_INIT_TIMEOUT", "SCORE_SDE_HEARTBEAT_TIMEOUT"):
    monkeypatch.delenv(k, raising=False)
  assert not parallel.distributed_requested() and not parallel.initialize_distributed()
  monkeypatch.setenv("SCORE_SDE_DISTRIBUTED", "1")
  assert parallel.distributed_requested()
  # Nothing set: cluster auto-detection (TPU pods, SLURM, Open MPI) with the timeouts.
  assert parallel.distributed_args() == {"initialization_timeout": 300, "heartbeat_timeout_seconds": 200}
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  with pytest.raises(parallel.DistributedError, match="JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID not set"):
    parallel.distributed_args()
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  monkeypatch.setenv("SCORE_SDE_INIT_TIMEOUT", "60")
  monkeypatch.setenv("SCORE_SDE_HEARTBEAT_TIMEOUT", "20")
  assert parallel.distributed_args() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                                         "process_id": 1, "initialization_timeout": 60,
                                         "heartbeat_timeout_seconds": 40}
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  with pytest.raises(parallel.DistributedError, match=r"JAX_PROCESS_ID=2 must be in \[0, JAX_NUM_PROCESSES=2\)"):
    parallel.distributed_args()


def test_bad_multihost_settings_are_one_error_line(tmp_path):
  r = run_script(["scripts/sample.py", "--multihost", f"--workdir={tmp_path}"], devices=1,
                 env={"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "", "JAX_PROCESS_ID": ""})
  assert r.returncode == 2, (r.stdout, r.stderr[-3000:])
  assert "ERROR: multi-host run: JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID not set" in r.stderr, r.stderr

"""Multi-host training with `jax.distributed` on one machine: 2 processes × 2 CPU devices (gloo
collectives).  Each host feeds its half of every global batch; the run is stopped after 8 steps and
resumed (every host restores its own data-iterator position from the shared checkpoint) to 12 steps.
Losses and parameters must match a single-process, single-device run of the same config."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np

HERE = os.path.abspath(__file__)
TESTS = os.path.dirname(HERE)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, n_iters, out_prefix):
  port = _free_port()
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["PYTHONPATH"] = os.path.dirname(TESTS) + os.pathsep + env.get("PYTHONPATH", "")
  procs = [subprocess.Popen([sys.executable, HERE, str(i), str(port), str(workdir), str(n_iters),
                             f"{out_prefix}_{i}.npz"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-4000:]
  return outs


def test_two_hosts_match_single_device_and_resume(tmp_path):
  from test_train import _params_flat, tiny_config
  from score_sde_jax import train as train_lib
  c = tiny_config(n_iters=12)
  ref = train_lib.train(c, str(tmp_path / "ref"), devices=jax.devices()[:1], progress=False,
                        keep_history=True, report=lambda *_: None)
  ref_losses = np.array([h["loss"] for h in ref.history])
  ref_params = _params_flat(ref.state.params)

  work = tmp_path / "mh"
  out1 = _launch(work, 8, str(tmp_path / "a"))
  out2 = _launch(work, 12, str(tmp_path / "b"))
  assert "Resuming from step 8" in out2[0], out2[0][-3000:]
  for i in range(2):   # both hosts saw the same global losses
    a, b = np.load(tmp_path / f"a_{i}.npz"), np.load(tmp_path / f"b_{i}.npz")
    losses = np.concatenate([a["losses"], b["losses"]])
    assert len(losses) == 12
    rel = np.max(np.abs(losses - ref_losses) / np.abs(ref_losses))
    print(f"host {i}: max relative loss difference to 1 device: {rel:.3g}")
    assert rel <= 1e-6
    for k, v in ref_params.items():
      np.testing.assert_allclose(b["p" + k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  # Only process 0 wrote logs.
  logs = os.listdir(work / "logs")
  assert len([f for f in logs if f.startswith("events.out.tfevents")]) == 2   # one per run


def _worker(argv):
  pid, port, workdir, n_iters, out = int(argv[0]), argv[1], argv[2], int(argv[3]), argv[4]
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=pid)
  sys.path.insert(0, TESTS)
  from test_train import _params_flat, tiny_config
  from score_sde_jax import train as train_lib
  r = train_lib.train(tiny_config(n_iters), workdir, progress=False, keep_history=True)
  params = jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), r.state.params)
  np.savez(out, losses=np.array([h["loss"] for h in r.history]),
           **{"p" + k: v for k, v in _params_flat(params).items()})
  jax.distributed.shutdown()


if __name__ == "__main__":
  _worker(sys.argv[1:])

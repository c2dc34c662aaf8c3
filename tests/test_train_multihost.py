"""Multi-host training with `jax.distributed` on one machine: 2 processes × 2 CPU devices (gloo
collectives), started as the README documents (SCORE_SDE_DISTRIBUTED=1, JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID → `parallel.initialize_distributed`).  Each host feeds its half of every
global batch; the run is stopped after 8 steps and resumed (every host restores the data-iterator position
from the shared checkpoint) to 12 steps, then resumed by this single process on 1 device (2 hosts → 1) to
16.  Losses and parameters must match a single-process, single-device run of the same config."""
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
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, n_iters, out_prefix):
  port = _free_port()
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["PYTHONPATH"] = os.path.dirname(TESTS) + os.pathsep + env.get("PYTHONPATH", "")
  env.update(SCORE_SDE_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
             SCORE_SDE_HEARTBEAT_TIMEOUT="60")
  procs = [subprocess.Popen([sys.executable, HERE, str(workdir), str(n_iters), f"{out_prefix}_{i}.npz"],
                            env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
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
  # The reference continues to 16 on the same device (bit-identical to an uninterrupted run).
  ref16 = train_lib.train(tiny_config(n_iters=16), str(tmp_path / "ref"), devices=jax.devices()[:1],
                          progress=False, keep_history=True, report=lambda *_: None)
  ref16_losses = np.array([h["loss"] for h in ref16.history])
  ref16_params = _params_flat(ref16.state.params)

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
  # 2 hosts × 2 devices → this process on 1 device: the data order continues where the hosts stopped.
  messages = []
  r = train_lib.train(tiny_config(n_iters=16), str(work), devices=jax.devices()[:1], progress=False,
                      keep_history=True, report=messages.append)
  assert r.resumed_from == 12 and [h["step"] for h in r.history] == [13, 14, 15, 16]
  assert any("written on 4 device(s) / 2 host(s); this run has 1 / 1" in m for m in messages), messages
  losses = np.array([h["loss"] for h in r.history])
  rel = np.max(np.abs(losses - ref16_losses) / np.abs(ref16_losses))
  print(f"2 hosts → 1 device, steps 13-16: max relative loss difference {rel:.3g}")
  assert rel <= 1e-5
  for k, v in _params_flat(r.state.params).items():
    np.testing.assert_allclose(v, ref16_params[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _worker(argv):
  workdir, n_iters, out = argv[0], int(argv[1]), argv[2]
  from score_sde_jax.run import parallel
  assert parallel.initialize_distributed()     # from the environment, as the scripts do
  sys.path.insert(0, TESTS)
  from test_train import _params_flat, tiny_config
  from score_sde_jax import train as train_lib
  r = train_lib.train(tiny_config(n_iters), workdir, progress=False, keep_history=True)
  params = jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), r.state.params)
  np.savez(out, losses=np.array([h["loss"] for h in r.history]),
           **{"p" + k: v for k, v in _params_flat(params).items()})


if __name__ == "__main__":
  _worker(sys.argv[1:])

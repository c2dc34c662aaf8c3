"""Data parallelism with `jax.sharding`, and the one multi-host start-up shared by every script.

A 1-D mesh over the devices, the batch sharded along it, the train state replicated; the compiler inserts
the gradient all-reduce.  Each host feeds its own slice of the global batch and `host_to_global`
assembles the global array without copying data between hosts.

Multi-host runs (TPU pod slices, several GPU hosts, or several processes on one machine):
`scripts/train.py`, `scripts/sample.py` and `scripts/evaluate.py` all call `initialize_distributed`
first, switched on by `--multihost` or SCORE_SDE_DISTRIBUTED=1, and every host runs the same command:

* TPU pod slices, SLURM and Open MPI: no further settings (`jax.distributed.initialize()` detects the
  cluster).
* Anything else: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID
  on every process (JAX itself no longer reads the last two; they are passed explicitly here).
  JAX_LOCAL_DEVICE_IDS optionally restricts the devices of a process.
* Timeouts (seconds): SCORE_SDE_INIT_TIMEOUT (default 300: how long to wait for every process to join)
  and SCORE_SDE_HEARTBEAT_TIMEOUT (default 100).  A process that stops (killed, crashed, lost its
  network) is noticed by the others within about the heartbeat timeout, or at once when they wait for
  it in a collective: they print one `ERROR: multi-host run aborted ...` line naming it and exit with
  status `EXIT_PEER_LOST` (4) instead of waiting.  A process that fails with an error publishes it and
  exits at once (`run_main`), so the others stop with its reason.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import traceback
from typing import Callable, Iterable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
DISTRIBUTED_ENV = "SCORE_SDE_DISTRIBUTED"
COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                                                      "JAX_PROCESS_ID")
INIT_TIMEOUT_ENV, HEARTBEAT_TIMEOUT_ENV = "SCORE_SDE_INIT_TIMEOUT", "SCORE_SDE_HEARTBEAT_TIMEOUT"
DEFAULT_INIT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT = 300, 100
EXIT_PEER_LOST = 4        # exit status of a process that stopped because another one did


class DistributedError(RuntimeError):
  """The multi-host start-up cannot work as configured (the message says what to set)."""


class _State:
  initialized = False
  process_id = 0
  num_processes = 1
  watchdog: Optional["_Watchdog"] = None


_STATE = _State()


def distributed_requested(enable: Optional[bool] = None) -> bool:
  """`enable`, or (None) whether SCORE_SDE_DISTRIBUTED is 1/true/yes."""
  if enable is None:
    return os.environ.get(DISTRIBUTED_ENV, "").strip().lower() in ("1", "true", "yes")
  return bool(enable)


def _env_int(name: str, default=None):
  raw = os.environ.get(name, "").strip()
  if not raw:
    return default
  try:
    return int(raw)
  except ValueError:
    raise DistributedError(f"{name}={raw!r} is not an integer.") from None


def distributed_args() -> dict:
  """The arguments of `jax.distributed.initialize` from the environment: the coordinator, process count
  and process id when set (all three, or none of the last two: cluster auto-detection), and the timeouts."""
  address = os.environ.get(COORDINATOR_ENV, "").strip() or None
  num, pid = _env_int(NUM_PROCESSES_ENV), _env_int(PROCESS_ID_ENV)
  init_timeout = _env_int(INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT)
  heartbeat = _env_int(HEARTBEAT_TIMEOUT_ENV, DEFAULT_HEARTBEAT_TIMEOUT)
  if init_timeout < 1 or heartbeat < 1:
    raise DistributedError(f"{INIT_TIMEOUT_ENV} and {HEARTBEAT_TIMEOUT_ENV} must be positive (seconds).")
  # JAX's own health check is the backstop of the watchdog below (which notices a lost process first).
  kwargs = dict(initialization_timeout=init_timeout, heartbeat_timeout_seconds=2 * heartbeat)
  if num is not None or pid is not None:
    missing = [n for n, v in ((COORDINATOR_ENV, address), (NUM_PROCESSES_ENV, num), (PROCESS_ID_ENV, pid))
               if v is None]
    if missing:
      raise DistributedError(f"multi-host run: {', '.join(missing)} not set. Set all of {COORDINATOR_ENV} "
                             f"(host:port of process 0), {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} on every "
                             f"process, or none of them on a TPU pod / SLURM / Open MPI (auto-detected).")
    if num < 1 or not 0 <= pid < num:
      raise DistributedError(f"multi-host run: {PROCESS_ID_ENV}={pid} must be in [0, "
                             f"{NUM_PROCESSES_ENV}={num}).")
    kwargs.update(coordinator_address=address, num_processes=num, process_id=pid)
  return kwargs


def initialize_distributed(enable: Optional[bool] = None) -> bool:
  """The multi-host start-up of every script (see the module docstring): when `enable` (None: the
  SCORE_SDE_DISTRIBUTED variable), calls `jax.distributed.initialize` with the arguments of
  `distributed_args()` and starts the watchdog.  Must run before any other JAX call; idempotent.
  Returns whether this is a distributed run."""
  if not distributed_requested(enable):
    return False
  if _STATE.initialized:
    return True
  kwargs = distributed_args()
  try:   # CPU processes need a collectives implementation (the default on current JAX)
    if str(jax.config.jax_cpu_collectives_implementation or "none").lower() == "none":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:  # pragma: no cover
    pass
  t0 = time.time()
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # noqa: BLE001
    shown = {k: v for k, v in kwargs.items() if k in ("coordinator_address", "num_processes", "process_id")}
    msg = (str(e).splitlines()[0] if str(e) else type(e).__name__).rstrip(".")
    hint = (f"Set {COORDINATOR_ENV}, {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} on every process (or run on a "
            f"TPU pod / under SLURM / Open MPI, where they are detected)"
            if "coordinator_address" not in kwargs else
            f"Every process must run the same command with the same {COORDINATOR_ENV} and "
            f"{NUM_PROCESSES_ENV} and a distinct {PROCESS_ID_ENV}, and process 0 must be reachable at "
            f"{kwargs['coordinator_address']} (waited {time.time() - t0:.0f}s; {INIT_TIMEOUT_ENV}="
            f"{kwargs['initialization_timeout']})")
    raise DistributedError(f"multi-host start-up failed: jax.distributed.initialize({shown or ''}) "
                           f"raised {type(e).__name__}: {msg}. {hint}.") from None
  _STATE.initialized = True
  _STATE.process_id, _STATE.num_processes = jax.process_index(), jax.process_count()
  if _STATE.num_processes > 1:
    _STATE.watchdog = _Watchdog(_STATE.process_id, _STATE.num_processes,
                                float(_env_int(HEARTBEAT_TIMEOUT_ENV, DEFAULT_HEARTBEAT_TIMEOUT)),
                                kwargs.get("coordinator_address") or os.environ.get(COORDINATOR_ENV, ""))
    _STATE.watchdog.start()
    atexit.register(_on_exit)
  return True


def maybe_initialize_distributed(enable: Optional[bool] = None) -> bool:
  """Alias of `initialize_distributed` (the older name)."""
  return initialize_distributed(enable)


def is_multiprocess() -> bool:
  return _STATE.initialized and _STATE.num_processes > 1


# ---------------------------------------------------------------------------------------------------
# Not hanging when a process dies
# ---------------------------------------------------------------------------------------------------
_WD_PREFIX = "score_sde_watchdog/"


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  return jax_distributed.global_state.client


def _abort(message: str, code: int) -> None:
  """Prints one ERROR line and ends this process at once (no waiting at JAX's shutdown barrier)."""
  try:
    sys.stdout.flush()
  except Exception:  # noqa: BLE001
    pass
  try:
    print(f"ERROR: multi-host run aborted on process {_STATE.process_id} of {_STATE.num_processes}: "
          f"{message}", file=sys.stderr, flush=True)
  finally:
    os._exit(code)


class _Watchdog:
  """A heartbeat through the coordination service's key-value store: every process bumps its counter
  every `timeout / 10` s (from a thread, so a busy main thread still beats) and checks the others'.  A
  process whose counter has not moved for `timeout` s, a process that published a failure, or a lost
  coordinator ends this process with one clear line (`EXIT_PEER_LOST`)."""

  def __init__(self, process_id: int, num_processes: int, timeout: float, address: str):
    self.pid, self.n, self.timeout, self.address = process_id, num_processes, timeout, address
    self.interval = max(0.2, min(2.0, timeout / 10.0))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="score_sde_watchdog", daemon=True)

  def start(self) -> None:
    self._thread.start()

  def stop(self) -> None:
    self._stop.set()

  def publish(self, kind: str, value: str) -> None:
    try:
      _client().key_value_set(f"{_WD_PREFIX}{kind}/{self.pid}", value, allow_overwrite=True)
    except Exception:  # noqa: BLE001  (best effort: the coordinator may be gone)
      pass

  def _run(self) -> None:
    client = _client()
    count = 0
    last_value, last_seen = {}, {p: time.monotonic() for p in range(self.n) if p != self.pid}
    errors_since = None
    while not self._stop.wait(self.interval):
      count += 1
      try:
        client.key_value_set(f"{_WD_PREFIX}beat/{self.pid}", str(count), allow_overwrite=True)
        entries = client.key_value_dir_get(_WD_PREFIX)
        errors_since = None
      except Exception as e:  # noqa: BLE001
        if self._stop.is_set():
          return
        now = time.monotonic()
        errors_since = errors_since or now
        if now - errors_since >= min(self.timeout, 10.0):
          _abort(f"lost the connection to the coordinator (process 0 at {self.address}): "
                 f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}. Process 0 has probably "
                 f"stopped; exiting instead of waiting for it.", EXIT_PEER_LOST)
        continue
      if self._stop.is_set():
        return
      now = time.monotonic()
      table = {}
      for key, value in entries:
        parts = key.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-1].isdigit():
          table[(parts[-2], int(parts[-1]))] = value
      for p in list(last_seen):
        if ("failed", p) in table:
          _abort(f"process {p} failed ({table[('failed', p)]}); exiting instead of waiting for it.",
                 EXIT_PEER_LOST)
        if ("done", p) in table:
          del last_seen[p]
          continue
        beat = table.get(("beat", p))
        if beat != last_value.get(p):
          last_value[p], last_seen[p] = beat, now
        elif now - last_seen[p] > self.timeout:
          _abort(f"process {p} sent no heartbeat for {now - last_seen[p]:.0f}s (it was killed, crashed or "
                 f"lost its network); exiting instead of waiting for it ({HEARTBEAT_TIMEOUT_ENV}="
                 f"{self.timeout:.0f}).", EXIT_PEER_LOST)


def _on_exit() -> None:
  wd = _STATE.watchdog
  if wd is not None:
    wd.publish("done", "1")
    wd.stop()


def fail_fast(message: str, code: int = 1) -> None:
  """Ends this process of a multi-host run at once with `message`, telling the others (which then stop
  too instead of waiting for it).  Single-process: raises SystemExit(code)."""
  if not is_multiprocess():
    print(f"ERROR: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
  if _STATE.watchdog is not None:
    _STATE.watchdog.publish("failed", f"process {_STATE.process_id}: {message}"[:500])
    _STATE.watchdog.stop()
  _abort(message, code)


# Errors of a collective or barrier whose other side went away.
_PEER_HINTS = ("gloo", "connection closed by peer", "connection reset by peer", "heartbeat",
               "coordination service", "deadline_exceeded")


def run_main(fn: Callable[[], None], clean_exit_codes: Iterable[int] = ()) -> None:
  """Runs a script's main function.  In a multi-host run, a process that fails (an exception, or an exit
  status other than 0 and `clean_exit_codes`) prints its error, tells the other processes and exits at
  once: none of them waits at a barrier for a process that will never come."""
  clean = set(clean_exit_codes) | {0, None}
  try:
    fn()
  except SystemExit as e:
    if not is_multiprocess() or e.code in clean:
      raise
    code = e.code if isinstance(e.code, int) else 1
    fail_fast(f"exit status {code}" + (f" ({e.code})" if not isinstance(e.code, int) else ""), code)
  except BaseException as e:  # noqa: BLE001
    if not is_multiprocess():
      raise
    traceback.print_exc()
    text = str(e).splitlines()[0][:300] if str(e) else ""
    lost = any(h in str(e).lower() for h in _PEER_HINTS)
    fail_fast(f"{type(e).__name__}: {text}" + ("; another process has probably stopped or lost its "
                                                "connection" if lost else ""),
              EXIT_PEER_LOST if lost else 1)


# ---------------------------------------------------------------------------------------------------
# Mesh, shardings, host <-> global arrays
# ---------------------------------------------------------------------------------------------------
def make_mesh(devices: Optional[Sequence] = None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: every device of every host)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Sharding of a batch whose example axis comes after `leading_axes` unsharded axes (1 for the
  stacked batches of `n_jitted_steps`)."""
  return NamedSharding(mesh, P(*([None] * leading_axes), AXIS))


def check_divisible(name: str, batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if int(batch_size) % n:
    raise ValueError(f"{name}={batch_size} does not divide by the number of devices ({n}); choose a "
                     f"multiple of {n} (e.g. {max(n, int(batch_size) // n * n)}).")


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
  """This host's share of a global batch (the mesh spans all hosts equally)."""
  procs = {d.process_index for d in mesh.devices.flat}
  return int(global_batch) // len(procs)


def host_to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global jax.Array from this host's slice `x` (single host: the whole batch)."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  return jax.make_array_from_process_local_data(sharding, x)


def replicate(tree, mesh: Mesh):
  """Places every leaf of `tree` on all devices of `mesh` (replicated)."""
  sharding = replicated(mesh)
  return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), tree)


def to_host(x) -> np.ndarray:
  """A jax array as a numpy array on this host: directly when this host holds all of it, from a local
  replica when it is replicated across hosts, else gathered from all hosts (every host must call)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def tree_to_host(tree):
  return jax.tree_util.tree_map(to_host, tree)

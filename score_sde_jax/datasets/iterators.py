"""The training and evaluation iterators over a source of examples (`images.py` builds the sources).

Determinism and resumption. The training stream of a run is a function of the seed only: global position
`j` (0, 1, 2, ... over all hosts) holds example `perm_e[j mod N]` of epoch `e = j // N`, with `perm_e` a
permutation drawn from `(seed, e)` (argsort of SplitMix64 keys); the random flip and the dequantisation
noise of position `j` are counter-based random numbers (SplitMix64) of `(seed, j)`. Global batch `k` is
positions `[kB, (k+1)B)` and host `p` of `P` takes positions `[kB + pB/P, kB + (p+1)B/P)`. So the iterator
state is just the next step (`get_state()` -> small JSON dict), a resumed run sees exactly the batches it
would have seen, and the hosts' batches put side by side are the single-host global batch (also after
changing the host count). Only integer numpy arithmetic is involved, so the stream does not depend on the
numpy version either.  Written here rather than with Grain's `IndexSampler`: its shuffle is per shard
(host), so the global batch would depend on the host count, and its per-record seeds are not a function of
the global position.  Grain runs the per-batch work in threads and prefetches (`_grain_iter`).

Evaluation visits each example of a split exactly once, in record order, with the same host layout;
every host runs `ceil(N / B)` batches, the positions past the end are zero-padded with `mask=False`.
"""
from __future__ import annotations

import math
import os
import threading
from typing import Callable

import numpy as np


class DataError(RuntimeError):
  """Missing, unprepared or unreadable data."""


# ---------------------------------------------------------------------------------------------------------
# Index arithmetic shared by the train and eval iterators


def _host_layout(global_batch: int, process_index: int | None, process_count: int | None):
  import jax  # pylint: disable=import-outside-toplevel
  if process_count is None:
    process_count = jax.process_count()
  if process_index is None:
    process_index = jax.process_index() if process_count == jax.process_count() else 0
  global_batch, process_count, process_index = int(global_batch), int(process_count), int(process_index)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if global_batch < 1:
    raise ValueError(f"batch size must be positive, got {global_batch}")
  if global_batch % process_count:
    raise ValueError(f"The global batch size {global_batch} is not divisible by the number of processes "
                     f"(hosts) {process_count}; choose a multiple of {process_count}.")
  return global_batch, global_batch // process_count, process_index, process_count


def _u64(x: int) -> int:
  return int(x) % (1 << 64)


class _Permutations:
  """Per-epoch permutations of range(n) drawn from (seed, epoch); keeps the last few."""

  def __init__(self, n: int, seed: int):
    self.n, self.seed = n, _u64(seed)
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __call__(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._perms.get(epoch)
      if perm is None:
        # argsort of SplitMix64 keys: the same permutation with any numpy version (no Generator
        # stream-compatibility caveat), so a run resumes identically after an upgrade.
        keys = _uniform_bits(self.seed ^ 0x5EED5EED5EED5EED, np.array([epoch], np.int64), self.n)[0]
        perm = np.argsort(keys, kind="stable")
        self._perms[epoch] = perm
        for e in sorted(self._perms)[:-3]:
          del self._perms[e]
      return perm

  def indices(self, positions: np.ndarray) -> np.ndarray:
    epochs, offsets = np.divmod(positions, self.n)
    out = np.empty_like(positions)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self(int(e))[offsets[sel]]
    return out


_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 output function (a bijective 64-bit mixer), vectorised; wraps modulo 2**64."""
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _uniform_bits(seed: int, positions: np.ndarray, n: int) -> np.ndarray:
  """uint64 [len(positions), n]: element i of position j is output number j*(n+1)+i+1 of the SplitMix64
  generator seeded with `seed` (counter-based, so any host can compute any position's numbers)."""
  base = _splitmix64(np.array([_u64(seed)], dtype=np.uint64))
  with np.errstate(over="ignore"):
    counters = (positions.astype(np.uint64)[:, None] * np.uint64(n + 1) + np.arange(1, n + 1, dtype=np.uint64))
    return _splitmix64(base + counters * _GAMMA)


def _uniforms(seed: int, positions: np.ndarray, n: int) -> np.ndarray:
  """float32 [len(positions), n] in [0, 1) from the top 24 bits of `_uniform_bits`."""
  return (_uniform_bits(seed, positions, n) >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


def _augment(images_u8: np.ndarray, positions: np.ndarray, seed: int, flip: bool, dequantize: bool):
  """Float32 images in [0, 1] with the per-position random flip and dequantisation noise."""
  x = images_u8
  if flip:
    # Stream 1 of the seed: one number per position; flip the width axis if it is < 1/2.
    do_flip = _uniforms(_u64(seed) ^ 0x1F11F11F11F11F11, positions, 1)[:, 0] < 0.5
    x = np.where(do_flip[:, None, None, None], x[:, :, ::-1], x)
  if dequantize:
    # Stream 2: H*W*C numbers per position. u is on a 2**-16 grid so that x + u (x <= 255) and the
    # division by 256 are exact in float32: the result lies in [x/256, (x+1)/256), strictly below 1.
    # (With a 24-bit u, x + u rounds up to x + 1 in float32 when u is within 2**-17 of 1: the value
    # leaves its bin, and x = 255 gives exactly 1.0.)
    bits = _uniform_bits(_u64(seed) ^ 0x2DE9A2DE9A2DE9A2, positions, int(np.prod(x.shape[1:])))
    noise = (bits >> np.uint64(48)).astype(np.float32) * np.float32(2.0**-16)
    return (x.astype(np.float32) + noise.reshape(x.shape)) / np.float32(256.0)
  return x.astype(np.float32) / np.float32(255.0)


class _BatchSequence:
  """Random access `seq[step]` -> host batch; Grain maps and prefetches over it."""

  def __init__(self, fn: Callable[[int], dict], length: int):
    self._fn, self._len = fn, length

  def __len__(self):
    return self._len

  def __getitem__(self, step):
    return self._fn(int(step))


def _grain_iter(seq: _BatchSequence, num_threads: int, prefetch: int):
  import grain  # pylint: disable=import-outside-toplevel
  ds = grain.MapDataset.source(seq)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))


def _default_threads() -> int:
  return max(1, min(8, (os.cpu_count() or 2)))


# ---------------------------------------------------------------------------------------------------------
# Training iterator


_INFINITE = 1 << 62


class TrainIterator:
  """Infinite, deterministic, resumable iterator of host batches (see the module docstring)."""

  def __init__(self, source, *, dataset: str, seed: int, global_batch: int, host_batch: int,
               process_index: int, process_count: int, random_flip: bool, dequantize: bool,
               num_threads: int | None = None, prefetch: int = 4):
    self._source = source
    self.dataset = dataset
    self.seed = int(seed)
    self.global_batch_size, self.batch_size = global_batch, host_batch
    self.process_index, self.process_count = process_index, process_count
    self.num_examples = source.num_examples
    if self.num_examples < 1:
      raise DataError(f"{dataset}: the training split is empty")
    self._flip, self._dequantize = random_flip, dequantize
    self._perms = _Permutations(self.num_examples, self.seed)
    self._threads = num_threads or _default_threads()
    self._prefetch = prefetch
    self._seq = _BatchSequence(self.batch_at, _INFINITE)
    self._step = 0
    self._it = None

  @property
  def steps_per_epoch(self) -> float:
    return self.num_examples / self.global_batch_size

  def batch_at(self, step: int) -> dict:
    """The host batch of global step `step` (pure function of seed, step and host layout)."""
    start = step * self.global_batch_size + self.process_index * self.batch_size
    positions = np.arange(start, start + self.batch_size, dtype=np.int64)
    indices = self._perms.indices(positions)
    data, labels = self._source.get(indices)
    if self._source.is_toy:
      return {"image": data} if labels is None else {"image": data, "label": labels}
    images = _augment(data, positions, self.seed, self._flip, self._dequantize)
    return {"image": images, "label": labels}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._it = _grain_iter(self._seq, self._threads, self._prefetch)
      if self._step:
        self._it.set_state({"next_index": self._step})
    batch = next(self._it)
    self._step += 1
    return batch

  def get_state(self) -> dict:
    """JSON-serialisable state; `set_state` on a fresh iterator of the same config resumes after it."""
    return {"step": self._step, "seed": self.seed, "dataset": self.dataset,
            "global_batch_size": self.global_batch_size, "num_examples": self.num_examples}

  def set_state(self, state: dict) -> None:
    for k in ("seed", "dataset", "global_batch_size", "num_examples"):
      if k in state and state[k] != getattr(self, k):
        raise ValueError(f"Iterator state was saved with {k}={state[k]!r} but this iterator has "
                         f"{k}={getattr(self, k)!r}; the batches would differ.")
    self._step = int(state["step"])
    self._it = None  # rebuilt lazily at the new position


# ---------------------------------------------------------------------------------------------------------
# Evaluation iterator


class EvalIterator:
  """Finite iterator visiting every example of a split exactly once (over all hosts), with a mask."""

  def __init__(self, source, *, global_batch: int, host_batch: int, process_index: int, process_count: int,
               num_threads: int | None = None, prefetch: int = 4):
    self._source = source
    self.num_examples = source.num_examples
    self.global_batch_size, self.batch_size = global_batch, host_batch
    self.process_index, self.process_count = process_index, process_count
    self.num_batches = math.ceil(self.num_examples / global_batch)
    self._seq = _BatchSequence(self.batch_at, self.num_batches)
    self._threads = num_threads or _default_threads()
    self._prefetch = prefetch
    self._it = None

  @property
  def num_host_examples(self) -> int:
    """Examples of this host (the sum of its masks)."""
    return sum(int(self._host_positions(k)[1].sum()) for k in range(self.num_batches))

  def _host_positions(self, step: int):
    start = step * self.global_batch_size + self.process_index * self.batch_size
    positions = np.arange(start, start + self.batch_size, dtype=np.int64)
    return positions, positions < self.num_examples

  def batch_at(self, step: int) -> dict:
    positions, mask = self._host_positions(step)
    data, labels = self._source.get(positions[mask])
    n_valid = int(mask.sum())
    if self._source.is_toy:
      out = np.zeros((self.batch_size,) + tuple(self._source.shape), np.float32)
      out[:n_valid] = data
      if labels is None:
        return {"image": out, "mask": mask}
      label = np.zeros((self.batch_size,), np.int32)
      label[:n_valid] = labels
      return {"image": out, "label": label, "mask": mask}
    image_int = np.zeros((self.batch_size,) + tuple(self._source.shape), np.uint8)
    image_int[:n_valid] = data
    label = np.zeros((self.batch_size,), np.int32)
    label[:n_valid] = labels
    return {"image": image_int.astype(np.float32) / 255.0, "image_int": image_int, "label": label,
            "mask": mask}

  def __len__(self):
    return self.num_batches

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._it = _grain_iter(self._seq, self._threads, self._prefetch)
    return next(self._it)

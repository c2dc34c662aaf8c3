"""The training and evaluation iterators over a source of examples (`images.py` builds the sources).

Training order (Grain's sampler).  Global position `j` (0, 1, 2, ... over all hosts) is entry `j` of
`grain.samplers.IndexSampler(N, NoSharding(), shuffle=True, seed=s)`, one sampler over the whole split,
the same on every host: it holds record `sampler[j].record_key` (epoch `e = j // N` is Grain's
`index_shuffle` permutation seeded `s + e`), and that record's random flip and dequantisation noise are
drawn from its generator `sampler[j].rng` (Philox keyed `s + j`) by `Augment`, a Grain `RandomMap`;
`s = data_seed(config.seed)`.  Global batch `k` is positions `[kB, (k+1)B)`, and host `p` of `P` takes
`[kB + pB/P, kB + (p+1)B/P)`.  (Grain's own `shard_options` would shuffle within each host's shard, so
the global batch would depend on the host count.)  Hence:
  - the stream is a function of the seed;
  - the iterator state is the next global step (`get_state()` -> small JSON dict), and a resumed run
    sees exactly the batches it would have seen;
  - the hosts' batches put side by side are the single-host global batch, also after changing the host
    count.
`GlobalOrder` gives the sampler's keys and generators for a whole batch at once: `sampler[j]` costs 24 µs
a record in Python (a Philox generator and three dataset layers), which made MNIST batches of 128 nine
times slower to produce (`benchmarks/data.py`); `GlobalOrder` computes an epoch's keys once with Grain's
`index_shuffle` and builds a generator only where a record is augmented.  `test_order_is_the_samplers`
checks keys and generators against `IndexSampler` itself, so a Grain change that moves them fails there.
Grain runs the per-batch work in threads and prefetches (`_grain_iter`).

Evaluation visits each example of a split exactly once, in record order, with the same host layout;
every host runs `ceil(N / B)` batches, the positions past the end are zero-padded with `mask=False`.
"""
from __future__ import annotations

import math
import os
import threading
from typing import Callable

import grain
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


# The order of the training stream, named in the iterator state: a checkpoint whose data position was
# counted in another order (the SplitMix64 permutation of earlier versions, state without this field)
# resumes at its step with a note saying the rest of its epoch is drawn afresh (`TrainIterator.set_state`).
ORDER = "grain.IndexSampler"
EARLIER_ORDER = "SplitMix64 permutation (score_sde_jax before Grain's sampler)"


def data_seed(seed: int) -> int:
  """The 32-bit seed of Grain's sampler for config seed `seed` (any int).

  Hashed (numpy's SeedSequence, a fixed algorithm) rather than used as is: Grain seeds epoch `e` with
  `s + e` and record `j` with `s + j`, so config seeds 0 and 1 would otherwise share their epochs and
  record generators shifted by one."""
  return int(np.random.SeedSequence(int(seed) % (1 << 64)).generate_state(1, np.uint32)[0])


class GlobalOrder:
  """The order of `grain.samplers.IndexSampler(n, shuffle=True, seed=data_seed(seed))` (`.sampler`), a batch
  of positions at a time: `keys(j)` are the records `sampler[j].record_key`, `rng(j)` is `sampler[j].rng`.

  Epoch `e`'s keys are `grain.experimental.index_shuffle(k, n - 1, s + e, rounds=4)`, k < n, computed once
  (2 µs a key); the generator of position `j` is `Generator(Philox(key=s + j))`.  Keeps the last three
  epochs."""

  def __init__(self, n: int, seed: int):
    self.n, self.seed = n, data_seed(seed)
    self.sampler = grain.samplers.IndexSampler(n, grain.sharding.NoSharding(), shuffle=True, num_epochs=None,
                                               seed=self.seed)
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def epoch(self, e: int) -> np.ndarray:
    with self._lock:
      perm = self._perms.get(e)
      if perm is None:
        s, last = (self.seed + e) % (1 << 32), self.n - 1
        perm = np.fromiter((grain.experimental.index_shuffle(k, last, s, 4) for k in range(self.n)),
                           dtype=np.int64, count=self.n)
        self._perms[e] = perm
        for old in sorted(self._perms)[:-3]:
          del self._perms[old]
      return perm

  def keys(self, positions: np.ndarray) -> np.ndarray:
    epochs, offsets = np.divmod(positions, self.n)
    out = np.empty_like(positions)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self.epoch(int(e))[offsets[sel]]
    return out

  def rng(self, position: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(key=self.seed + int(position)))


class Augment(grain.transforms.RandomMap):
  """uint8 image [H, W, C] -> float32 in [0, 1], flipped along the width with probability 1/2
  (`random_flip`) and dequantised as (x + u) / 256, u ~ U[0, 1) per pixel (`dequantize`), else x / 255.

  The draws are raw 64-bit outputs of the record's bit generator (`rng.bit_generator.random_raw`, fixed by
  the Philox algorithm, unlike `Generator` methods, which numpy may change between versions), drawn in one
  call: the first for the flip (drawn even when unused, so the noise does not depend on the flip setting),
  then H·W·C for the noise.
  u takes the top 16 bits, a 2**-16 grid, so that x + u (x <= 255) and the division by 256 are exact in
  float32: the value lies in [x/256, (x+1)/256), strictly below 1 (a 24-bit u rounds x + u up to x + 1
  when u is within 2**-17 of 1, and x = 255 then gives 1.0)."""

  def __init__(self, random_flip: bool, dequantize: bool):
    self.random_flip, self.dequantize = bool(random_flip), bool(dequantize)

  def random_map(self, element: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return self.map_batch(element[None], [rng])[0]

  def map_batch(self, images: np.ndarray, rngs) -> np.ndarray:
    """`random_map` of each image [N, H, W, C] with its generator, the arithmetic done once for the batch
    (the per-record Python work is only the draws).  `rngs` (an iterable) is not read when neither flip
    nor dequantisation is on: nothing is drawn, and no generator need be built."""
    if not (self.random_flip or self.dequantize):
      return images.astype(np.float32) / np.float32(255.0)
    size = int(np.prod(images.shape[1:]))
    draws = [rng.bit_generator.random_raw(1 + size * self.dequantize) for rng in rngs]
    x = images
    if self.random_flip:
      flip = np.array([d[0] >> np.uint64(63) for d in draws], bool)
      x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    if not self.dequantize:
      return x.astype(np.float32) / np.float32(255.0)
    noise = (np.stack([d[1:] for d in draws]) >> np.uint64(48)).astype(np.float32) * np.float32(2.0**-16)
    return (x.astype(np.float32) + noise.reshape(x.shape)) / np.float32(256.0)


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
    self._order = GlobalOrder(self.num_examples, self.seed)
    self._augment = Augment(random_flip, dequantize)
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
    data, labels = self._source.get(self._order.keys(positions))
    if self._source.is_toy:
      return {"image": data} if labels is None else {"image": data, "label": labels}
    images = self._augment.map_batch(data, (self._order.rng(j) for j in positions))
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
            "global_batch_size": self.global_batch_size, "num_examples": self.num_examples, "order": ORDER}

  def set_state(self, state: dict) -> str | None:
    """Continues after the state's step.  Returns None, or a note to show the user when the state counted
    its steps in another order (an earlier version's): the run goes on at the same step in this order,
    so the rest of the current epoch is drawn afresh (some examples repeat, some are skipped, once)."""
    for k in ("seed", "dataset", "global_batch_size", "num_examples"):
      if k in state and state[k] != getattr(self, k):
        raise ValueError(f"Iterator state was saved with {k}={state[k]!r} but this iterator has "
                         f"{k}={getattr(self, k)!r}; the batches would differ.")
    order = state["order"] if "order" in state else EARLIER_ORDER
    self._step = int(state["step"])
    self._it = None  # rebuilt lazily at the new position
    if order == ORDER:
      return None
    return (f"The data position was saved in the order of the {order}; training continues at global batch "
            f"{self._step} in the order of {ORDER}, so the rest of this epoch is drawn afresh.")


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

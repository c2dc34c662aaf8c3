#!/usr/bin/env python
"""Training-data throughput: host batches/s and examples/s of `datasets.get_train_iterator` (Grain's
sampler, the per-record flip and dequantisation, Grain's reading threads and prefetch), with nothing
else running, for a toy config and for MNIST through the project's tfds pipeline.

    python benchmarks/data.py                        # toy ring8 (batch 512) and MNIST (batch 128)
    python benchmarks/data.py --batches 500 --threads 4

MNIST is read from `--mnist_data_dir` (a tfds data dir; built there from `../shared/data/mnist` on
first use).  The first `--warmup` batches (opening the source, decoding into the in-memory cache, the
first epoch's keys) are not timed.  Prints one table.
"""
import os
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("batches", 300, "Timed batches per row.")
flags.DEFINE_integer("warmup", 20, "Untimed batches first.")
flags.DEFINE_integer("threads", 0, "Grain reading threads (0: the pipeline's default).")
flags.DEFINE_string("mnist_data_dir", None, "tfds data dir holding (or to hold) MNIST; default: a temporary "
                    "directory.")


def _rate(it, warmup: int, batches: int) -> float:
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches / (time.perf_counter() - start)


def main(argv):
  del argv
  from score_sde_jax import config_defaults, datasets

  rows = []
  threads = FLAGS.threads or None
  toy = config_defaults.toy_config("vesde", "ring8")
  it = datasets.get_train_iterator(toy, process_count=1, num_threads=threads)
  rows.append(("toy ring8", toy.training.batch_size, "-", _rate(it, FLAGS.warmup, FLAGS.batches)))

  data_dir = FLAGS.mnist_data_dir or tempfile.mkdtemp(prefix="bench_data_")
  for flip, deq in ((False, False), (True, True)):
    config = config_defaults.base_config()
    config.data.dataset, config.data.image_size, config.data.num_channels = "MNIST", 28, 1
    config.data.tfds_data_dir = data_dir
    config.data.random_flip, config.data.uniform_dequantization = flip, deq
    config.training.batch_size = 128
    # warm-up covers one full pass over the 60k images, so every row reads from the decoded cache
    it = datasets.get_train_iterator(config, process_count=1, num_threads=threads)
    rate = _rate(it, max(FLAGS.warmup, 60000 // 128 + 1), FLAGS.batches)
    rows.append(("MNIST 28x28", 128, f"flip={flip} dequant={deq}", rate))

  print(f"\n{'data':<14}{'batch':>7}  {'augmentation':<26}{'batches/s':>11}{'examples/s':>13}")
  for name, bs, aug, rate in rows:
    print(f"{name:<14}{bs:>7}  {aug:<26}{rate:>11.1f}{rate * bs:>13.0f}")
  print(f"\n(cpu_count={os.cpu_count()}; MNIST data dir: {data_dir})")


if __name__ == "__main__":
  app.run(main)

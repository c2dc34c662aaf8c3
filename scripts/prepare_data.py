#!/usr/bin/env python
"""Prepares a dataset as tfds `array_record` files in a tfds data dir, for the TF-free training pipeline.

  # MNIST from local IDX files (default $SCORE_SDE_MNIST_DIR or ../shared/data/mnist); no TensorFlow needed:
  python scripts/prepare_data.py --dataset MNIST [--mnist_dir DIR] [--data_dir ~/tensorflow_datasets]
  # MNIST without local files: download the four files from tfds' mirror (network), same verification:
  python scripts/prepare_data.py --dataset MNIST --download
  # CIFAR-10 from the official archive you have (cifar-10-python.tar.gz or cifar-10-binary.tar.gz from
  # https://www.cs.toronto.edu/~kriz/cifar.html); the same tfds `cifar10` dataset, no TensorFlow needed:
  python scripts/prepare_data.py --dataset CIFAR10 --source cifar-10-python.tar.gz [--no-verify]
  # Catalogue datasets (standard tfds download and preparation; tfds needs TensorFlow for this step only):
  python scripts/prepare_data.py --dataset CIFAR10 | SVHN | CELEBA | CelebAHQ --image_size 256 | LSUN --category bedroom
  # FFHQ from a folder of the official PNG images (no TensorFlow needed):
  python scripts/prepare_data.py --dataset FFHQ --image_size 256 --manual_dir DIR

The result goes to `<data_dir>/<tfds name>/<version>/` (default data dir: $TFDS_DATA_DIR or
~/tensorflow_datasets); set `config.data.tfds_data_dir` to the same directory when training elsewhere.
Nothing is copied into the repository. Preparing an already prepared dataset is a no-op. Bad input (a
missing, truncated or corrupt source file) prints one line `ERROR: <what and how to fix it>` on stderr
and exits with status 2; no partly written dataset is left in the data dir.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from score_sde_jax.config_defaults import base_config  # noqa: E402
from score_sde_jax.datasets import builders, cifar10, images  # noqa: E402
from score_sde_jax import cli  # noqa: E402


def _error(message: str) -> int:
  """Prints `ERROR: message` (one line) on stderr; returns the exit status for bad input, 2."""
  cli.print_error(message)
  return cli.EXIT_USER_ERROR


def main(argv=None) -> int:
  parser = cli.argument_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", required=True, choices=images.IMAGE_DATASETS)
  parser.add_argument("--data_dir", default="", help="tfds data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--mnist_dir", default=None, help="MNIST: directory of the IDX .gz files (+ SHA256SUMS)")
  parser.add_argument("--download", action="store_true", help="MNIST: fetch the files if no local copy is found")
  parser.add_argument("--image_size", type=int, default=None, help="FFHQ/CelebAHQ: resolution to prepare")
  parser.add_argument("--category", default="bedroom", help="LSUN category")
  parser.add_argument("--source", default=None,
                      help="CIFAR10: the official cifar-10-python.tar.gz or cifar-10-binary.tar.gz to build from "
                           "(instead of tfds' download)")
  parser.add_argument("--no-verify", "--no_verify", dest="no_verify", action="store_true",
                      help="CIFAR10 --source: skip the MD5 check (for a repacked archive; the contents are "
                           "still checked)")
  parser.add_argument("--manual_dir", default=None, help="FFHQ/CelebAHQ: directory of the manual download")
  args = parser.parse_args(argv)

  if args.source is not None and args.dataset != "CIFAR10":
    return _error(f"--source is for --dataset CIFAR10 only (MNIST takes --mnist_dir, FFHQ/CelebAHQ "
                  f"--manual_dir); drop it for --dataset {args.dataset}.")
  if args.no_verify and args.source is None:
    return _error("--no-verify applies only to a CIFAR10 archive given with --source.")
  data_dir = builders.default_data_dir(args.data_dir or None)
  start = time.time()
  if args.dataset == "MNIST":
    try:
      path = builders.prepare_mnist(args.mnist_dir, data_dir, download=args.download)
    except builders.MnistDataError as e:
      return _error(str(e))
    print(f"MNIST ready in {path} ({time.time() - start:.1f} s)")
    return 0
  if args.source is not None:
    try:
      path = cifar10.prepare_cifar10(args.source, data_dir, verify_md5=not args.no_verify)
    except cifar10.Cifar10DataError as e:
      return _error(str(e))
    except OSError as e:
      return _error(f"writing CIFAR-10 into the data dir {data_dir!r} failed ({e}); nothing was kept there. "
                    f"Free space or fix permissions, or choose another --data_dir.")
    print(f"CIFAR10 ready in {path} ({time.time() - start:.1f} s)")
    return 0

  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  config = base_config()
  config.data.dataset = args.dataset
  config.data.category = args.category
  if args.image_size:
    config.data.image_size = args.image_size
  elif args.dataset in ("FFHQ", "CelebAHQ"):
    config.data.image_size = 256
  name = images._spec(config).tfds_name  # pylint: disable=protected-access
  kwargs = {}
  if args.manual_dir:
    kwargs["download_config"] = tfds.download.DownloadConfig(manual_dir=args.manual_dir)
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    print(f"{name} already prepared in {builder.data_dir}")
    return 0
  try:
    builder.download_and_prepare(**kwargs)
  except ModuleNotFoundError as e:
    hint = (" (or, for CIFAR10, build it from the official archive without them: `--source "
            "cifar-10-python.tar.gz`)") if args.dataset == "CIFAR10" else ""
    return _error(f"preparing {name} with tfds needs the module {e.name!r}, which is not installed. tfds' "
                  f"standard preparation needs TensorFlow (image encoding) and importlib_resources: install "
                  f"them for this step only (`pip install 'score_sde_jax[prepare]'`){hint}; training then "
                  f"reads the array_record files without them.")
  print(f"{name} ready in {builder.data_dir} ({time.time() - start:.1f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())

#!/usr/bin/env python
"""Convert a released checkpoint (official JAX `checkpoint_<k>` or PyTorch `checkpoint_<k>.pth`) into a
workdir that `scripts/sample.py --workdir` and `scripts/evaluate.py --workdir` read (and that
`scripts/train.py` can fine-tune from):

  python scripts/convert_checkpoint.py --config configs/vp/cifar10_ddpmpp_continuous.py \\
      --checkpoint checkpoint_26.pth --workdir runs/ddpmpp_released

The workdir gets `config.json` and one orbax checkpoint at the checkpoint's training step, holding the EMA
weights as `ema_params` (what sampling and evaluation use) and the raw training weights as `params`; the
optimiser state is fresh (the official Adam moments are not carried over).  `--output vars.msgpack`
instead (or as well) writes the Flax variables alone (`flax.serialization.msgpack_serialize`), the EMA
weights unless `--weights raw`.  No PyTorch is needed: `.pth` files are read by
`score_sde_jax.torch_pickle`, which runs no code from the file.  `--check` runs one forward pass.

Exit status: 0 done, 2 bad config, flags or checkpoint (one `ERROR:` line; `--verbose` adds the
traceback); nothing is written unless every input is good.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from score_sde_jax import cli  # noqa: E402


def main(argv=None) -> int:
  parser = cli.argument_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="config file defining get_config()")
  parser.add_argument("--checkpoint", required=True,
                      help="official JAX checkpoint_<k> (or a directory of them) or PyTorch .pth")
  parser.add_argument("--workdir", default=None, help="write a workdir (config.json + checkpoints/<step>)")
  parser.add_argument("--output", default=None, help="write the Flax variables alone (msgpack)")
  parser.add_argument("--weights", choices=("ema", "raw"), default="ema",
                      help="--output: the EMA weights (default, as the paper) or the raw training weights")
  parser.add_argument("--check", action="store_true", help="run one forward pass of the converted model")
  args = parser.parse_args(argv)
  try:
    return _run(args)
  except (ValueError, FileNotFoundError) as e:   # CheckpointError, ConfigError and bad values are ValueErrors
    cli.print_error(e, e, args.verbose)
    return cli.EXIT_USER_ERROR


def _run(args) -> int:
  import jax
  import numpy as np

  from score_sde_jax import checkpoints
  from score_sde_jax.run import config_utils

  if args.workdir is None and args.output is None:
    raise ValueError("nothing to write: pass --workdir DIR (a workdir for sample.py/evaluate.py) and/or "
                     "--output FILE.msgpack (the variables alone).")
  problem = cli.config_file_problem(args.config)
  if problem:
    raise ValueError(f"--config {problem}")
  config = config_utils.load_config_file(args.config)
  for name, path in (("--workdir", args.workdir), ("--output", args.output)):
    if path is not None and os.path.exists(path) and os.path.isdir(path) != (name == "--workdir"):
      raise ValueError(f"{name} {path} exists and is {'not ' if name == '--workdir' else ''}a directory; "
                       f"pass {'a directory' if name == '--workdir' else 'a file name'}.")
  if args.output is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
    raise ValueError(f"--output {args.output}: the directory {os.path.dirname(os.path.abspath(args.output))} "
                     f"does not exist.")
  if args.workdir is not None and os.path.isdir(os.path.join(args.workdir, "checkpoints")) and os.listdir(
      os.path.join(args.workdir, "checkpoints")):
    raise ValueError(f"{args.workdir} already holds checkpoints; convert into a new --workdir (nothing was "
                     f"written).")
  ema = checkpoints.read_pretrained(args.checkpoint, config, weights="ema")
  n = sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(ema.variables))
  print(f"read {ema.path} ({ema.format}, step {ema.step}): {n:,} parameters of "
        f"model.name={config.model.name!r}")
  if args.output is not None:
    import flax.serialization
    chosen = ema if args.weights == "ema" else checkpoints.read_pretrained(ema.path, config, weights="raw")
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as f:
      f.write(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, chosen.variables)))
    os.replace(tmp, args.output)
    print(f"wrote {args.output}: the {args.weights.upper() if args.weights == 'ema' else 'raw'} weights "
          f"(fingerprint {chosen.fingerprint})")
  if args.workdir is not None:
    raw = checkpoints.read_pretrained(ema.path, config, weights="raw")
    path = write_workdir(args.workdir, config, ema, raw)
    print(f"wrote {path}: EMA weights (fingerprint {ema.fingerprint}) and raw weights of step {ema.step}; "
          f"sample with `python scripts/sample.py --workdir {args.workdir}`")
  if args.check:
    import jax.numpy as jnp
    from score_sde_jax.models import get_model
    from score_sde_jax.models.convert import _dummy_inputs
    x, labels, kwargs = _dummy_inputs(config, batch=2)
    x = jax.random.uniform(jax.random.PRNGKey(0), x.shape)
    out = get_model(config).apply(ema.variables, x, labels, train=False, **kwargs)
    print(f"forward check: output {out.shape}, finite={bool(jnp.all(jnp.isfinite(out)))}")
  return 0


def write_workdir(workdir: str, config, ema, raw) -> str:
  """A workdir whose one checkpoint (at the released step) holds `raw` as params and `ema` as ema_params."""
  import jax
  import jax.numpy as jnp

  from score_sde_jax.run import checkpoint as ckpt_lib
  from score_sde_jax.run import config_utils
  from score_sde_jax.run import state as state_lib

  tx, _ = state_lib.get_optimizer(config)
  params = jax.tree.map(jnp.asarray, raw.variables)
  step = int(ema.step or 0)
  state = state_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                               ema_params=jax.tree.map(jnp.asarray, ema.variables), opt_state=tx.init(params),
                               rng=jax.random.PRNGKey(int(config.seed)))
  from score_sde_jax.train import lock as lock_lib
  os.makedirs(workdir, exist_ok=True)
  with lock_lib.acquire(workdir):     # not while a training writes there
    config_utils.save_config(workdir, config)
    ck = ckpt_lib.Checkpointer(workdir, async_save=False)
    try:
      ck.save(step, state, ckpt_lib.converted_data_state(ema.path), wait=True)
    finally:
      ck.close()
  return os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step))


if __name__ == "__main__":
  sys.exit(main())

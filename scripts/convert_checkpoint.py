"""Convert a released score_sde_pytorch checkpoint (`.pth`) to Flax variables.

  python scripts/convert_checkpoint.py --config configs/ve/cifar10_ncsnpp_continuous.py \
      --checkpoint checkpoint_24.pth --output ncsnpp_cifar10.msgpack [--ema] [--check]

A `.npz` of arrays by name is accepted too (no PyTorch needed).  The checkpoint holds the model state dict under 'model' (keys prefixed 'module.') and the EMA under 'ema';
`--ema` converts the EMA weights (what the paper samples with).  The output is `{'params': …}` serialised
with flax.serialization (msgpack); load it with

  variables = flax.serialization.msgpack_restore(open(path, 'rb').read())

PyTorch is needed only here (the optional extra `score_sde_jax[torch]`).
"""
from __future__ import annotations

import argparse
import os
import sys


def load_config(path: str):
  from score_sde_jax.train.config_utils import load_config_file
  try:
    return load_config_file(path)
  except (OSError, ValueError) as e:
    raise SystemExit(f"cannot load config file {path!r}: {e}") from e


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="config file defining get_config()")
  parser.add_argument("--checkpoint", required=True, help="official PyTorch checkpoint (.pth)")
  parser.add_argument("--output", required=True, help="where to write the Flax variables (msgpack)")
  parser.add_argument("--ema", action="store_true", help="convert the EMA weights instead of the raw ones")
  parser.add_argument("--check", action="store_true",
                      help="run one forward pass of the converted model on random input")
  args = parser.parse_args(argv)

  import flax.serialization
  import jax
  import jax.numpy as jnp
  import numpy as np

  from score_sde_jax.models import convert_torch_state_dict, get_model

  config = load_config(args.config)
  if not os.path.exists(args.checkpoint):
    raise SystemExit(f"checkpoint {args.checkpoint!r} not found")
  if args.checkpoint.endswith(".npz"):
    # a state dict saved with numpy (names → arrays; an 'sd/' prefix, as in the test fixtures, is dropped)
    data = np.load(args.checkpoint)
    ckpt = {(k[3:] if k.startswith("sd/") else k): data[k] for k in data.files
            if k.startswith("sd/") or not any(f.startswith("sd/") for f in data.files)}
  else:
    try:
      import torch  # noqa: WPS433  (optional dependency, imported only here)
    except ImportError:
      raise SystemExit("PyTorch is required to read .pth files: pip install 'score_sde_jax[torch]'")
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)

    def to_numpy(obj):
      if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().float().numpy()
      if isinstance(obj, dict):
        return {k: to_numpy(v) for k, v in obj.items()}
      if isinstance(obj, (list, tuple)):
        return [to_numpy(v) for v in obj]
      return obj

    ckpt = to_numpy(ckpt)
  variables = convert_torch_state_dict(config, ckpt, use_ema=args.ema)
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))
  with open(args.output, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.device_get(variables)))
  print(f"wrote {args.output}: {n:,} parameters ({'EMA' if args.ema else 'raw'} weights of "
        f"model.name={config.model.name!r})")

  if args.check:
    from score_sde_jax.models.convert import _dummy_inputs
    x, labels, kwargs = _dummy_inputs(config, batch=2)
    x = jax.random.uniform(jax.random.PRNGKey(0), x.shape)
    out = get_model(config).apply(variables, x, labels, train=False, **kwargs)
    print(f"forward check: output {out.shape}, finite={bool(jnp.all(jnp.isfinite(out)))}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Released and trained checkpoints → the Flax variables of `models.get_model(config)`.

`load_pretrained(path, config, *, weights="ema")` returns `variables` for
`get_model(config).apply(variables, x, labels, train=False)`, from any of

* an **official JAX checkpoint** (yang-song/score_sde): a `checkpoint_<k>` file, or a directory holding
  such files (its `checkpoints/` sub-directory too), where the newest is the largest k in numeric order
  (`checkpoint_tmp` is skipped; lexicographic order would put `checkpoint_2` after `checkpoint_10`).  It
  is one msgpack map written by `flax.serialization.to_bytes` of the official `State`: the EMA weights
  in `params_ema`, the raw training weights in `optimizer.target`, other collections in `model_state`;
* an **official PyTorch checkpoint** (yang-song/score_sde_pytorch): `checkpoint_<k>.pth` (or a directory
  of them) holding `model` (DataParallel keys `module.…`), `ema` (`shadow_params`, an unnamed list in
  `model.parameters()` order, trainable parameters only) and `step`.  It is read by
  `score_sde_jax.torch_pickle` (no PyTorch, no code from the file runs) and mapped by
  `models.convert_torch_state_dict`;
* this project's own **training workdir**, its `checkpoints/` directory or one step directory in it
  (orbax), read without modifying anything;
* a `{'params': …}` msgpack written by older versions of `scripts/convert_checkpoint.py`.

`weights="ema"` (the default: every official sampling, likelihood and evaluation path uses the EMA
weights) or `"raw"`.  The official JAX parameter tree is ours, name for name, with one difference mapped
here: the FIR resampling convolution (`Conv2d_0` inside `Upsample_*`/`Downsample_*`) calls its kernel
`weight`, ours `kernel`.  Every restored tree is checked against the model built from the config, and any
difference is reported with the first parameter's name and both shapes.

Failures raise `CheckpointError` (a ValueError) whose message starts with the path.  Nothing here ever
writes: reading a checkpoint never modifies the directory it is in.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np

WEIGHTS = ("ema", "raw")
FORMATS = ("official_jax", "official_torch", "workdir", "variables_msgpack")

_JAX_NAME = re.compile(r"^checkpoint_(\d+)$")
_TORCH_NAME = re.compile(r"^checkpoint_(\d+)\.pth$")
# Official JAX leaf names that differ from ours: (module name, official leaf) → our leaf.
_OFFICIAL_JAX_LEAVES = {("Conv2d_0", "weight"): "kernel"}
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the config; the message names the path."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """Variables read from a checkpoint, and where they came from."""
  variables: Dict[str, Any]
  path: str            # the file (or workdir step directory) that was read
  format: str          # one of FORMATS
  weights: str         # 'ema' | 'raw'
  step: Optional[int]  # training steps taken, where the checkpoint records it

  @property
  def fingerprint(self) -> str:
    return fingerprint(self.variables)


def fingerprint(variables) -> str:
  """SHA-256 (first 16 hex digits) of every leaf's path, dtype, shape and bytes: the identity of a set
  of weights, independent of the file that held them."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(variables)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def load_pretrained(path: str, config, *, weights: str = "ema") -> Dict[str, Any]:
  """Flax variables of `get_model(config)` from the checkpoint at `path` (see the module docstring)."""
  return read_pretrained(path, config, weights=weights).variables


def read_pretrained(path: str, config, *, weights: str = "ema", step: Optional[int] = None) -> Pretrained:
  """`load_pretrained` with its provenance (`Pretrained`).  `step` picks a checkpoint of a workdir or a
  directory of official checkpoints (official files: by their index k, as in `checkpoint_<k>`)."""
  if weights not in WEIGHTS:
    raise CheckpointError(f"{path}: weights must be one of {WEIGHTS}; got {weights!r}.")
  fmt, target = locate(path, step)
  if fmt == "official_jax":
    variables, ckpt_step, fmt = _read_msgpack_checkpoint(target, weights)
  elif fmt == "official_torch":
    variables, ckpt_step = _read_official_torch(target, config, weights)
  else:
    variables, ckpt_step, target = _read_workdir(target, config, weights, step)
  check_variables(variables, config, target)
  check_finite(variables, target, ckpt_step)
  return Pretrained(variables=variables, path=target, format=fmt, weights=weights, step=ckpt_step)


def default_output_dir(pre: Pretrained) -> str:
  """Where results computed from a checkpoint go when no workdir is given: the training workdir for a
  workdir's checkpoint, else `<checkpoint>_outputs/` beside the checkpoint file."""
  if pre.format == "workdir":
    return os.path.dirname(os.path.dirname(os.path.abspath(pre.path)))
  return os.path.abspath(pre.path).rstrip(os.sep) + "_outputs"


# ---------------------------------------------------------------------------------------------------
# Which file, which format
# ---------------------------------------------------------------------------------------------------
def _newest(directory: str, pattern: re.Pattern, step: Optional[int]) -> Optional[str]:
  found = {}
  for name in os.listdir(directory):
    m = pattern.match(name)
    if m and os.path.isfile(os.path.join(directory, name)):
      found[int(m.group(1))] = name
  if not found:
    return None
  if step is not None:
    if step not in found:
      raise CheckpointError(f"{directory}: no checkpoint {step}; available: {sorted(found)}.")
    return os.path.join(directory, found[step])
  return os.path.join(directory, found[max(found)])


def _is_orbax_step_dir(path: str) -> bool:
  return os.path.isdir(path) and os.path.basename(os.path.normpath(path)).isdigit()


def locate(path: str, step: Optional[int] = None) -> Tuple[str, str]:
  """(format, file or directory to read) for a checkpoint path, by content, not by name."""
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file or directory.")
  if os.path.isdir(path):
    from score_sde_jax.run import checkpoint as ckpt_lib
    if os.path.isdir(ckpt_lib.checkpoint_dir(path)) and any(
        n.isdigit() for n in os.listdir(ckpt_lib.checkpoint_dir(path))):
      return "workdir", path
    if any(_is_orbax_step_dir(os.path.join(path, n)) for n in os.listdir(path)):
      return "workdir", os.path.dirname(os.path.abspath(path))       # <workdir>/checkpoints
    if _is_orbax_step_dir(path) and os.path.basename(os.path.dirname(os.path.abspath(path))) == "checkpoints":
      return "workdir", path                                            # <workdir>/checkpoints/<step>
    for d in (path, os.path.join(path, "checkpoints")):
      if not os.path.isdir(d):
        continue
      for pattern, fmt in ((_JAX_NAME, "official_jax"), (_TORCH_NAME, "official_torch")):
        found = _newest(d, pattern, step)
        if found is not None:
          return locate(found)
    raise CheckpointError(
        f"{path}: not a checkpoint directory: it holds no official checkpoint_<k> / checkpoint_<k>.pth "
        f"file and no training workdir checkpoints (checkpoints/<step>/).")
  with open(path, "rb") as f:
    head = f.read(4)
  if not head:
    raise CheckpointError(f"{path}: the file is empty.")
  if head == _ZIP_MAGIC:
    return "official_torch", path
  # A msgpack map (fixmap 0x80–0x8f, map16 0xde, map32 0xdf): flax.serialization's format.
  if 0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF):
    return "official_jax", path
  raise CheckpointError(
      f"{path}: unknown checkpoint format (the file is neither a Flax msgpack checkpoint nor a PyTorch "
      f"zip checkpoint; first bytes {head!r}). Pass an official JAX checkpoint_<k>, an official "
      f"PyTorch checkpoint_<k>.pth, or a training workdir.")


# ---------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------
def _msgpack(path: str) -> Mapping[str, Any]:
  import flax.serialization
  with open(path, "rb") as f:
    data = f.read()
  try:
    tree = flax.serialization.msgpack_restore(data)
  except Exception as e:  # noqa: BLE001  (msgpack raises several types for cut or corrupt input)
    raise CheckpointError(f"{path}: truncated or corrupt msgpack checkpoint ({len(data):,} bytes): "
                          f"{type(e).__name__}: {str(e)[:200]}") from None
  if not isinstance(tree, Mapping):
    raise CheckpointError(f"{path}: a msgpack checkpoint must hold a map; got {type(tree).__name__}.")
  return tree


def _official_jax_to_ours(tree: Mapping, owner: Optional[str] = None) -> Dict[str, Any]:
  """Renames the official JAX leaves that differ from ours (`_OFFICIAL_JAX_LEAVES`), at any depth."""
  return {(k if isinstance(v, Mapping) else _OFFICIAL_JAX_LEAVES.get((owner, k), k)):
          (_official_jax_to_ours(v, k) if isinstance(v, Mapping) else v) for k, v in tree.items()}


def _read_msgpack_checkpoint(path: str, weights: str):
  """(variables, step, format) of an official JAX checkpoint or a converted variables file."""
  tree = _msgpack(path)
  if "params" in tree and "params_ema" not in tree and "optimizer" not in tree:
    return _read_variables_msgpack(path, weights, tree) + ("variables_msgpack",)
  missing = [k for k in ("params_ema", "optimizer") if k not in tree]
  if missing:
    raise CheckpointError(f"{path}: not an official score_sde JAX checkpoint: the State has no "
                          f"{' / '.join(missing)} (keys: {sorted(tree)[:10]}).")
  if weights == "ema":
    params = tree["params_ema"]
    if not params:
      raise CheckpointError(f"{path}: the checkpoint holds no EMA weights (params_ema is empty); pass "
                            f"weights='raw' for the training weights.")
  else:
    opt = tree["optimizer"]
    if not isinstance(opt, Mapping) or "target" not in opt:
      raise CheckpointError(f"{path}: the optimizer state has no 'target' (the raw training weights).")
    params = opt["target"]
  variables = {"params": _official_jax_to_ours(params)}
  model_state = tree.get("model_state") or {}
  variables.update({k: v for k, v in model_state.items()})
  step = tree.get("step")
  return variables, (int(np.asarray(step)) if step is not None else None), "official_jax"


def _read_variables_msgpack(path: str, weights: str, tree):
  if weights != "ema":
    raise CheckpointError(f"{path}: a converted variables file holds one set of weights (the ones chosen "
                          f"when converting); weights='raw' cannot be told apart here.")
  return dict(tree), None


def _read_official_torch(path: str, config, weights: str):
  from score_sde_jax import torch_pickle
  from score_sde_jax.models import convert_torch_state_dict
  try:
    ckpt = torch_pickle.load(path)
  except ValueError as e:
    msg = str(e)
    raise CheckpointError(msg if msg.startswith(path) else f"{path}: {msg}") from None
  if not isinstance(ckpt, Mapping) or "model" not in ckpt:
    raise CheckpointError(f"{path}: not an official score_sde PyTorch checkpoint: no 'model' state dict "
                          f"(keys: {sorted(ckpt)[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__}).")
  if weights == "ema" and "ema" not in ckpt:
    raise CheckpointError(f"{path}: the checkpoint holds no EMA weights (no 'ema' entry); pass "
                          f"weights='raw' for the training weights.")
  try:
    variables = convert_torch_state_dict(config, ckpt, use_ema=weights == "ema")
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from None
  variables = jax.tree.map(np.asarray, variables)
  step = ckpt.get("step")
  return variables, (int(step) if step is not None else None)


def _read_workdir(path: str, config, weights: str, step: Optional[int]):
  """(variables, step, step directory) of a training workdir's checkpoint (read-only)."""
  from score_sde_jax.run import restore
  if _is_orbax_step_dir(path):
    step = int(os.path.basename(os.path.normpath(path)))
    workdir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  else:
    workdir = path
  reports = []
  try:
    found_step, state = restore.restore_state(config, workdir, step, report=reports.append)
  except Exception as e:  # noqa: BLE001
    from score_sde_jax.run import checkpoint as ckpt_lib
    raise CheckpointError(f"{ckpt_lib.checkpoint_dir(workdir)}: cannot restore a checkpoint for this "
                          f"config: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                          + (f" ({'; '.join(reports)})" if reports else "")) from None
  if jax.process_index() == 0:
    for line in reports:   # the checkpoints skipped (one line each, with the reason)
      print(line)
  variables = state.ema_params if weights == "ema" else state.params
  from score_sde_jax.run import checkpoint as ckpt_lib
  from score_sde_jax.run import parallel
  # Replicated over every device of every host: each host copies its local replica.
  return (parallel.tree_to_host(variables), int(found_step),
          os.path.join(ckpt_lib.checkpoint_dir(workdir), str(found_step)))


# ---------------------------------------------------------------------------------------------------
# Checking a tree against the model of a config
# ---------------------------------------------------------------------------------------------------
def _flat(tree) -> Dict[str, Any]:
  return {"/".join(str(getattr(k, "key", k)) for k in p): v
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_finite(variables, path: str, step: Optional[int] = None) -> None:
  """Raises CheckpointError naming the step and the first parameter (in name order) holding NaN/Inf: such
  weights would give NaN samples or run an adaptive solver to its step limit."""
  flat = _flat(variables)
  for name in sorted(flat):
    a = np.asarray(flat[name])
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
      bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
      raise CheckpointError(
          f"{path}: the weights{f' of step {step}' if step is not None else ''} are not finite: parameter "
          f"{name} has {bad} NaN/Inf value(s) of {np.size(a)}. Use an earlier checkpoint.")


def check_variables(variables, config, path: str) -> None:
  """Raises CheckpointError naming the first parameter whose presence or shape differs from the model
  built from `config`."""
  from score_sde_jax.run import state as state_lib
  want = _flat(state_lib.variables_shapes(config))
  have = _flat(variables)
  for name in sorted(want):
    if name not in have:
      raise CheckpointError(
          f"{path}: does not match the model of the config (model.name={config.model.name!r}): parameter "
          f"{name} (shape {tuple(want[name].shape)}) is missing from the checkpoint. Is this the config the "
          f"checkpoint was trained with?")
    if tuple(np.shape(have[name])) != tuple(want[name].shape):
      raise CheckpointError(
          f"{path}: does not match the model of the config (model.name={config.model.name!r}): parameter "
          f"{name} has shape {tuple(np.shape(have[name]))} in the checkpoint but the config's model needs "
          f"{tuple(want[name].shape)}. Is this the config the checkpoint was trained with (model.nf, "
          f"ch_mult, num_res_blocks, data.num_channels, …)?")
  extra = sorted(set(have) - set(want))
  if extra:
    raise CheckpointError(
        f"{path}: does not match the model of the config (model.name={config.model.name!r}): the checkpoint "
        f"has {len(extra)} parameter(s) the model does not, first {extra[0]} (shape "
        f"{tuple(np.shape(have[extra[0]]))}).")

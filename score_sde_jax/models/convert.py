"""Official PyTorch state dicts ↔ our Flax variables.

`convert_torch_state_dict(config, state_dict)` maps the weights of an official score_sde_pytorch model
(numpy arrays or torch tensors by name) onto the variables of `get_model(config)`.  It accepts

* the raw `model.state_dict()`;
* the same with the `module.` prefix of DataParallel (the released checkpoints);
* a whole checkpoint dict holding it under 'model' (and the EMA under 'ema'; `use_ema=True` takes the
  EMA weights: either a name → array dict, or the official `ExponentialMovingAverage.state_dict()`
  whose 'shadow_params' list follows `model.parameters()` order, trainable parameters only).

How names map:

* NCSN++ / DDPM++ / DDPM keep their modules in one list, `all_modules.<i>`, in the order the forward pass
  uses them.  Our modules are created in the same order; the order is read by tracing the model once with
  `nn.intercept_methods` (no computation), and `all_modules.<i>.<rest>` ↔ `<i-th module name>/<rest>`.
  The parameter-free pyramid resamplers of `progressive='output_skip'` / `progressive_input='input_skip'`
  are not in the PyTorch list (they are the attributes `pyramid_upsample` / `pyramid_downsample`) although
  the official JAX names count them (`Upsample_k`, `Downsample_k`, as ours do), so they take no index.
  Inside blocks the official names are ours (GroupNorm_0, Conv_1, Dense_0, NIN_2, Conv2d_0, Combine's
  Conv_0 …).
* NCSN / NCSNv2 use attribute names (begin_conv, res1.0.conv1, refine2.adapt_convs.1.1_2_conv …); ours
  are the same with list indices joined by '_' (res1_0, adapt_convs_1).
* Leaves: conv weight OIHW ↔ kernel HWIO; Linear weight (out, in) ↔ Dense kernel (in, out); GroupNorm
  weight ↔ scale; Embedding weight ↔ embedding; NIN W (in, out) and b, Fourier W, InstanceNorm++
  alpha/gamma/beta are copied as they are.

Buffers (`sigmas`) are ignored, and so are the time-embedding Dense layers the PyTorch blocks create even
when `model.conditional` is False (the official JAX networks, which we follow, create none).  Any other
missing, unexpected or mis-shaped entry raises a ValueError naming it.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde_jax.models import layerspp
from score_sde_jax import memo

_LIST_FAMILY = ("ncsnpp", "ddpm")
_ATTR_FAMILY = ("ncsn", "ncsnv2_64", "ncsnv2_128", "ncsnv2_256")
_LIST_CONTAINER = re.compile(r"^(res\d+|adapt_convs|convs|norms)_(\d+)$")
_IGNORED_BUFFERS = ("sigmas",)
# Modules the official JAX network counts in its names but the PyTorch port keeps outside all_modules.
_OUTSIDE_LIST = (layerspp.PyramidUpsample, layerspp.PyramidDownsample)


def _to_numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch tensor
    v = v.detach().cpu()
    if str(v.dtype) == "torch.bfloat16":
      v = v.float()
    v = v.numpy()
  return np.asarray(v)


def _dummy_inputs(config, batch: int = 1):
  from score_sde_jax.models import layers  # noqa: F401
  size = int(config.data.image_size)
  x = jnp.zeros((batch, size, size, int(config.data.num_channels)), jnp.float32)
  name = str(config.model.name).lower()
  if name in _ATTR_FAMILY or name == "ddpm" or not config.training.continuous:
    labels = jnp.zeros((batch,), jnp.int32)
  elif str(config.model.embedding_type).lower() == "fourier":
    labels = jnp.ones((batch,), jnp.float32)
  else:
    labels = jnp.zeros((batch,), jnp.float32)
  kwargs = {}
  if int(config.model.num_classes) > 0:
    kwargs["class_labels"] = jnp.zeros((batch,), jnp.int32)
  return x, labels, kwargs


@memo.per_config
def param_shapes_and_order(config):
  """(params shape tree, top-level module names in call order) of `get_model(config)`, by tracing (once
  per config content: `memo.per_config`)."""
  from score_sde_jax.models import get_model
  model = get_model(config)
  x, labels, kwargs = _dummy_inputs(config)
  order = []

  def interceptor(next_fun, args, kw, context):
    mod = context.module
    if context.method_name == "__call__" and mod.parent is not None and mod.scope is not None:
      if len(mod.scope.path) == 1 and mod.name not in order and not isinstance(mod, _OUTSIDE_LIST):
        order.append(mod.name)
    return next_fun(*args, **kw)

  def init():
    with nn.intercept_methods(interceptor):
      return model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, x,
                        labels, train=False, **kwargs)

  shapes = jax.eval_shape(init)
  return shapes["params"], order


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat):
  tree: Dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def _torch_leaf(path: Tuple[str, ...], ndim: int) -> Tuple[str, str]:
  """(torch leaf name, layout kind) of a Flax leaf."""
  leaf = path[-1]
  owner = path[-2] if len(path) >= 2 else ""
  if leaf == "kernel":
    return "weight", ("conv" if ndim == 4 else "dense")
  if leaf == "embedding":
    return "weight", "copy"
  if leaf == "scale":
    return "weight", "copy"
  del owner
  return leaf, "copy"


def _torch_to_flax_array(a: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return np.transpose(a, (2, 3, 1, 0))
  if kind == "dense":
    return np.transpose(a, (1, 0))
  return a


def _flax_to_torch_array(a: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return np.transpose(a, (3, 2, 0, 1))
  if kind == "dense":
    return np.transpose(a, (1, 0))
  return a


def torch_name_map(config):
  """{flax param path: (torch key, layout kind, flax shape)} for `get_model(config)`."""
  name = str(config.model.name).lower()
  if name not in _LIST_FAMILY + _ATTR_FAMILY:
    raise ValueError(f"no PyTorch conversion for model.name {config.model.name!r}; supported: "
                     f"{_LIST_FAMILY + _ATTR_FAMILY}.")
  shapes, order = param_shapes_and_order(config)
  flat = _flatten(shapes)
  mapping = {}
  if name in _LIST_FAMILY:
    index = {n: i for i, n in enumerate(o for o in order if o != "class_embed")}
    for path, sd in flat.items():
      top = path[0]
      tleaf, kind = _torch_leaf(path, len(sd.shape))
      if top == "class_embed":
        key = "class_embed.weight"
      else:
        if top not in index:
          raise RuntimeError(f"internal: module {top!r} was not seen in the call order {order}.")
        inner = list(path[1:-1])
        key = ".".join([f"all_modules.{index[top]}"] + inner + [tleaf])
      mapping[path] = (key, kind, tuple(sd.shape))
  elif name in _ATTR_FAMILY:
    for path, sd in flat.items():
      tleaf, kind = _torch_leaf(path, len(sd.shape))
      parts = []
      for p in path[:-1]:
        mt = _LIST_CONTAINER.match(p)
        parts.append(f"{mt.group(1)}.{mt.group(2)}" if mt else p)
      key = ".".join(parts + [tleaf])
      mapping[path] = (key, kind, tuple(sd.shape))
  else:
    raise ValueError(f"no PyTorch conversion for model.name {config.model.name!r}; supported: "
                     f"{_LIST_FAMILY + _ATTR_FAMILY}.")
  return mapping


def _strip_prefix(sd: Mapping[str, Any]) -> Dict[str, Any]:
  keys = list(sd.keys())
  if keys and all(k.startswith("module.") for k in keys):
    return {k[len("module."):]: v for k, v in sd.items()}
  return dict(sd)


def _select_state_dict(state_dict: Mapping[str, Any], use_ema: bool) -> Dict[str, Any]:
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"state_dict must be a mapping; got {type(state_dict).__name__}.")
  is_ckpt = "model" in state_dict and isinstance(state_dict["model"], Mapping)
  if not is_ckpt and "ema" in state_dict and isinstance(state_dict["ema"], Mapping):
    ema = state_dict["ema"]
    if "shadow_params" in ema:
      raise ValueError("the checkpoint's 'ema' holds only shadow parameters without names; pass the whole "
                       "checkpoint (with 'model') and use_ema=True.")
    return _strip_prefix(ema)
  if not is_ckpt:
    return _strip_prefix(state_dict)
  model_sd = _strip_prefix(state_dict["model"])
  if not use_ema:
    return model_sd
  if "ema" not in state_dict:
    raise ValueError("use_ema=True but the checkpoint has no 'ema' entry.")
  ema = state_dict["ema"]
  if "shadow_params" not in ema:
    return _strip_prefix(ema)
  shadow = list(ema["shadow_params"])
  # model.parameters() order = state_dict order without buffers; the EMA keeps the trainable ones
  # (the Fourier-feature W is frozen, requires_grad=False).
  trainable = [k for k in model_sd if k.split(".")[-1] not in _IGNORED_BUFFERS
               and not re.fullmatch(r"all_modules\.0\.W", k)]
  if len(trainable) != len(shadow):
    raise ValueError(f"EMA has {len(shadow)} shadow parameters but the model state dict has "
                     f"{len(trainable)} trainable entries; cannot align them.")
  out = dict(model_sd)
  for k, v in zip(trainable, shadow):
    if tuple(np.shape(_to_numpy(v))) != tuple(np.shape(_to_numpy(out[k]))):
      raise ValueError(f"EMA shadow parameter for {k!r} has shape {np.shape(_to_numpy(v))}, "
                       f"model has {np.shape(_to_numpy(out[k]))}.")
    out[k] = v
  return out


def _ignorable(key: str, config) -> bool:
  if key.split(".")[-1] in _IGNORED_BUFFERS:
    return True
  if not bool(config.model.conditional) and re.search(r"\.Dense_0\.(weight|bias)$", key):
    return True
  return False


def convert_torch_state_dict(config, state_dict, use_ema: bool = False):
  """Flax variables {'params': …} of `get_model(config)` from an official PyTorch state dict."""
  sd = {k: _to_numpy(v) for k, v in _select_state_dict(state_dict, use_ema).items()}
  mapping = torch_name_map(config)
  flat = {}
  used = set()
  missing = []
  for path, (key, kind, shape) in mapping.items():
    if key not in sd:
      missing.append(key)
      continue
    arr = _torch_to_flax_array(sd[key], kind)
    if tuple(arr.shape) != shape:
      raise ValueError(f"shape mismatch for {key!r} → {'/'.join(path)}: PyTorch {sd[key].shape} gives "
                       f"{arr.shape}, the model built from the config needs {shape}. Does the config "
                       f"match the checkpoint (model.nf, ch_mult, num_res_blocks, data.num_channels …)?")
    flat[path] = jnp.asarray(arr, dtype=jnp.float32)
    used.add(key)
  unexpected = [k for k in sd if k not in used and not _ignorable(k, config)]
  if missing or unexpected:
    raise ValueError(f"state dict does not match the model built from the config: "
                     f"{len(missing)} missing {missing[:8]}, {len(unexpected)} unexpected "
                     f"{unexpected[:8]}.")
  return {"params": _unflatten(flat)}


def export_torch_state_dict(config, variables) -> Dict[str, np.ndarray]:
  """The inverse of `convert_torch_state_dict`: our variables as an official-layout state dict."""
  params = variables["params"] if "params" in variables else variables
  flat = _flatten(jax.device_get(params))
  mapping = torch_name_map(config)
  if set(flat) != set(mapping):
    raise ValueError("variables do not match the model built from the config: "
                     f"{sorted(set(flat) ^ set(mapping))[:8]}")
  return {key: _flax_to_torch_array(np.asarray(flat[path]), kind)
          for path, (key, kind, _) in mapping.items()}

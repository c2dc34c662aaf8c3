"""Tracing a model once per config: `per_config(fn)` memoises `fn(config)` by the config's content.

Building the parameter-shape tree of a score network means tracing its `init` (`jax.eval_shape`), which
costs 0.3–2 s of Python for NCSN++/DDPM++ however small the widths.  The readers ask for the same tree
again and again: `evaluate.py --checkpoints=all` checks every checkpoint of one run against one config,
the converters map each state dict of one architecture.  No library caches by a ConfigDict's content
(ConfigDicts are mutable and unhashable; `functools.lru_cache` needs a hashable argument), hence this
small cache keyed by the sorted JSON of the whole config: any change to any field is another entry.
"""
from __future__ import annotations

import collections
import functools
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def _containers_copied(tree):
  """`tree` with its dicts (order kept), lists and tuples rebuilt and its leaves shared."""
  if isinstance(tree, dict):
    return type(tree)((k, _containers_copied(v)) for k, v in tree.items())
  if isinstance(tree, (list, tuple)):
    return type(tree)(_containers_copied(v) for v in tree)
  return tree


def per_config(fn: Callable[[Any], T], maxsize: int = 64) -> Callable[[Any], T]:
  """`fn(config)`, computed once per distinct config content (least recently used evicted beyond
  `maxsize`).  Each call gets its own containers (dicts, lists, tuples rebuilt), so a caller that edits
  the result does not edit the cache; the leaves (ShapeDtypeStructs, strings, ints) are immutable."""
  cache: "collections.OrderedDict[str, Any]" = collections.OrderedDict()

  @functools.wraps(fn)
  def wrapper(config):
    key = config.to_json_best_effort(sort_keys=True)
    if key in cache:
      cache.move_to_end(key)
    else:
      cache[key] = fn(config)
      if len(cache) > maxsize:
        cache.popitem(last=False)
    return _containers_copied(cache[key])

  return wrapper

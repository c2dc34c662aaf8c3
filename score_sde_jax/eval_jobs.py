"""What `scripts/evaluate.py` runs once its config is loaded: which weights (the checkpoints of a workdir
or any checkpoint), then the evaluations the config enables: bits/dim (`eval.enable_bpd`,
`evaluation.evaluate_likelihood`) and FID/KID/IS (`eval.enable_sampling`,
`sample_quality.evaluate_sample_quality`).  The sample-quality settings and the feature network are
checked before any evaluation starts, so that a long likelihood run never ends in a bad feature-net path.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import jax

from score_sde_jax.eval_settings import EvalError


def parse_checkpoints(text: str):
  """'latest', 'range' or a list of steps from `--checkpoints`."""
  if text in ("latest", "range"):
    return text
  try:
    return [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise EvalError(f"--checkpoints must be 'latest', 'range' or comma-separated steps; got {text!r}") from None


def _has_checkpoints(workdir) -> bool:
  from score_sde_jax.run import checkpoint as ckpt_lib
  cdir = ckpt_lib.checkpoint_dir(workdir)
  return os.path.isdir(cdir) and any(n.isdigit() for n in os.listdir(cdir))


def run(config, *, workdir: Optional[str], checkpoint: Optional[str] = None, weights: str = "ema",
        checkpoints: str = "latest", batch_size: Optional[int] = None, max_examples: Optional[int] = None,
        seed: Optional[int] = None, bound: bool = True, bound_num_t: int = 16, progress: bool = False) -> dict:
  """The evaluations `config.eval` enables, of the chosen weights; returns {'bpd': [...], 'sampling': [...]}
  (the summaries; absent when not enabled)."""
  from score_sde_jax import checkpoints as ckpts
  from score_sde_jax import evaluation, feature_nets, sample_quality
  from score_sde_jax.eval_settings import sample_quality_settings
  from score_sde_jax.run import state as state_lib
  process0 = jax.process_index() == 0
  bpd, sampling = bool(config.eval.enable_bpd), bool(config.eval.enable_sampling)
  if not (bpd or sampling):
    print("eval.enable_bpd and eval.enable_sampling are False: nothing to do (pass "
          "--config.eval.enable_bpd=True and/or --config.eval.enable_sampling=True).", file=sys.stderr)
    return {}
  which = parse_checkpoints(checkpoints)
  net = None
  if sampling:
    sample_quality_settings(config, num_devices=jax.device_count())
    net = feature_nets.load_feature_net(config)
    if process0:
      print(f"feature net: {net.name} from {net.source} (fingerprint {net.fingerprint})")
  pretrained = None
  if checkpoint is not None:
    pretrained = ckpts.read_pretrained(checkpoint, config, weights=weights)
    workdir = workdir or ckpts.default_output_dir(pretrained)
  elif which == "latest" and _has_checkpoints(workdir):
    # The newest checkpoint that restores with finite weights (one line for each one skipped, left in place).
    pretrained = ckpts.read_pretrained(workdir, config, weights=weights)
  if pretrained is not None and process0:
    print(f"{pretrained.weights} weights of step {pretrained.step} from {pretrained.path} "
          f"({pretrained.format}, fingerprint {pretrained.fingerprint})")
  steps = ([pretrained.step] if pretrained is not None else which if isinstance(which, list) else [])
  steps = [s for s in steps if s is not None]
  if weights == "ema" and steps and process0:
    note = state_lib.young_ema_note(min(steps), float(config.model.ema_rate), raw_hint="--weights raw")
    if note:
      print(note)
  out = {}
  if bpd:
    out["bpd"] = evaluation.evaluate_likelihood(
        config, workdir, checkpoints=which, batch_size=batch_size, max_examples=max_examples, seed=seed,
        bound=bound, bound_num_t=bound_num_t, progress=progress, pretrained=pretrained, weights=weights)
  if sampling:
    out["sampling"] = sample_quality.evaluate_sample_quality(
        config, workdir, checkpoints=which, pretrained=pretrained, weights=weights, feature_net=net,
        progress=progress)
  return out

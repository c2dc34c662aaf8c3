"""The results files of the likelihood evaluation: an append-only JSONL of finished (repeat, batch)
entries (`ResultsFile`, tolerant of a line cut short by a kill), the summary over them (`summarize`: mean,
standard error over examples, per-repeat means, with a check that every example counts once per repeat),
the summary of a bits/dim or NLL run (`likelihood_summary`, `format_summary`), and the earlier files of the
same step that another identity wrote (`other_results`)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, List, Tuple

import numpy as np

from score_sde_jax import likelihood
from score_sde_jax.eval_settings import EvalSettings


def other_results(out_dir: str, prefix: str, mine: str, identity: dict) -> List[Tuple[str, List[str]]]:
  """Earlier results files of the same step and split (`prefix*`) with another identity, each with the
  parts of the identity that differ ('weights', 'model', 'sde', 'data', 'settings')."""
  found = []
  if not os.path.isdir(out_dir):
    return found
  for name in sorted(os.listdir(out_dir)):
    if not (name.startswith(prefix) and name.endswith(".jsonl")) or name == mine:
      continue
    try:
      with open(os.path.join(out_dir, name)) as f:
        header = json.loads(f.readline())
    except (OSError, ValueError):
      continue
    old = header.get("identity")
    parts = [k for k in identity if not isinstance(old, dict) or old.get(k) != identity[k]]
    if parts:
      found.append((os.path.join(out_dir, name), parts))
  return found


class ResultsFile:
  """Append-only JSONL of finished (repeat, batch) entries, tolerant of a torn last line."""

  def __init__(self, path: str, header: dict):
    self.path = path
    self.entries: Dict[tuple, dict] = {}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
      with open(path, "rb") as f:
        data = f.read()
      cut = data.rfind(b"\n") + 1
      if cut < len(data):        # a line cut short by a kill: drop it
        with open(path, "r+b") as f:
          f.truncate(cut)
        data = data[:cut]
      for line in data.decode().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "entry":
          self.entries.setdefault((rec["repeat"], rec["batch"]), rec)
    else:
      self._append(dict(header, kind="header"))

  def _append(self, rec: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def add(self, rec: dict) -> None:
    key = (rec["repeat"], rec["batch"])
    if key in self.entries:
      return
    rec = dict(rec, kind="entry")
    self._append(rec)
    self.entries[key] = rec


def summarize(entries: Dict[tuple, dict], num_repeats: int, num_examples: int, key: str = "value") -> dict:
  """Mean over (repeat, example), its standard error (over examples of the per-example mean across
  repeats), per-repeat means and the mean NFE.  Checks every example is counted exactly once per repeat.
  Entries of repeats ≥ num_repeats (left by an earlier run with more repeats) are not counted."""
  per_ex = np.full((num_repeats, num_examples), np.nan)
  nfe = []
  for (r, _), rec in sorted(entries.items()):
    if r >= num_repeats:
      continue
    ids = np.asarray(rec["ids"], np.int64)
    vals = np.asarray(rec[key], np.float64)
    if np.any(~np.isnan(per_ex[r, ids])):
      raise RuntimeError(f"example(s) {ids[~np.isnan(per_ex[r, ids])][:5]} counted twice in repeat {r}")
    per_ex[r, ids] = vals
    nfe.append(rec["nfe"])
  if np.isnan(per_ex).any():
    raise RuntimeError(f"{int(np.isnan(per_ex).sum())} (repeat, example) values are missing")
  ex_mean = per_ex.mean(axis=0)
  return {"mean": float(per_ex.mean()),
          "stderr": float(ex_mean.std(ddof=1) / math.sqrt(num_examples)) if num_examples > 1 else 0.0,
          "repeat_means": [float(v) for v in per_ex.mean(axis=1)],
          "mean_nfe": float(np.mean(nfe)) if nfe else 0.0}


def likelihood_summary(rf: "ResultsFile", s: EvalSettings, num_examples: int, toy: bool, step: int, seconds: float,
             workdir: str) -> dict:
  main = summarize(rf.entries, s.num_repeats, num_examples, "value")
  out = {"step": step, "split": s.split, "num_examples": num_examples, "num_repeats": s.num_repeats,
         "settings": dataclasses.asdict(s), "mean_nfe": main["mean_nfe"],
         "wall_seconds_this_run": seconds,
         "wall_seconds_total": float(sum(e["seconds"] for e in rf.entries.values())),
         "results_file": rf.path}
  if toy:
    out.update(nll_nats_per_dim=main["mean"], nll_nats_per_dim_stderr=main["stderr"],
               bits_per_dim=main["mean"] / math.log(2.0), bits_per_dim_stderr=main["stderr"] / math.log(2.0),
               repeat_means_nats_per_dim=main["repeat_means"],
               convention="NLL of the continuous points (no dequantization), in nats/dim and nats/dim / ln 2")
  else:
    out.update(bits_per_dim=main["mean"], bits_per_dim_stderr=main["stderr"],
               repeat_means_bits_per_dim=main["repeat_means"], convention=likelihood.BPD_CONVENTION)
  if s.bound:
    bd = summarize(rf.entries, s.num_repeats, num_examples, "bound")
    key = "bound_nats_per_dim" if toy else "bound_bits_per_dim"
    out[key], out[key + "_stderr"] = bd["mean"], bd["stderr"]
  return out


def format_summary(s: dict) -> str:
  toy = "nll_nats_per_dim" in s
  lines = [f"step {s['step']}, split {s['split']!r}: {s['num_examples']} examples × {s['num_repeats']} "
           f"repeat(s), mean NFE {s['mean_nfe']:.1f}, wall time {s['wall_seconds_total']:.1f}s "
           f"(this run {s['wall_seconds_this_run']:.1f}s)"]
  if toy:
    lines.append(f"  NLL {s['nll_nats_per_dim']:.4f} ± {s['nll_nats_per_dim_stderr']:.4f} nats/dim = "
                 f"{s['bits_per_dim']:.4f} ± {s['bits_per_dim_stderr']:.4f} bits/dim")
    if "bound_nats_per_dim" in s:
      lines.append(f"  ScoreFlow bound (likelihood-weighted DSM): {s['bound_nats_per_dim']:.4f} ± "
                   f"{s['bound_nats_per_dim_stderr']:.4f} nats/dim")
  else:
    lines.append(f"  bits/dim {s['bits_per_dim']:.4f} ± {s['bits_per_dim_stderr']:.4f} (standard error)")
    if "bound_bits_per_dim" in s:
      lines.append(f"  ScoreFlow bound (likelihood-weighted DSM): {s['bound_bits_per_dim']:.4f} ± "
                   f"{s['bound_bits_per_dim_stderr']:.4f} bits/dim")
  lines.append(f"  convention: {s['convention']}")
  lines.append(f"  results: {s['results_file']}")
  return "\n".join(lines)

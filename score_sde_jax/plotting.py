"""Pictures for training and sampling: image grids and toy-data plots (matplotlib, Agg backend).

All functions take numpy-convertible arrays in data space and write a PNG; they return the path.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

import numpy as np


def _plt():
  import matplotlib
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt
  return plt


def _save_figure(plt, fig, path: str, title: str = "") -> str:
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def image_grid(images, nrow: Optional[int] = None, padding: int = 2) -> np.ndarray:
  """[N, H, W, C] images in [0, 1] → one uint8 grid image [H', W', C] (C = 1 or 3)."""
  x = np.clip(np.nan_to_num(np.asarray(images, np.float32), nan=0.0), 0.0, 1.0)
  if x.ndim == 3:
    x = x[..., None]
  n, h, w, c = x.shape
  nrow = nrow or int(math.ceil(math.sqrt(n)))
  ncol = int(math.ceil(n / nrow))
  grid = np.ones((ncol * (h + padding) + padding, nrow * (w + padding) + padding, c), np.float32)
  for i in range(n):
    r, q = divmod(i, nrow)
    y0, x0 = padding + r * (h + padding), padding + q * (w + padding)
    grid[y0:y0 + h, x0:x0 + w] = x[i]
  return (grid * 255.0 + 0.5).astype(np.uint8)


def save_image_grid(images, path: str, nrow: Optional[int] = None) -> str:
  """Writes a PNG grid of [N, H, W, C] images with values in [0, 1]."""
  from PIL import Image
  grid = image_grid(images, nrow)
  if grid.shape[-1] == 1:
    grid = grid[..., 0]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid).save(path)
  return path


def _limits(*arrays, q: float = 0.005):
  pts = np.concatenate([np.asarray(a).reshape(-1, np.asarray(a).shape[-1]) for a in arrays])
  pts = pts[np.all(np.isfinite(pts), axis=1)]
  if len(pts) == 0:
    return [(-1.0, 1.0)] * 2
  lo, hi = np.quantile(pts, q, axis=0), np.quantile(pts, 1 - q, axis=0)
  pad = 0.15 * (hi - lo + 1e-6)
  return list(zip(lo - pad, hi + pad))


def save_toy_samples(samples, data, path: str, title: str = "") -> str:
  """Samples beside data: two scatter panels for 2-D points, two histograms for 1-D."""
  plt = _plt()
  s, d = np.asarray(samples), np.asarray(data)
  s, d = s.reshape(len(s), -1), d.reshape(len(d), -1)
  fig, axes = plt.subplots(1, 2, figsize=(9, 4.4), sharex=True, sharey=True)
  if s.shape[1] == 1:
    bins = np.linspace(*_limits(d, q=0.001)[0], 80)
    for ax, pts, name in ((axes[0], d, "data"), (axes[1], s, "samples")):
      ax.hist(np.clip(pts[:, 0], bins[0], bins[-1]), bins=bins, density=True, color="C0" if name == "data" else "C1")
      ax.set_title(f"{name} (n={len(pts)})")
  else:
    (x0, x1), (y0, y1) = _limits(d, q=0.001)[:2]   # the data's range; stray samples are cut
    for ax, pts, name in ((axes[0], d, "data"), (axes[1], s, "samples")):
      ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, color="C0" if name == "data" else "C1")
      ax.set_title(f"{name} (n={len(pts)})")
      ax.set_xlim(x0, x1)
      ax.set_ylim(y0, y1)
      ax.set_aspect("equal")
  return _save_figure(plt, fig, path, title)


def save_score_field(score_fn: Callable, data, path: str, times=(0.01, 0.1, 0.5),
                     grid_size: int = 24, title: str = "") -> str:
  """The learned score s(x, t) at a few times: a quiver plot over the data's range for 2-D data (the
  data in grey underneath), s(x, t) against x for 1-D.  `score_fn(x [B, D], t [B]) -> [B, D]` (numpy
  in, numpy out)."""
  plt = _plt()
  d = np.asarray(data)
  d = d.reshape(len(d), -1)
  dim = d.shape[1]
  fig, axes = plt.subplots(1, len(times), figsize=(4.3 * len(times), 4.2))
  axes = np.atleast_1d(axes)
  lims = _limits(d, q=0.001)
  for ax, t in zip(axes, times):
    if dim == 1:
      xs = np.linspace(*lims[0], 400, dtype=np.float32)[:, None]
      s = np.asarray(score_fn(xs, np.full((len(xs),), t, np.float32)))
      ax.plot(xs[:, 0], s[:, 0], color="C3")
      ax.axhline(0, color="grey", lw=0.5)
      ax.set_xlabel("x")
      ax.set_ylabel("s(x, t)")
    else:
      (x0, x1), (y0, y1) = lims[:2]
      gx, gy = np.meshgrid(np.linspace(x0, x1, grid_size), np.linspace(y0, y1, grid_size))
      pts = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32)
      if dim > 2:
        pts = np.concatenate([pts, np.zeros((len(pts), dim - 2), np.float32)], 1)
      s = np.asarray(score_fn(pts, np.full((len(pts),), t, np.float32)))[:, :2]
      norm = np.linalg.norm(s, axis=1, keepdims=True)
      u = s / np.maximum(norm, 1e-12) * np.log1p(norm)   # direction, log-compressed length
      ax.scatter(d[:, 0], d[:, 1], s=1, color="0.8")
      ax.quiver(pts[:, 0], pts[:, 1], u[:, 0], u[:, 1], np.log1p(norm[:, 0]), cmap="viridis",
                angles="xy")
      ax.set_xlim(x0, x1)
      ax.set_ylim(y0, y1)
      ax.set_aspect("equal")
    ax.set_title(f"learned score, t={t:g}")
  return _save_figure(plt, fig, path, title)

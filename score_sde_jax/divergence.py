"""Divergence ∇·F(x) = tr(∂F/∂x) of a batched vector field F: [B, *D] → [B, *D] acting on each example
independently (no batch statistics), exactly or by Hutchinson's estimator."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def exact_divergence(fn, x):
  """tr(∂fn/∂x) per example [B], by one JVP per data dimension (D in all, vmapped): exact, for
  low-dimensional data."""
  b = x.shape[0]
  d = x[0].size
  flat = x.reshape(b, d)

  def column(i):
    e = jnp.zeros((b, d), x.dtype).at[:, i].set(1.0)
    _, jvp = jax.jvp(lambda y: fn(y.reshape(x.shape)).reshape(b, d), (flat,), (e,))
    return jvp[:, i]

  return jnp.sum(jax.vmap(column)(jnp.arange(d)), axis=0)


def hutchinson_divergence(fn, x, probes):
  """(fn(x), mean_k v_kᵀ (∂fn/∂x) v_k) with probes v: [P, B, *D], from one forward pass and P VJPs."""
  out, vjp = jax.vjp(fn, x)
  vjps = jax.vmap(lambda v: vjp(v)[0])(probes)
  div = jnp.mean(jnp.sum((vjps * probes).reshape(probes.shape[0], x.shape[0], -1), -1), 0)
  return out, div

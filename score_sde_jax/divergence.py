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
  """(fn(x), mean_k v_kᵀ (∂fn/∂x) v_k) with probes v: [P, B, *D], from one forward pass and P JVPs.

  Forward mode (`jax.linearize`, the P Jacobian–vector products vmapped), not one VJP per probe: the
  estimate vᵀ(Jv) = (vᵀJ)v is the same, and so is the cost of one evaluation, but inside a solver's
  while-loop the two differ on XLA:CPU.  The VJP of a convolution is a convolution with the kernel's
  feature dimensions swapped (JAX emits kernel dims `01oi`); XLA:CPU rewrites such convolutions into the
  `01io` form its fast (Eigen) convolution needs only in the entry computation (ConvCanonicalization),
  so in a while-loop body they fall back to a naive loop: 4-6x the cost per evaluation of the same code
  outside the loop (benchmarks/ode_loop.py).  The JVP of a convolution is a convolution with the
  forward pass's own kernel layout, which stays fast everywhere.  tests/test_ode_loop.py guards this.
  """
  out, jvp = jax.linearize(fn, x)
  jvps = jax.vmap(jvp)(probes)
  div = jnp.mean(jnp.sum((jvps * probes).reshape(probes.shape[0], x.shape[0], -1), -1), 0)
  return out, div

"""The score network inside the diffrax while-loop compiles to the same fast convolutions as outside it.

XLA:CPU runs a convolution through its fast (Eigen) kernel only in the canonical form: input `b01f`, kernel
`01io`, output `b01f`.  Its ConvCanonicalization pass rewrites other forms (by an explicit kernel
transpose) in the entry computation only, so a non-canonical convolution inside a while-loop body stays a
naive emitted loop.  The VJP of a convolution is one (JAX emits kernel dims `01oi`), and a Hutchinson
divergence computed by `jax.vjp` made each likelihood-ODE evaluation inside the solve 4-6x the cost of the
same evaluation alone (benchmarks/ode_loop.py).  These tests compile (without running or timing) the
likelihood and sampling solves of a tiny DDPM++ and check every convolution reachable from a while-loop
body is canonical.
"""
import re

import jax
import jax.numpy as jnp
import pytest

from score_sde_jax import likelihood, models, sampling
from score_sde_jax import sde as sde_lib
from score_sde_jax.image_configs import mnist_ncsnpp
from score_sde_jax.score import time_labels

B = 2
_CALLEE = re.compile(r"\b(?:calls|to_apply|body|condition)=(%[\w.\-]+)|branch_computations=\{([^}]*)\}")
_CONV = re.compile(r"\bconvolution\(.*?dim_labels=([\w]+->[\w]+)")
_CANONICAL = re.compile(r"^b\d+f_\d+io->b\d+f$")


def _computations(hlo: str):
  """{name: body text} of an HLO module's text, and the ENTRY computation's name."""
  comps, entry, name, lines = {}, None, None, []
  for line in hlo.splitlines():
    m = re.match(r"^(ENTRY )?(%[\w.\-]+) ", line)
    if m and line.rstrip().endswith("{"):
      name, lines = m.group(2), []
      entry = name if m.group(1) else entry
    elif line.startswith("}") and name is not None:
      comps[name], name = "\n".join(lines), None
    elif name is not None:
      lines.append(line)
  return comps, entry


def _callees(text):
  out = []
  for single, branches in _CALLEE.findall(text):
    out += [single] if single else re.findall(r"%[\w.\-]+", branches)
  return out


def loop_convolutions(hlo: str):
  """dim_labels of every convolution in a computation reachable from a while-loop body or condition
  (fusions and calls included), and the number of while-loops."""
  comps, _ = _computations(hlo)
  roots, n_loops = [], 0
  for text in comps.values():
    n_loops += len(re.findall(r"\bwhile\(", text))
    roots += re.findall(r"\bwhile\(.*?\bbody=(%[\w.\-]+)", text)
    roots += re.findall(r"\bwhile\(.*?\bcondition=(%[\w.\-]+)", text)
  seen, stack = set(), list(roots)
  while stack:
    c = stack.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    stack += _callees(comps[c])
  return [lab for c in seen for lab in _CONV.findall(comps[c])], n_loops


@pytest.fixture(scope="module")
def tiny():
  """A DDPM++ (ncsnpp, VP) on 8x8 one-channel images, nf=8, two resolutions: the same layers as the
  MNIST models, compiled in seconds.  Variables are shapes (jax.ShapeDtypeStruct) only."""
  config = mnist_ncsnpp("vpsde")
  config.data.image_size = 8
  m = config.model
  m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout = 8, (1, 2), 1, (), 0.0
  sde = sde_lib.sde_from_config(config)
  model = models.get_model(config)
  shape = (B, 8, 8, 1)
  x = jnp.zeros(shape, jnp.float32)
  # Shapes only: the programs are compiled, never run.
  variables = jax.eval_shape(lambda k: model.init({"params": k}, x[:1],
                                                  time_labels(sde, jnp.full((1,), 0.5), True),
                                                  train=False), jax.random.PRNGKey(0))
  return sde, model, variables, shape


def _compiled_hlo(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize("num_probes", [1, 2])
def test_likelihood_solve_has_only_canonical_convolutions_in_its_loop(tiny, num_probes):
  sde, model, variables, shape = tiny

  def fn(params, x, key):
    score_fn = models.get_score_fn(sde, model, params)
    return likelihood.log_likelihood(key, sde, score_fn, x, num_probes=num_probes)

  hlo = _compiled_hlo(fn, variables, jnp.zeros(shape, jnp.float32), jax.random.PRNGKey(0))
  labels, n_loops = loop_convolutions(hlo)
  assert n_loops >= 1, "expected the diffrax solve to compile to a while-loop"
  assert labels, "expected the score network's convolutions inside the while-loop"
  bad = sorted({lab for lab in labels if not _CANONICAL.match(lab)})
  assert not bad, (f"{sum(not _CANONICAL.match(lab) for lab in labels)} of {len(labels)} convolutions in "
                   f"the likelihood solve's while-loop are not in XLA:CPU's canonical form "
                   f"b01f_01io->b01f (got {bad}): they miss the fast convolution kernel inside the loop.")


def test_sampling_solve_has_only_canonical_convolutions_in_its_loop(tiny):
  sde, model, variables, shape = tiny

  def fn(params, key):
    return sampling.ode_sample(key, sde, models.get_score_fn(sde, model, params), shape)

  labels, n_loops = loop_convolutions(_compiled_hlo(fn, variables, jax.random.PRNGKey(0)))
  assert n_loops >= 1 and labels
  assert all(_CANONICAL.match(lab) for lab in labels), sorted(set(labels))


def test_the_check_sees_a_vjp_convolution_in_a_loop():
  """The detector itself: a VJP through a convolution inside a fori_loop compiles (on XLA:CPU, today) to
  a non-canonical convolution in the loop body, and the same VJP outside any loop does not."""
  w = jnp.ones((3, 3, 4, 8), jnp.float32)
  conv = lambda x: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x = jnp.ones((2, 8, 8, 4), jnp.float32)
  vjp_step = lambda x: jax.vjp(conv, x)[1](jnp.ones((2, 8, 8, 8), jnp.float32))[0]

  in_loop, n_loops = loop_convolutions(_compiled_hlo(lambda x: jax.lax.fori_loop(
      0, 3, lambda i, y: vjp_step(y), x), x))
  assert n_loops == 1 and in_loop
  if jax.default_backend() == "cpu":
    assert not all(_CANONICAL.match(lab) for lab in in_loop), in_loop
    outside = _CONV.findall(_compiled_hlo(vjp_step, x))
    assert outside and all(_CANONICAL.match(lab) for lab in outside), outside

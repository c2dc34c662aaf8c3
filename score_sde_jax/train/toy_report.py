"""After training on toy data: pictures of samples and of the learned score field, and the test NLL.

`toy_report(config, workdir, state)` writes `<workdir>/samples/toy_samples.png` (EMA samples beside test
data) and `<workdir>/samples/toy_score_field.png`, and computes the test-set negative log-likelihood of
the EMA model by the probability-flow ODE (`likelihood.log_likelihood`, divergence from
`config.eval.divergence`, 'exact' for toy data) in nats and in bits per dimension (nats / (D ln 2); the
toy data is continuous, so no dequantization enters).  For exact mixtures the true NLL of the same
points is reported beside it.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from score_sde_jax import datasets
from score_sde_jax import draw as draw_lib
from score_sde_jax import plotting
from score_sde_jax import sde as sde_lib

def toy_report(config, workdir: str, state, samples=None, report=print) -> Dict[str, Any]:
  from score_sde_jax import likelihood
  from score_sde_jax import models as models_lib

  t0 = time.time()
  sde = sde_lib.sde_from_config(config)
  model = models_lib.get_model(config)
  scaler = datasets.get_data_scaler(config)
  from score_sde_jax.run import parallel
  params = parallel.tree_to_host(state.ema_params)
  continuous = bool(config.training.continuous)
  x_test = datasets.test_points(config)
  dim = int(np.prod(x_test.shape[1:]))
  sample_dir = os.path.join(os.path.abspath(workdir), "samples")
  os.makedirs(sample_dir, exist_ok=True)

  def score_fn_of(p):
    return models_lib.get_score_fn(sde, model, p, continuous=continuous, train=False)

  if samples is None:
    n = int(config.sampling.num_samples)
    draw = draw_lib.draw_program(config, sde, model, (n,) + x_test.shape[1:])
    samples = np.asarray(draw(params, jax.random.PRNGKey(int(config.seed) + 3))[0])
  samples_png = plotting.save_toy_samples(
      samples, x_test, os.path.join(sample_dir, "toy_samples.png"),
      title=f"{config.data.dataset}, {config.training.sde}: test data vs EMA samples")
  sf = draw_lib.score_program(config, sde, model)
  field_png = plotting.save_score_field(
      lambda x, t: np.asarray(sf(params, scaler(jnp.asarray(x)), jnp.asarray(t))), x_test,
      os.path.join(sample_dir, "toy_score_field.png"),
      title=f"learned score field (EMA), {config.training.sde}")

  ev = config.eval
  divergence = str(ev.divergence)

  @jax.jit
  def nll_fn(p, x, key):
    logp, _, nfe = likelihood.log_likelihood(key, sde, score_fn_of(p), x, divergence=divergence,
                                             rtol=float(ev.rtol),
                                             atol=float(ev.atol),
                                             eps=float(ev.eps),
                                             num_probes=int(ev.num_probes),
                                             solver=str(ev.solver))
    return logp, nfe

  x_model = np.asarray(scaler(jnp.asarray(x_test)))
  logp, nfe = nll_fn(params, jnp.asarray(x_model), jax.random.PRNGKey(int(config.seed) + 4))
  logp = np.asarray(logp, np.float64)
  # The scaler's log-Jacobian (toy scalers are identity or affine), to report the NLL in data space.
  eye = jnp.ones((1,) + x_test.shape[1:], jnp.float32)
  log_jac = float(np.sum(np.log(np.abs(np.asarray(jax.jvp(scaler, (jnp.asarray(x_test[:1]),),
                                                           (eye,))[1])))))
  nll = -(logp + log_jac)
  out = {"nll_nats": float(np.mean(nll)), "nll_stderr": float(np.std(nll) / math.sqrt(len(nll))),
         "bits_per_dim": float(np.mean(nll) / (dim * math.log(2.0))), "nfe": int(nfe),
         "num_test": int(len(nll)), "samples_png": samples_png, "score_field_png": field_png}
  try:
    from score_sde_jax.datasets import toy
    ds = toy.get_toy_dataset(config.data.dataset)
    if hasattr(ds, "log_prob"):
      out["true_nll_nats"] = float(-np.mean(np.asarray(ds.log_prob(jnp.asarray(x_test)))))
  except Exception:  # noqa: BLE001
    pass
  out["seconds"] = time.time() - t0
  true = f" (true NLL of these points: {out['true_nll_nats']:.4f})" if "true_nll_nats" in out else ""
  report(f"Test NLL ({len(nll)} points, {divergence} divergence, NFE {out['nfe']}): "
         f"{out['nll_nats']:.4f} ± {out['nll_stderr']:.4f} nats = {out['bits_per_dim']:.4f} bits/dim"
         f"{true}")
  report(f"Pictures: {samples_png}  {field_png}")
  return out

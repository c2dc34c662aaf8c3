"""Fast samplers from the config: `sampling.method` in `METHODS` → `sample_fn(key, score_fn) -> (x, nfe)`
(what `sampling.get_sampler` returns for them).  The samplers: `fast_samplers.py` (DDIM, EDM) and
`dpm_solver.py` (DPM-Solver, DPM-Solver++)."""
from __future__ import annotations

from score_sde_jax import checks, dpm_solver, fast_samplers

METHODS = ("ddim", "edm_heun", "edm_euler", "dpm_solver", "dpm_solver_pp")


def thresholding_range(config):
  """The data range (lo, hi) that DPM-Solver++'s dynamic thresholding clips x̂₀ to, when
  `config.sampling.dpm_thresholding`: the model's input range of image data ([−1, 1] if
  `config.data.centered`, else [0, 1]); toy data have no bounded range, so it is refused there."""
  from score_sde_jax import config_defaults
  if not bool(config.sampling.dpm_thresholding):
    return None
  if config_defaults.is_toy(config):
    raise ValueError(f"sampling.dpm_thresholding needs a bounded data range; toy data "
                     f"({config.data.dataset}) have none.")
  return (-1.0, 1.0) if bool(config.data.centered) else (0.0, 1.0)


def sampler_from_config(config, sde, shape):
  """`sample_fn(key, score_fn) -> (x, nfe)` for a fast `config.sampling.method` (one of `METHODS`),
  every setting checked now (`fast_samplers.validate`).  Fields read: sampling.num_steps, eps, noise_removal and, by
  method, ddim_eta; edm_rho, edm_s_churn, edm_s_tmin, edm_s_tmax, edm_s_noise; solver_order,
  dpm_order_schedule; dpm_thresholding, dpm_threshold_ratio (and data.centered)."""
  s = config.sampling
  method = checks.check_choice("sampling.method", s.method, METHODS)
  shape = checks.check_shape("shape", shape)
  common = dict(num_steps=int(s.num_steps), eps=float(s.eps), denoise=bool(s.noise_removal))
  if method == "ddim":
    fn, options = fast_samplers.ddim_sample, dict(eta=float(s.ddim_eta))
  elif method in ("edm_heun", "edm_euler"):
    fn = fast_samplers.edm_sample
    options = dict(solver=method[len("edm_"):], rho=float(s.edm_rho), s_churn=float(s.edm_s_churn),
                   s_tmin=float(s.edm_s_tmin), s_tmax=float(s.edm_s_tmax), s_noise=float(s.edm_s_noise))
  elif method == "dpm_solver":
    fn, options = dpm_solver.dpm_solver_sample, dict(order=int(s.solver_order),
                                                     order_schedule=s.dpm_order_schedule)
  else:
    fn, options = dpm_solver.dpm_solver_pp_sample, dict(clip=thresholding_range(config),
                                                        threshold_ratio=float(s.dpm_threshold_ratio))
  options.update(common)
  fast_samplers.validate(fn, sde, shape, **options)
  return lambda key, score_fn: fn(key, sde, score_fn, shape, **options)

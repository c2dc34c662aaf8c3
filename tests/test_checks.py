"""Bad input at the public entry points fails before tracing with a ValueError naming the parameter and
the allowed values."""
import jax
import jax.numpy as jnp
import pytest

from score_sde_jax import likelihood, losses, sampling
from score_sde_jax import sde as sde_lib
from score_sde_jax.datasets import toy

MIX = toy.mixture1d()
VP = sde_lib.VPSDE(N=10)
SCORE = MIX.perturbed_score_fn(VP)
KEY = jax.random.PRNGKey(0)
X = jnp.linspace(-1, 1, 8)[:, None]


@pytest.mark.parametrize("call,match", [
    (lambda: sde_lib.get_sde("vesd"), r"Unknown sde 'vesd'; allowed values: 'subvpsde', 'vesde', 'vpsde'"),
    (lambda: sde_lib.VESDE(sigma_min=-1.0), "sigma_min must be a positive"),
    (lambda: sde_lib.VESDE(sigma_min=1.0, sigma_max=0.5), "sigma_max must exceed sigma_min"),
    (lambda: sde_lib.VPSDE(beta_min=0.0), "beta_min must be a positive"),
    (lambda: sde_lib.SubVPSDE(beta_max=float("nan")), "beta_max must be a positive"),
    (lambda: sde_lib.VPSDE(N=0), "N must be a positive integer"),
    (lambda: sde_lib.VESDE(N=10.5), "N must be a positive integer"),
    (lambda: sampling.pc_sample(KEY, VP, SCORE, (8, 1), predictor="heun"),
     r"Unknown predictor 'heun'; allowed values: 'ancestral_sampling', 'euler_maruyama', 'none'"),
    (lambda: sampling.pc_sample(KEY, VP, SCORE, (8, 1), corrector="hmc"),
     r"Unknown corrector 'hmc'; allowed values: 'annealed_langevin', 'langevin', 'none'"),
    (lambda: sampling.pc_sample(KEY, VP, SCORE, (8, 1), order="sideways"), "Unknown order"),
    (lambda: sampling.pc_sample(KEY, VP, SCORE, (8, 1), eps=0.0), r"eps must lie in the open interval \(0, T=1.0\)"),
    (lambda: sampling.pc_sample(KEY, VP, SCORE, (8, 1), eps=1.5), "eps must lie"),
    (lambda: sampling.pc_sample(KEY, VP, SCORE, (8,)), "shape must be a tuple"),
    (lambda: sampling.pc_sample(KEY, VP, lambda x, t: x[:, :0], (8, 1)), "must return an array shaped like x"),
    (lambda: sampling.pc_sample(KEY, "vp", SCORE, (8, 1)), "sde must be a VESDE, VPSDE or SubVPSDE"),
    (lambda: sampling.ode_sample(KEY, VP, SCORE, (8, 1), solver="rk4"),
     r"Unknown solver 'rk4'; allowed values: 'bosh3', 'dopri5', 'euler', 'heun', 'rk45', 'tsit5'"),
    (lambda: sampling.ode_sample(KEY, VP, SCORE, (8, 1), solver="euler"), "pass num_steps"),
    (lambda: sampling.ode_sample(KEY, VP, SCORE, (8, 1), rtol=0.0), "rtol must be a positive"),
    (lambda: sampling.ode_sample(KEY, VP, SCORE, (8, 1), atol=-1e-5), "atol must be a positive"),
    (lambda: sampling.ode_sample(KEY, VP, SCORE, (8, 1), solver="heun", num_steps=0),
     "num_steps must be a positive integer"),
    (lambda: sampling.annealed_langevin_sample(KEY, VP, SCORE, (8, 1), step_lr=0), "step_lr must be a positive"),
    (lambda: likelihood.log_likelihood(KEY, VP, SCORE, X, divergence="skilling"),
     r"Unknown divergence 'skilling'; allowed values: 'exact', 'hutchinson_gaussian', 'hutchinson_rademacher'"),
    (lambda: likelihood.log_likelihood(KEY, VP, SCORE, X, eps=0.0), "eps must lie"),
    (lambda: likelihood.log_likelihood(KEY, VP, SCORE, X, num_probes=0), "num_probes must be a positive"),
    (lambda: likelihood.log_likelihood(KEY, VP, SCORE, X[:, 0]), r"x.shape must be a tuple"),
    (lambda: likelihood.bits_per_dim(KEY, VP, SCORE, X, dequantization="gaussian"),
     r"Unknown dequantization 'gaussian'; allowed values: 'none', 'uniform'"),
    (lambda: likelihood.bits_per_dim(KEY, VP, SCORE, X.astype(jnp.int32), scaler="logit"),
     r"Unknown scaler 'logit'; allowed values: 'centered', 'unit'"),
    (lambda: losses.dsm_loss(KEY, SCORE, X, VP, eps=0.0), "eps must lie"),
    (lambda: losses.dsm_loss(KEY, SCORE, X, VP, weighting="sigma"),
     r"Unknown weighting 'sigma'; allowed values: 'likelihood', 'none', 'sigma2'"),
    (lambda: losses.dsm_loss(KEY, SCORE, X, VP, importance_sampling=True), "importance_sampling=True"),
])
def test_bad_input_raises_a_clear_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_mismatched_x_and_t_shapes():
  with pytest.raises(ValueError, match=r"t must be shaped \[B\] with B = x.shape\[0\] = 8"):
    VP.marginal_prob(X, jnp.ones(7))
  with pytest.raises(ValueError, match=r"t must be shaped \[B\]"):
    VP.sde(X, jnp.ones((8, 1)))
  with pytest.raises(ValueError, match=r"t must be shaped \[B\]"):
    SCORE(X, jnp.ones(3))


def test_checks_run_before_tracing():
  """The ValueError comes from the checks, not from inside a traced computation."""
  traced = []

  def score_fn(x, t):
    traced.append(1)
    return x

  with pytest.raises(ValueError, match="Unknown predictor"):
    sampling.pc_sample(KEY, VP, score_fn, (8, 1), predictor="bogus")
  assert not traced


def test_get_score_fn_passes_class_labels():
  """A class-conditional network's score depends on the class labels given to get_score_fn."""
  import ml_collections  # noqa: F401
  from score_sde_jax import models
  from score_sde_jax.config_defaults import toy_config
  import flax.linen as nn

  class Conditional(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x, labels, train=False, class_labels=None):
      emb = nn.Embed(3, x.shape[-1])(class_labels)
      return nn.Dense(x.shape[-1])(x) + emb

  config = toy_config("vpsde", "ring8")
  model = Conditional(config)
  x = jax.random.normal(KEY, (4, 2))
  variables = model.init(KEY, x, jnp.ones(4), class_labels=jnp.zeros(4, jnp.int32))
  t = jnp.full((4,), 0.5)
  s0 = models.get_score_fn(VP, model, variables, class_labels=jnp.zeros(4, jnp.int32))(x, t)
  s1 = models.get_score_fn(VP, model, variables, class_labels=jnp.ones(4, jnp.int32))(x, t)
  assert s0.shape == x.shape and not jnp.allclose(s0, s1)

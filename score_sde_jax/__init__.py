"""score_sde_jax: score-based generative modelling through SDEs in JAX/Flax."""
from score_sde_jax import sde

__version__ = "0.1.0"

"""mai_jax: pretraining dense and Mixture-of-Experts decoder LMs with JAX, Flax NNX, optax, orbax and
grain, from one CPU to a GPU pod."""

__version__ = "0.1.0"

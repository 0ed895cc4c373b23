"""allmrec-jax: A-LLMRec (KDD 2024) in JAX/Flax."""

__version__ = "0.1.0"

"""JAX reference backend: float64 values and `jax.grad` gradients from naive full logits.

Importing this package turns on float64 in JAX (``jax_enable_x64``): the reference is only a
reference in float64, and a silently float32 "reference" would make every tolerance a lie.
"""
import jax

jax.config.update("jax_enable_x64", True)

from .logprobs import token_logprobs  # noqa: E402
from .reference import Evaluation, evaluate  # noqa: E402

__all__ = ["token_logprobs", "evaluate", "Evaluation"]

"""Per-token log-probabilities from full logits: the naive oracle, written in JAX.

This is the formula every optimized kernel states as its naive equivalent (spec/common.md):

    logits = hidden @ weight.T (+ bias)                 [N, V]
    logp   = log_softmax(logits / temperature)[target]  [N]
    H      = -sum_v p_v log p_v  of the same distribution

It materializes all [N, V] logits on purpose: it is the ground truth, not a fast path.
"""
import jax
import jax.numpy as jnp


def logprobs_from_logits(logits, targets, *, temperature=1.0, return_entropy=False):
    """log_softmax(logits / temperature) gathered at `targets`; logits [..., V], targets [...] int."""
    scaled = logits / temperature
    log_probs = jax.nn.log_softmax(scaled, axis=-1)
    logp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if not return_entropy:
        return logp
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return logp, entropy


def token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False):
    """Naive per-token log-probs (and entropies) from hidden states [..., H] and an LM head [V, H].

    Same signature as `aha.backends.torch.logprobs.token_logprobs`, minus `implementation`:
    here there is only the naive one.
    """
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logprobs_from_logits(logits, targets, temperature=temperature, return_entropy=return_entropy)

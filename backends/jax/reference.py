"""The float64 reference: any `aha.algos` objective, evaluated on naive logits, differentiated by `jax.grad`.

An *objective* is a function `objective(logp, params) -> (loss, metrics, outputs)` written against the
array API: `logp` [B, T] are the policy's per-token log-probs, `params` a dict of other arrays the loss
is differentiated in (PPO's value predictions), `metrics` and `outputs` flat dicts of arrays that are
compared but not differentiated (advantages, returns, chosen/rejected indices...). The conformance
registry builds one objective per case from the `aha.algos` functions; this module only supplies the
log-probs and the gradients.

Gradients are taken of `cotangent * loss` (a random upstream cotangent, so a wrong scale cannot hide
behind a unit seed) with respect to the logits and every entry of `params` by `jax.grad`, and carried
to the hidden states, the LM-head weight (and bias) by `jax.vjp` of the logits map.
"""
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .logprobs import logprobs_from_logits

Objective = Callable[..., tuple]


@dataclass(frozen=True)
class Evaluation:
    """What one backend reports for one case; every array is a float64 NumPy array."""

    loss: np.ndarray
    metrics: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]


def _as_numpy(tree):
    return {key: np.asarray(value, dtype=np.float64) for key, value in tree.items()}


def evaluate(
    objective: Objective,
    *,
    hidden: np.ndarray,
    weight: np.ndarray,
    targets: np.ndarray,
    bias: np.ndarray | None = None,
    temperature: float = 1.0,
    params: dict[str, np.ndarray] | None = None,
    cotangent: float = 1.0,
    gradients: bool = True,
) -> Evaluation:
    """Loss, metrics, outputs and gradients of `objective` on `log_softmax(hidden @ weight.T + bias)`.

    Shapes: hidden [B, T, H], weight [V, H], bias [V] or None, targets [B, T] int.
    Returned grads (when `gradients`): "logits" [B, T, V], "hidden", "weight", ("bias"), and one entry
    per key of `params`, each the gradient of `cotangent * loss`.
    """
    f64 = jnp.float64
    hidden, weight = jnp.asarray(hidden, f64), jnp.asarray(weight, f64)
    bias = None if bias is None else jnp.asarray(bias, f64)
    targets = jnp.asarray(targets)
    params = {key: jnp.asarray(value, f64) for key, value in (params or {}).items()}

    def logits_of(hidden, weight, bias):
        logits = hidden @ weight.T
        return logits if bias is None else logits + bias

    def from_logits(logits, params):
        logp = logprobs_from_logits(logits, targets, temperature=temperature)
        loss, metrics, outputs = objective(logp, params)
        return cotangent * loss, (loss, metrics, outputs)

    logits, pullback = jax.vjp(logits_of, hidden, weight, bias)
    if not gradients:
        _, (loss, metrics, outputs) = from_logits(logits, params)
        return Evaluation(np.asarray(loss, np.float64), _as_numpy(metrics), _as_numpy(outputs), {})

    # One traced pass through the objective; the LM head's share of the chain rule is the VJP of the
    # logits map, which is exactly what jax.grad w.r.t. (hidden, weight, bias) would compose.
    (g_logits, g_params), (loss, metrics, outputs) = jax.grad(from_logits, argnums=(0, 1), has_aux=True)(
        logits, params
    )
    g_hidden, g_weight, g_bias = pullback(g_logits)
    grads = {"logits": g_logits, "hidden": g_hidden, "weight": g_weight, **g_params}
    if bias is not None:
        grads["bias"] = g_bias
    return Evaluation(np.asarray(loss, np.float64), _as_numpy(metrics), _as_numpy(outputs), _as_numpy(grads))

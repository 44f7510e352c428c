"""The JAX reference: float64, the naive log-softmax, and gradients that match closed forms."""
import numpy as np
import pytest

from aha.backends.jax import evaluate, token_logprobs
from aha.conformance.registry import naive_logprobs
from aha.conformance.tolerances import tolerance


def _inputs(seed=0, B=3, T=4, H=5, V=7):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, T, H)), rng.normal(size=(V, H)), rng.normal(size=V), rng.integers(0, V, (B, T)))


def _close(a, b, name="float64"):
    tol = tolerance(name)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol.rtol, atol=tol.atol)


def test_float64_is_on():
    hidden, weight, bias, targets = _inputs()
    assert token_logprobs(hidden, weight, targets, bias=bias).dtype == np.float64


def test_token_logprobs_is_the_naive_log_softmax():
    hidden, weight, bias, targets = _inputs()
    logp, entropy = token_logprobs(hidden, weight, targets, bias=bias, temperature=0.7, return_entropy=True)
    _close(logp, naive_logprobs(hidden, weight, targets, bias=bias, temperature=0.7))
    z = (hidden @ weight.T + bias) / 0.7
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    _close(entropy, -(p * np.log(p)).sum(-1))


def test_huge_logits_stay_finite():
    hidden, weight, bias, targets = _inputs()
    logp = token_logprobs(hidden, weight * 1e3, targets, bias=bias)
    assert np.all(np.isfinite(logp)) and np.all(np.asarray(logp) <= 0)


@pytest.mark.parametrize("with_bias", [False, True])
def test_gradients_match_the_closed_form(with_bias):
    """loss = Σ c·logp: ∂/∂z = c(onehot - p)/τ; ∂/∂h = G·W, ∂/∂W = Gᵀh, ∂/∂b = Σ G; ∂/∂params by jax.grad."""
    hidden, weight, bias, targets = _inputs(seed=1)
    bias = bias if with_bias else None
    rng = np.random.default_rng(2)
    coefficients, values = rng.normal(size=targets.shape), rng.normal(size=targets.shape)
    temperature, cotangent = 1.3, -0.7

    def objective(logp, params):
        loss = (coefficients * logp).sum() + (params["values"] ** 2).sum()
        return loss, {"half": 0.5 * loss}, {"logp": logp}

    result = evaluate(objective, hidden=hidden, weight=weight, targets=targets, bias=bias, temperature=temperature,
                      params={"values": values}, cotangent=cotangent)
    z = (hidden @ weight.T + (0 if bias is None else bias)) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(weight.shape[0])[targets]
    g = cotangent * coefficients[..., None] * (onehot - p) / temperature
    _close(result.grads["logits"], g)
    _close(result.grads["hidden"], g @ weight)
    _close(result.grads["weight"], np.einsum("btv,bth->vh", g, hidden))
    _close(result.grads["values"], cotangent * 2 * values)
    assert ("bias" in result.grads) == with_bias
    if with_bias:
        _close(result.grads["bias"], g.sum((0, 1)))
    _close(result.metrics["half"], 0.5 * result.loss)
    _close(result.outputs["logp"], naive_logprobs(hidden, weight, targets, bias=bias, temperature=temperature))

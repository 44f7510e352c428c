"""The naive oracle of token_logprobs, input builders, and the comparison rule shared by tests/torch_ops."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from aha.conformance.tolerances import tolerance


def naive(hidden, weight, targets, *, bias=None, temperature=1.0):
    """token_logprobs' docstring with full [N, V] logits: (logp, entropy). ``.float()`` is read as "at least
    float32", so float64 inputs give the float64 reference."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logp_all = torch.log_softmax(z, -1)
    return logp_all.gather(-1, targets[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)


def make_inputs(n, width, vocab, dtype, *, logit_std=3.0, bias=True, seed=0, device="cpu"):
    """hidden ~ N(0, 1), weight scaled so that the logits have standard deviation ``logit_std``."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, width, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=gen, dtype=torch.float64) * logit_std / width**0.5
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), targets.to(device), cast(b)


def values_and_grads(fn, hidden, weight, targets, bias, *, seed=1):
    """[logp, entropy, grad_hidden, grad_weight, grad_bias] in float64, for a random cotangent on both outputs."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    logp, entropy = fn(leaves[0], leaves[1], targets, leaves[2])
    gen = torch.Generator().manual_seed(seed)
    cotangent = torch.randn(2, hidden.shape[0], generator=gen, dtype=torch.float64).to(hidden.device)
    ((logp.double() * cotangent[0]).sum() + (entropy.double() * cotangent[1]).sum()).backward()
    out = [logp, entropy] + [x.grad for x in leaves if x is not None]
    return [x.detach().double().cpu() for x in out]


def assert_close(actual, expected, dtype_name, *, what="", condition=1.0):
    """|actual - expected| <= condition · (atol · max|expected| + rtol · |expected|), tolerances from the table.

    The same scaled-atol rule as conformance/checks.py. ``condition`` is 1 except for deliberately
    ill-conditioned inputs, where it is the condition number of the computation (documented at the call).
    """
    tol = tolerance(dtype_name)
    scale = float(expected.abs().max()) or 1.0
    allowed = condition * (tol.atol * scale + tol.rtol * expected.abs())
    excess = (actual - expected).abs() - allowed
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert (excess <= 0).all(), (
        f"{what}: max |diff| {float((actual - expected).abs().max()):.3e} exceeds {dtype_name} tolerance "
        f"(rtol {tol.rtol}, atol {tol.atol}·{scale:.3g}, condition {condition:.3g}) at {int(excess.argmax())}"
    )


OUTPUT_NAMES = ("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias")


def assert_all_close(actual, expected, dtype_name, *, condition=1.0):
    for name, a, e in zip(OUTPUT_NAMES, actual, expected):
        assert_close(a, e, dtype_name, what=name, condition=condition)


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage (bytes) produced by any aten op run under it, backward included."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.nbytes = max(self.nbytes, tensor.untyped_storage().nbytes())
        return out

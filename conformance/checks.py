"""Comparisons of one backend's `Evaluation` with the reference's, quantity by quantity.

Closeness (per element, NumPy `allclose` with a scaled atol):

    |candidate - reference| <= atol · scale + rtol · |reference|

`scale` is max(1, |reference|) for the loss and the metrics (scalars of order one, which may be 0 up to
round-off: a mean of group-normalized advantages is 1e-17 in float64 and 1e-8 in float32), and
max |reference| over the tensor for advantages, returns and gradients (so atol is relative to the
tensor's own size, whatever the cotangent or the logit scale). Non-finite reference entries (NaN,
±inf: e.g. ratio_min over no active token) must be reproduced exactly. A metric or output the
reference has and the candidate lacks (or the reverse) fails; so does a missing gradient.

Every comparison reports `used`: the largest fraction of its tolerance an element consumed (pass iff
<= 1), and `max_abs`: the largest absolute difference.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aha.backends.jax.reference import Evaluation

from .tolerances import Tolerance, conditioning, scaled, tolerance


@dataclass(frozen=True)
class Comparison:
    quantity: str  # "loss", "metric:<name>", "output:<name>", "grad:<name>", "fd:<direction>", "golden:<...>"
    ok: bool
    used: float  # largest fraction of the tolerance consumed (inf when a key or a non-finite pattern differs)
    max_abs: float
    note: str = ""
    scale: float = 1.0  # the atol scale used (max(1, |ref|) for scalars, max|ref| for tensors)


def compare_arrays(quantity: str, candidate, reference, tol: Tolerance, *, scalar: bool) -> Comparison:
    candidate = np.asarray(candidate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if candidate.shape != reference.shape:
        return Comparison(quantity, False, np.inf, np.inf, f"shape {candidate.shape} != {reference.shape}")
    finite = np.isfinite(reference)
    same_nonfinite = np.array_equal(candidate[~finite], reference[~finite], equal_nan=True)
    if not same_nonfinite or not np.all(np.isfinite(candidate[finite])):
        return Comparison(quantity, False, np.inf, np.inf, "non-finite entries differ")
    if not finite.any():
        return Comparison(quantity, True, 0.0, 0.0)
    ref, cand = reference[finite], candidate[finite]
    magnitude = float(np.max(np.abs(ref)))
    scale = max(1.0, magnitude) if scalar else (magnitude if magnitude > 0 else 1.0)
    diff = np.abs(cand - ref)
    allowed = tol.atol * scale + tol.rtol * np.abs(ref)
    ratio = np.where(allowed > 0, diff / np.where(allowed > 0, allowed, 1.0), np.where(diff > 0, np.inf, 0.0))
    used = float(np.max(ratio))
    return Comparison(quantity, used <= 1.0, used, float(np.max(diff)), scale=scale)


def compare_dicts(kind: str, candidate: dict, reference: dict, tol: Tolerance, *, scalar: bool) -> list[Comparison]:
    out = []
    for key in sorted(set(candidate) | set(reference)):
        if key not in candidate or key not in reference:
            side = "candidate" if key not in candidate else "reference"
            out.append(Comparison(f"{kind}:{key}", False, np.inf, np.inf, f"missing in the {side}"))
            continue
        out.append(compare_arrays(f"{kind}:{key}", candidate[key], reference[key], tol, scalar=scalar))
    return out


def compare(
    candidate: Evaluation, reference: Evaluation, dtype: str, *, gradients: bool, logit_magnitude: float = 0.0
) -> list[Comparison]:
    """Loss, every metric, every output and (when `gradients`) every gradient the candidate computes.

    Gradients w.r.t. the logits exist only for backends that materialize them; every other gradient
    the reference has (hidden, weight, bias, values) must be there. The dtype's tolerance is widened by
    `conditioning(logit_magnitude)` for logits beyond the range the table was measured on.
    """
    tol = scaled(tolerance(f"pipeline/{dtype}"), conditioning(logit_magnitude))
    out = [compare_arrays("loss", candidate.loss, reference.loss, tol, scalar=True)]
    out += compare_dicts("metric", candidate.metrics, reference.metrics, tol, scalar=True)
    out += compare_dicts("output", candidate.outputs, reference.outputs, tol, scalar=False)
    if gradients:
        wanted = {k: v for k, v in reference.grads.items() if k != "logits" or "logits" in candidate.grads}
        out += compare_dicts("grad", candidate.grads, wanted, tol, scalar=False)
    return out


def finite_difference(case, reference: Evaluation, *, step: float = 1e-6) -> list[Comparison]:
    """The reference gradient against a central difference of the NumPy float64 value along a random direction.

    d/dε L(x + ε u) at 0 ≈ (L(x + h u) - L(x - h u)) / 2h, u a random direction over hidden, weight, bias and
    the other differentiable inputs; compared with Σ <∇L, u> from `jax.grad` (divided by the cotangent).
    Like every comparison of a case, the tolerance widens with the logits' magnitude (tolerances.conditioning).
    Only for cases whose gradient is the derivative of their value (no stop-gradient tricks: on-policy ratios,
    CISPO's detached weight). Inputs sit RATIO_MARGIN away from every kink, far beyond the step.
    """
    from .backends import evaluate_numpy

    inputs = case.inputs
    rng = np.random.default_rng(case.seed + 1)
    base = {"hidden": inputs.hidden, "weight": inputs.weight, **inputs.params}
    if inputs.bias is not None:
        base["bias"] = inputs.bias
    direction = {k: rng.normal(size=v.shape) for k, v in base.items()}

    def value(sign: float) -> float:
        moved = {k: v + sign * step * direction[k] for k, v in base.items()}
        params = {k: moved[k] for k in inputs.params}
        return float(evaluate_numpy(case, hidden=moved["hidden"], weight=moved["weight"], bias=moved.get("bias"),
                                    params=params).loss)

    numeric = (value(1.0) - value(-1.0)) / (2 * step)
    analytic = sum(float(np.sum(reference.grads[k] * direction[k])) for k in base) / inputs.cotangent
    tol = scaled(tolerance("finite_difference"), conditioning(inputs.logit_magnitude))
    return [compare_arrays("fd:random_direction", numeric, analytic, tol, scalar=True)]


def not_worse_than_naive(
    optimized: list[Comparison], naive: list[Comparison], dtype: str, *, logit_magnitude: float = 0.0
) -> list[Comparison]:
    """The three-way rule (Liger-Kernel's bf16 tests): an optimized kernel's error against the float64
    reference may not exceed the naive same-dtype computation's by more than the "optimized_vs_naive"
    tolerance: max|opt - ref| <= (1 + rtol)·max|naive - ref| + atol·scale, per quantity. Without it a
    fast kernel could spend the whole (necessarily loose) bfloat16 band on its own mistakes.
    """
    tol = scaled(tolerance(f"optimized_vs_naive/{dtype}"), conditioning(logit_magnitude))
    baseline = {c.quantity: c for c in naive}
    out = []
    for comparison in optimized:
        base = baseline.get(comparison.quantity)
        if base is None or not np.isfinite(base.max_abs) or not np.isfinite(comparison.max_abs):
            continue  # a missing key or non-finite pattern already fails the direct comparison
        allowed = (1 + tol.rtol / conditioning(logit_magnitude)) * base.max_abs + tol.atol * comparison.scale
        used = comparison.max_abs / allowed if allowed > 0 else (np.inf if comparison.max_abs > 0 else 0.0)
        out.append(Comparison(f"vs_naive:{comparison.quantity}", used <= 1.0, float(used), comparison.max_abs,
                              note=f"naive |err| {base.max_abs:.2e}", scale=comparison.scale))
    return out

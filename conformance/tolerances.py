"""The one tolerance table of the project. Tests and the conformance suite read it; nothing inlines numbers.

`tolerance(name)` returns a `Tolerance(rtol, atol, source)`. Closeness is NumPy's allclose with a scaled
atol (conformance/checks.py): |x - ref| <= atol·scale + rtol·|ref|, where scale is max(1, |ref|) for
scalars and max|ref| over the tensor for tensors. Every entry says where its numbers come from.
Never loosen an entry to make a failure go away: find the bug, or measure again and say so here.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    source: str


TOLERANCES: dict[str, Tolerance] = {
    # Dtype rows: a backend computing in this dtype against the float64 reference, on inputs that are exact
    # in the dtype (registry.py), for loss, metrics, outputs and gradients. rtol = atol: an element may be off
    # by x·(its own size + the tensor's largest). "Measured": the worst over every case of the exhaustive
    # registry (280) and the default one, all backends, 2026-11-29 (calibrated on one half, confirmed on the other).
    "float64": Tolerance(1e-13, 1e-13, "measured worst 5.5e-15 (torch float64 autograd vs jax.grad, grad:weight of "
                                       "GRPO) x 18; = 450 float64 eps (2.2e-16)"),
    "float32": Tolerance(1e-5, 1e-5, "measured worst 3.0e-6 (torch float32, Online DPO rewards/margins: a "
                                     "difference of sums of ~6 log-probs of size ~25) x 3; = 84 float32 eps (1.2e-7)"),
    "bfloat16": Tolerance(2e-1, 2e-1, "measured worst 8.8e-2 (torch bfloat16, grad:hidden of on-policy DAPO: "
                                      "W_target - E_p[W] nearly cancels where p_target ~ 1, and the logits are "
                                      "rounded to 8 bits) x 2.3; = 51 bfloat16 eps (3.9e-3). Optimized kernels are "
                                      "held tighter by the optimized_vs_naive rule"),
    "printed8": Tolerance(2e-7, 1e-9, "numbers printed to 8 significant digits in spec/*.md: half a unit in "
                                      "the 8th digit is 5e-8 relative; 2e-7 allows for rounded inputs"),
    "finite_difference": Tolerance(1e-8, 1e-8, "jax.grad vs a central difference (step 1e-6) of the NumPy float64 "
                                               "loss along a random direction: measured worst 5.5e-10 x 18"),
    # The three-way rule (checks.not_worse_than_naive): max|opt - ref| <= (1 + rtol)·max|naive - ref| + atol·scale.
    "optimized_vs_naive/float32": Tolerance(1.0, 5e-6, "an optimized kernel may double the naive float32 error "
                                                       "(another summation order) plus 42 float32 eps: measured "
                                                       "worst excess 1.6e-6 (RLOO, exp of a sum of 5 log-ratios) x 3"),
    "optimized_vs_naive/bfloat16": Tolerance(1.0, 2.5e-2, "an optimized kernel may double the naive bfloat16 "
                                                         "error plus 6.4 bfloat16 eps: measured worst excess 1.2e-2 "
                                                         "(triton, Online DPO IPO loss on length-1 rows: triton adds "
                                                         "the bias in float32 where naive rounds h·Wᵀ + b to "
                                                         "bfloat16 once more; naive's errors cancelled by luck) x 2"),
}

LOGIT_MAGNITUDE_MEASURED = 16.0
"""max |logits / temperature| of the cases the dtype rows were measured on (registry: logit std ~2.5,
bias, temperature 0.7). Beyond it, floating-point log-softmax errors grow like eps·max|z| (each logit is
rounded relative to its own size), so `conditioning` widens a dtype's tolerance proportionally."""

def tolerance(name: str) -> Tolerance:
    """The tolerance of a dtype ("float64", "float32", "bfloat16") or of a named check."""
    return TOLERANCES[name]


def conditioning(logit_magnitude: float) -> float:
    """Factor >= 1 by which errors of a log-softmax over logits of this max magnitude exceed the table's."""
    return max(1.0, logit_magnitude / LOGIT_MAGNITUDE_MEASURED)


def scaled(tol: Tolerance, factor: float) -> Tolerance:
    return tol if factor == 1.0 else Tolerance(tol.rtol * factor, tol.atol * factor, f"{tol.source} (x{factor:.3g})")

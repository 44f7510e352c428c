"""The one tolerance table of the project. Tests and the conformance suite read it; nothing inlines numbers.

`tolerance(name)` returns a `Tolerance(rtol, atol, source)`. Two families of rows: the dtype rows
("float64", "float32", "bfloat16") for one operation against a float64 oracle, the "pipeline/<dtype>"
rows for a whole algorithm (what the conformance suite compares); plus named checks. The suite's closeness
rule (conformance/checks.py) is NumPy's allclose with a scaled atol, |x - ref| <= atol·scale + rtol·|ref|,
scale = max(1, |ref|) for scalars and max|ref| over the tensor for tensors. Every entry says where its
numbers come from. Never loosen an entry to make a failure go away: find the bug, or measure again and
say so here.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    source: str


TOLERANCES: dict[str, Tolerance] = {
    # Dtype rows: ONE operation computed in this dtype (logits, log-probs, entropies and their gradients, a loss
    # from exact log-probs) against a float64 oracle, on inputs exact in the dtype. Measured with the scaled-atol
    # rule (|x - ref| <= atol·max|ref| + rtol·|ref|, written x·(max|ref| + |ref|) when rtol = atol) on
    # token_logprobs (naive torch, chunked torch, triton) over every 4th case of the exhaustive registry, 2026-11-29.
    "float64": Tolerance(1e-13, 1e-13, "measured worst 1.5e-15 (one op) and 5.5e-15 (a whole loss and its "
                                       "gradients, pipeline/float64) x 18; = 450 float64 eps (2.2e-16)"),
    "float32": Tolerance(4e-6, 4e-6, "measured worst 7.4e-7 (token_logprobs grad_weight, chunked torch) x 5; "
                                     "= 34 float32 eps (1.2e-7)"),
    "bfloat16": Tolerance(5e-2, 5e-2, "measured worst 2.0e-2 (token_logprobs grad_weight: one bfloat16 rounding "
                                      "of each logit and grad-logit, summed over tokens) x 2.5; = 13 bfloat16 eps"),
    # Pipeline rows (the conformance suite): a whole algorithm in this dtype (advantages, loss, every metric,
    # gradients w.r.t. hidden states, LM head and values) against the JAX float64 reference. Errors amplify
    # through exp of log-ratio sums and cancel in gradients, so these are wider than one op. "Measured": the
    # worst over every case of the exhaustive registry (280) and the default one (68), all backends (calibrated
    # on one half of the exhaustive registry, confirmed on the other, re-measured on all 348 cases).
    "pipeline/float64": Tolerance(1e-13, 1e-13, "measured worst 5.5e-15 (torch float64 autograd vs jax.grad, "
                                                "grad:weight of GRPO) x 18; = 450 float64 eps"),
    "pipeline/float32": Tolerance(1e-5, 1e-5, "measured worst 3.0e-6 (torch float32, Online DPO rewards/margins: "
                                              "a difference of sums of ~6 log-probs of size ~25) x 3; = 84 float32 "
                                              "eps"),
    "pipeline/bfloat16": Tolerance(2e-1, 2e-1, "measured worst 8.8e-2 (torch bfloat16, grad:hidden of on-policy "
                                               "DAPO: W_target - E_p[W] nearly cancels where p_target ~ 1, and the "
                                               "logits are rounded to 8 bits) x 2.3; = 51 bfloat16 eps. Optimized "
                                               "kernels are held tighter by the optimized_vs_naive rule"),
    # Training runs compared step by step (tests/distributed: two processes vs one on the same global batch).
    "adamw_steps/float32": Tolerance(3e-4, 3e-4, "weights after AdamW steps from gradients equal to float32 "
                                                 "rounding, and gradients taken at those weights: measured worst "
                                                 "7.9e-5 (weights after 2 steps, FSDP: an element whose first "
                                                 "gradient, -1.4e-9, is below AdamW's eps 1e-8, where lr·g/(|g|+eps) "
                                                 "turns a reordered float32 sum into a weight change) and 4.0e-5 "
                                                 "(step 2's gradient) x 4. AdamW ignores the gradient's scale, so "
                                                 "the float32 check of the first gradient is what catches a wrong "
                                                 "loss scale"),
    "printed8": Tolerance(2e-7, 1e-9, "numbers printed to 8 significant digits in spec/*.md: half a unit in "
                                      "the 8th digit is 5e-8 relative; 2e-7 allows for rounded inputs"),
    "finite_difference": Tolerance(1e-8, 1e-8, "jax.grad vs a central difference (step 1e-6) of the NumPy float64 "
                                               "loss along a random direction: measured worst 2.0e-9 x 5"),
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

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
    "float64": Tolerance(1e-10, 1e-12, "float64 round-off on O(100)-term sums"),
    "float32": Tolerance(1e-5, 1e-6, "float32 round-off"),
    "bfloat16": Tolerance(2e-2, 2e-2, "bfloat16 8-bit mantissa"),
    "printed8": Tolerance(2e-7, 1e-9, "numbers printed to 8 significant digits in spec/*.md: half a unit in "
                                      "the 8th digit is 5e-8 relative; 2e-7 allows for rounded inputs"),
    "finite_difference": Tolerance(1e-6, 1e-8, "central difference, step 1e-6"),
}


def tolerance(name: str) -> Tolerance:
    """The tolerance of a dtype ("float64", "float32", "bfloat16") or of a named check ("finite_difference")."""
    return TOLERANCES[name]

"""The one tolerance table of the project (placeholder until the conformance helper fills in the sources)."""
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
}


def tolerance(dtype_name: str) -> Tolerance:
    return TOLERANCES[dtype_name]

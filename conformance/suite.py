"""Run the registry's cases through the reference and every available backend; collect the comparisons.

For each case: the JAX float64 reference (values, `jax.grad` gradients); a finite-difference check of
that gradient where the gradient is the derivative of the value; then every candidate backend compared
with the reference at its dtype's tolerance. Golden vectors are checked separately (golden.py).
"""
from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from . import checks
from .backends import REFERENCE, Backend
from .registry import Case

FINITE_DIFFERENCE = "finite-difference"
"""Pseudo-backend name of the check `jax.grad` vs central differences of the NumPy float64 value."""


@dataclass
class Result:
    case: str
    algo: str
    backend: str
    dtype: str
    status: str  # "pass", "fail", "error", "skip"
    comparisons: list[checks.Comparison] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> list[checks.Comparison]:
        return [c for c in self.comparisons if not c.ok]


def _judge(case: Case, backend: str, dtype: str, comparisons: list[checks.Comparison], seconds: float) -> Result:
    status = "pass" if all(c.ok for c in comparisons) else "fail"
    return Result(case.name, case.algo, backend, dtype, status, comparisons, seconds=seconds)


def _error(case: Case, backend: str, dtype: str, exc: BaseException) -> Result:
    line = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return Result(case.name, case.algo, backend, dtype, "error", note=line)


def run(
    cases: list[Case],
    backends: list[Backend],
    *,
    progress: Callable[[Result], None] | None = None,
) -> list[Result]:
    """All results, one per (case, backend) plus one finite-difference result per eligible case."""
    results: list[Result] = []

    def record(result: Result) -> None:
        results.append(result)
        if progress:
            progress(result)

    for case in cases:
        start = time.perf_counter()
        try:
            reference = REFERENCE.evaluate(case)
        except Exception as exc:  # the reference itself fails: every comparison of this case fails
            for backend in [REFERENCE, *backends]:
                record(_error(case, backend.name, backend.dtype, exc))
            continue
        record(Result(case.name, case.algo, REFERENCE.name, "float64", "pass",
                      seconds=time.perf_counter() - start))
        if case.problem.value_gradient_agree(case):
            start = time.perf_counter()
            try:
                record(_judge(case, FINITE_DIFFERENCE, "float64", checks.finite_difference(case, reference),
                              time.perf_counter() - start))
            except Exception as exc:
                record(_error(case, FINITE_DIFFERENCE, "float64", exc))
        naive: dict[str, list[checks.Comparison]] = {}
        for backend in backends:
            reason = backend.unavailable or backend.skip_reason(case)
            if reason:
                record(Result(case.name, case.algo, backend.name, backend.dtype, "skip", note=reason))
                continue
            start = time.perf_counter()
            try:
                candidate = backend.evaluate(case)
                comparisons = checks.compare(candidate, reference, backend.dtype, gradients=backend.gradients,
                                             logit_magnitude=case.inputs.logit_magnitude)
                if backend.naive:
                    naive[backend.dtype] = comparisons
                elif backend.optimized and backend.dtype in naive:
                    comparisons += checks.not_worse_than_naive(
                        comparisons, naive[backend.dtype], backend.dtype,
                        logit_magnitude=case.inputs.logit_magnitude)
            except Exception as exc:
                record(_error(case, backend.name, backend.dtype, exc))
                continue
            record(_judge(case, backend.name, backend.dtype, comparisons, time.perf_counter() - start))
    return results

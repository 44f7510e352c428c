"""The report of one target run (targets.py): a table per config variant, the failures, and JSON.

A variant's status: "pass" when every case of it that the target supports passes (and at least one does),
"FAIL" when any fails or errors, "unsupported" when the target supports none of its cases.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

from .report import failure_detail, fmt_error
from .suite import Result
from .targets import UNSUPPORTED


def split_name(case: str) -> tuple[str, str, str, str]:
    """"algo/variant/shape/edge" -> its four parts."""
    algo, variant, shape, edge = case.split("/")
    return algo, variant, shape, edge


def _worst(results: list[Result], *, failed: bool = False) -> tuple[float, float, str]:
    """(largest tolerance fraction used, largest |difference|, the quantity that used most), over every comparison
    or, with `failed`, over the failing ones only."""
    used, max_abs, quantity = 0.0, 0.0, ""
    for result in results:
        for comparison in (result.failed if failed else result.comparisons):
            if comparison.used > used:
                used, quantity = comparison.used, comparison.quantity
            max_abs = max(max_abs, comparison.max_abs)
    return used, max_abs, quantity


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x


def _status(rows: list[Result]) -> str:
    if any(r.status in ("fail", "error") for r in rows):
        return "FAIL"
    return "pass" if any(r.status == "pass" for r in rows) else UNSUPPORTED


def _failed_quantities(rows: list[Result]) -> list[str]:
    names = {c.quantity for r in rows for c in r.failed} | {"error" for r in rows if r.status == "error"}
    return sorted(names)


@dataclass
class TargetReport:
    target: str
    adapter: str
    algo: str
    dtype: str
    covers: str
    results: list[Result]
    seconds: float

    @property
    def counts(self) -> dict[str, int]:
        count = lambda *s: sum(r.status in s for r in self.results)  # noqa: E731
        return {"passed": count("pass"), "failed": count("fail", "error"), UNSUPPORTED: count(UNSUPPORTED)}

    @property
    def ok(self) -> bool:
        """Every supported case passes, and at least one case is supported."""
        counts = self.counts
        return counts["failed"] == 0 and counts["passed"] > 0

    def by_variant(self) -> dict[str, list[Result]]:
        groups: dict[str, list[Result]] = defaultdict(list)
        for result in self.results:
            groups[split_name(result.case)[1]].append(result)
        return dict(groups)

    def failing_variants(self) -> list[str]:
        return [v for v, rows in self.by_variant().items() if _status(rows) == "FAIL"]

    def table(self) -> str:
        counts = self.counts
        lines = [f"aha conformance: target {self.target} (adapter {self.adapter}, {self.dtype}), {self.algo}: "
                 f"{len(self.results)} cases, {self.seconds:.1f} s",
                 f"compares: {self.covers}",
                 "used: the largest fraction of its tolerance any compared element consumed (<= 1 passes); used and "
                 "max |err| of a failing variant are over its failing quantities", ""]
        width = max([len(v) for v in self.by_variant()] + [7])
        lines.append(f"{'variant':<{width}}  {'status':<11} {'pass':>4} {'fail':>4} {'unsup':>5} {'used':>9} "
                     f"{'max |err|':>9}  failing quantities (edges) / why unsupported")
        for variant, rows in self.by_variant().items():
            count = lambda *s: sum(r.status in s for r in rows)  # noqa: E731
            status = _status(rows)
            used, max_abs, _ = _worst([r for r in rows if r.status != UNSUPPORTED], failed=status == "FAIL")
            if status == "FAIL":
                edges = sorted({split_name(r.case)[3] for r in rows if r.status in ("fail", "error")})
                detail = f"{', '.join(_failed_quantities(rows))} ({', '.join(edges)})"
            else:
                detail = "; ".join(sorted({r.note for r in rows if r.status == UNSUPPORTED}))
            lines.append(f"{variant:<{width}}  {status:<11} {count('pass'):>4} {count('fail', 'error'):>4} "
                         f"{count(UNSUPPORTED):>5} {fmt_error(used):>9} {fmt_error(max_abs):>9}  {detail}")
        lines += ["", f"{counts['passed']} passed, {counts['failed']} failed, {counts[UNSUPPORTED]} unsupported "
                      f"(cases: algo/variant/shape/edge)"]
        return "\n".join(lines)

    def failures(self, limit: int = 30) -> str:
        bad = [r for r in self.results if r.status in ("fail", "error")]
        lines = [f"{len(bad)} failing cases" + (f"; first {limit}:" if len(bad) > limit else ":")]
        for result in bad[:limit]:
            lines.append(f"  {result.case}: {failure_detail(result)}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """Counts, one entry per variant (status, counts, worst tolerance use, why unsupported), every failing case."""
        from .report import _environment

        variants = {}
        for variant, rows in self.by_variant().items():
            status = _status(rows)
            used, max_abs, quantity = _worst([r for r in rows if r.status != UNSUPPORTED], failed=status == "FAIL")
            variants[variant] = {
                "status": status, "passed": sum(r.status == "pass" for r in rows),
                "failed": sum(r.status in ("fail", "error") for r in rows),
                UNSUPPORTED: sum(r.status == UNSUPPORTED for r in rows),
                "worst_tolerance_used": _finite(used), "max_abs_error": _finite(max_abs), "worst_quantity": quantity,
                "failing_quantities": _failed_quantities(rows),
                "unsupported_because": sorted({r.note for r in rows if r.status == UNSUPPORTED}),
            }
        return {
            "ok": self.ok, "target": self.target, "target_version": _version_of(self.target),
            "adapter": self.adapter, "algo": self.algo, "dtype": self.dtype, "compares": self.covers,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": round(self.seconds, 2),
            "environment": _environment(), "counts": self.counts, "variants": variants,
            "failures": [_row(r) for r in self.results if r.status in ("fail", "error")],
        }

    def write(self, path: str) -> None:
        with open(path, "w") as handle:
            json.dump(self.to_json(), handle, indent=1)
            handle.write("\n")


def _row(result: Result) -> dict:
    used, max_abs, quantity = _worst([result])
    return {
        "case": result.case, "status": result.status, "note": result.note,
        "worst_tolerance_used": _finite(used), "max_abs_error": _finite(max_abs), "worst_quantity": quantity,
        "failed": [{"quantity": c.quantity, "used": _finite(c.used), "max_abs": _finite(c.max_abs), "note": c.note}
                   for c in result.failed],
    }


def _version_of(target: str) -> str | None:
    """The installed version of the distribution that provides the target's top-level package."""
    top = target.split(":")[0].split(".")[0]
    for dist in importlib.metadata.packages_distributions().get(top, []):
        return f"{dist} {importlib.metadata.version(dist)}"
    return None

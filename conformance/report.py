"""The suite's output: one table per algorithm and backend, and a JSON report."""
from __future__ import annotations

import json
import math
import platform
from collections import defaultdict
from datetime import datetime, timezone

from .suite import Result
from .tolerances import TOLERANCES


def _worst(results: list[Result]) -> tuple[float, float, str]:
    """(largest tolerance fraction used, largest absolute difference, the quantity that used most)."""
    used, max_abs, quantity = 0.0, 0.0, ""
    for result in results:
        for comparison in result.comparisons:
            if comparison.used > used:
                used, quantity = comparison.used, f"{comparison.quantity} ({result.case})"
            max_abs = max(max_abs, comparison.max_abs)
    return used, max_abs, quantity


def fmt_error(x: float) -> str:
    """An error or tolerance use for the tables: 2 significant digits, "-" for zero."""
    return "-" if x == 0 else ("inf" if math.isinf(x) else f"{x:.2e}")


def table(results: list[Result]) -> str:
    """Rows per (algorithm, backend): cases passed / failed (errors included) / skipped, worst tolerance use,
    max |error|. 'used' is the largest fraction of the tolerance any element consumed (<= 1 passes)."""
    groups: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for result in results:
        groups[(result.algo, result.backend)].append(result)
    header = f"{'backend':<22} {'dtype':<9} {'passed':>6} {'failed':>6} {'skipped':>7} {'used':>9} {'max |err|':>9}"
    lines = ["used: the largest fraction of its tolerance any compared element consumed (<= 1 passes); "
             "max |err|: the largest absolute difference"]
    for algo in sorted({a for a, _ in groups}):
        lines += ["", f"== {algo} ==", header]
        for (a, backend), rows in groups.items():
            if a != algo:
                continue
            count = lambda *s: sum(r.status in s for r in rows)  # noqa: E731
            used, max_abs, _ = _worst([r for r in rows if r.status != "skip"])
            lines.append(f"{backend:<22} {rows[0].dtype:<9} {count('pass'):>6} {count('fail', 'error'):>6} "
                         f"{count('skip'):>7} {fmt_error(used):>9} {fmt_error(max_abs):>9}")
            unavailable = {r.note for r in rows if r.status == "skip" and len(rows) == count("skip")}
            if unavailable:
                lines[-1] += f"   ({unavailable.pop()})"
    return "\n".join(lines)


def failures(results: list[Result], limit: int = 30) -> str:
    bad = [r for r in results if r.status in ("fail", "error")]
    lines = [f"{len(bad)} failing (case, backend) pairs" + (f"; first {limit}:" if len(bad) > limit else ":")]
    for result in bad[:limit]:
        lines.append(f"  {result.backend:<20} {result.case}: {failure_detail(result)}")
    return "\n".join(lines)


def failure_detail(result: Result) -> str:
    """Why one (case, backend) failed: its note, or the first failing quantities with their errors."""
    return result.note or "; ".join(
        f"{c.quantity} used {fmt_error(c.used)} |err| {fmt_error(c.max_abs)}{' ' + c.note if c.note else ''}"
        for c in result.failed[:4])


def _environment() -> dict:
    import numpy

    from aha import __version__

    versions = {"aha": __version__, "python": platform.python_version(), "numpy": numpy.__version__}
    for name in ("jax", "torch", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def to_json(results: list[Result], *, seconds: float, extra: dict | None = None) -> dict:
    summary: dict[str, dict[str, dict[str, int | float]]] = defaultdict(dict)
    groups: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for result in results:
        groups[(result.algo, result.backend)].append(result)
    for (algo, backend), rows in groups.items():
        used, max_abs, quantity = _worst([r for r in rows if r.status != "skip"])
        summary[algo][backend] = {
            "passed": sum(r.status == "pass" for r in rows),
            "failed": sum(r.status in ("fail", "error") for r in rows),
            "skipped": sum(r.status == "skip" for r in rows),
            "worst_tolerance_used": None if math.isinf(used) else used,
            "max_abs_error": None if math.isinf(max_abs) else max_abs,
            "worst_quantity": quantity,
        }

    def row(result: Result) -> dict:
        used, max_abs, quantity = _worst([result])
        return {
            "case": result.case, "backend": result.backend, "dtype": result.dtype, "status": result.status,
            "note": result.note, "seconds": round(result.seconds, 4),
            "worst_tolerance_used": None if math.isinf(used) else used,
            "max_abs_error": None if math.isinf(max_abs) else max_abs, "worst_quantity": quantity,
            "failed": [{"quantity": c.quantity, "used": None if math.isinf(c.used) else c.used,
                        "max_abs": None if math.isinf(c.max_abs) else c.max_abs, "note": c.note}
                       for c in result.failed],
        }

    return {
        "ok": not any(r.status in ("fail", "error") for r in results),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
        "environment": _environment(),
        "tolerances": {k: {"rtol": v.rtol, "atol": v.atol, "source": v.source} for k, v in TOLERANCES.items()},
        "summary": summary,
        **(extra or {}),
        "results": [row(r) for r in results],
    }


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1)
        handle.write("\n")

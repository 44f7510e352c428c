"""`python -m aha.conformance` and `aha conformance`: run the suite, print the tables, write a JSON report.

Exit status 0 only if every comparison passes (skips are not failures; the table says why they skip).
With --target or --adapter, the registry runs against another implementation instead (targets.py): exit
status 0 only if every case the target supports passes, 1 if any fails, 2 if it supports none.
"""
from __future__ import annotations

import argparse
import sys
import time

from . import golden, registry, report, suite
from .backends import candidate_backends


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aha conformance", description=__doc__.splitlines()[0])
    p.add_argument("--algo", action="append", choices=sorted(registry.problems.PROBLEMS),
                   help="only this algorithm (repeatable; default all)")
    p.add_argument("--backend", action="append", metavar="NAME",
                   help="only backends whose name contains NAME (repeatable; the reference always runs)")
    p.add_argument("--quick", action="store_true", help="a deterministic subset of the cases (every edge kept)")
    p.add_argument("--exhaustive", action="store_true",
                   help="the full product of every config dimension instead of the all-pairs covering subset")
    p.add_argument("--every-edge", action="store_true",
                   help="every config variant on every edge case (instead of one shape and edge per variant)")
    target = p.add_argument_group("another implementation (targets.py)")
    target.add_argument("--target", metavar="MODULE[:ATTR]",
                        help="check this object against the spec (default: the adapter's default target)")
    target.add_argument("--adapter", metavar="NAME|MODULE:ATTR",
                        help="how to call the target: aha (default: aha's loss signature), aha-advantages, "
                             "liger-grpo, liger-dpo, verl-grpo, verl-rloo, verl-ppo, or an adapter object")
    target.add_argument("--dtype", choices=("float64", "float32", "bfloat16"),
                        help="the dtype the target runs in (default: the adapter's)")
    p.add_argument("--report", metavar="PATH", help="write the JSON report here")
    p.add_argument("--device", default="cpu", help="where the torch backends run: cpu (default) or cuda")
    p.add_argument("--no-golden", action="store_true", help="skip the golden-vector check")
    p.add_argument("--list", action="store_true", help="list the cases and backends, run nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="print every failing comparison")
    return p


def _one_torch_thread() -> None:
    """The suite multiplies tiny matrices: extra intra-op threads only spin-wait on a shared CPU."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.target or args.adapter:
        return _check_target(args)
    cases = registry.all_cases(args.algo, exhaustive=args.exhaustive, every_edge=args.every_edge)
    if args.quick:
        cases = registry.quick_cases(cases)
    backends = [b for b in candidate_backends(args.device)
                if not args.backend or any(name in b.name for name in args.backend)]
    if args.list:
        for case in cases:
            print(case.name)
        for backend in backends:
            why = f": {backend.unavailable}" if backend.unavailable else ""
            print(f"backend {backend.name} ({backend.dtype}){why}")
        return 0

    _one_torch_thread()
    start = time.perf_counter()
    results = suite.run(cases, backends)
    if not args.no_golden:
        results += golden.check(args.algo)
    seconds = time.perf_counter() - start

    print(f"aha conformance: {len(cases)} cases, {len(backends)} candidate backends, {seconds:.1f} s")
    print(report.table(results))
    ok = not any(r.status in ("fail", "error") for r in results)
    if not ok:
        print()
        print(report.failures(results, limit=10**6 if args.verbose else 30))
    if args.report:
        extra = {"cases": len(cases), "device": args.device}
        report.write_json(args.report, report.to_json(results, seconds=seconds, extra=extra))
        print(f"report: {args.report}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def _check_target(args) -> int:
    from .targets import check_target

    if args.algo and len(args.algo) > 1:
        print("aha conformance: --target checks one --algo at a time", file=sys.stderr)
        return 2
    _one_torch_thread()
    try:
        result = check_target(args.target, algo=args.algo[0] if args.algo else None, adapter=args.adapter or "aha",
                              dtype=args.dtype, quick=args.quick, exhaustive=args.exhaustive,
                              every_edge=args.every_edge, report=args.report)
    except (ImportError, ValueError) as exc:  # a target or adapter that cannot load, a wrong --algo
        print(f"aha conformance: {exc}", file=sys.stderr)
        return 2
    print(result.table())
    if result.counts["failed"]:
        print()
        print(result.failures(limit=10**6 if args.verbose else 30))
    if args.report:
        print(f"report: {args.report}")
    print("PASS" if result.ok else ("FAIL" if result.counts["failed"] else "NOTHING COMPARED"))
    return 0 if result.ok else (1 if result.counts["failed"] else 2)


if __name__ == "__main__":
    sys.exit(main())

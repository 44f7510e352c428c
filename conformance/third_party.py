"""The committed reports on third-party implementations: one command regenerates them all.

    python -m aha.conformance.third_party                 # conformance/reports/<package>.json + the tables
    python -m aha.conformance.third_party --only verl     # one package

Each run: every config variant of the registry (`exhaustive`) on every edge case (`every_edge`), in the
adapter's dtype: the ready adapters support some variants only, and the default selection (an all-pairs
covering subset, one shape and edge per variant) would leave supported combinations and edges untested.
A package that does not import is reported as such (its file is left as it was).
docs/conformance_third_party.md reads the results.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .targets import check_target

RUNS: dict[str, tuple[str, ...]] = {
    "liger-kernel": ("liger-grpo", "liger-dpo"),
    "verl": ("verl-grpo", "verl-rloo", "verl-ppo"),
}
"""Package (report file name) -> the ready adapters (adapters/) that check it."""
COMMAND = "python -m aha.conformance.third_party"


def reports_dir() -> Path:
    return Path(__file__).resolve().parent / "reports"


def write_package(package: str, out: Path) -> bool:
    """Run the adapters of one package, print their tables, write out/<package>.json; False if it won't import."""
    from .adapters import resolve

    runs = []
    for name in RUNS[package]:
        adapter = resolve(name)
        try:
            importlib.import_module(adapter.default_target.partition(":")[0])
        except ImportError as exc:
            print(f"{package}: not importable ({exc}); {out / (package + '.json')} left as it was")
            return False
        report = check_target(adapter=adapter, exhaustive=True, every_edge=True)
        print(report.table())
        if report.counts["failed"]:
            print(report.failures(limit=12))
        print()
        runs.append(report.to_json())
    payload = {"package": package, "version": runs[0]["target_version"], "command": COMMAND, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{package}.json", "w") as handle:
        json.dump(payload, handle, indent=1)
        handle.write("\n")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(RUNS), help="this package only (repeatable)")
    parser.add_argument("--out", type=Path, default=reports_dir(), help="folder of the JSON reports")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # tiny matrices: extra threads only spin-wait on a shared CPU
    written = [write_package(package, args.out) for package in (args.only or RUNS)]
    return 0 if all(written) else 2


if __name__ == "__main__":
    sys.exit(main())

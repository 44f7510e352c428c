"""The suite end to end: a subset passes on every backend, the CLI writes its report, the goldens hold."""
import json

import pytest

from aha.conformance import backends, golden, registry, suite
from aha.conformance.cli import main


def _subset(per_algo=2):
    cases, seen = [], {}
    for case in registry.all_cases():
        if seen.setdefault(case.algo, 0) < per_algo:
            seen[case.algo] += 1
            cases.append(case)
    return cases


def test_a_subset_passes_on_every_available_backend():
    available = [b for b in backends.candidate_backends() if not b.unavailable]
    results = suite.run(_subset(), available)
    bad = [(r.case, r.backend, r.note, [c.quantity for c in r.failed]) for r in results
           if r.status in ("fail", "error")]
    assert not bad
    compared = {r.backend for r in results if r.status == "pass"}
    assert {"numpy-float64", "torch-float64", "torch-naive-float32", "torch-fused-bfloat16"} <= compared
    fused = [r for r in results if r.backend == "torch-fused-float32" and r.status == "pass"]
    assert any(c.quantity.startswith("vs_naive:") for r in fused for c in r.comparisons)
    assert any(r.backend == suite.FINITE_DIFFERENCE for r in results)


def test_golden_vectors_are_reproduced():
    results = golden.check()
    assert {r.algo for r in results} == {"grpo", "rloo", "ppo", "online_dpo"}
    assert [r.case for r in results if r.status != "pass"] == []


def test_golden_vectors_carry_their_provenance():
    for algo in ("grpo", "rloo", "ppo", "online_dpo"):
        payload = json.loads((golden.vectors_dir() / f"{algo}.json").read_text())
        provenance = payload["provenance"]
        assert provenance["generator"] == golden.GENERATOR
        assert {"aha", "numpy", "jax", "date", "python"} <= set(provenance)
        assert payload["vectors"]


def test_cli_prints_tables_writes_a_report_and_exits_zero(tmp_path, capsys):
    path = tmp_path / "report.json"
    assert main(["--algo", "ppo", "--quick", "--backend", "numpy", "--report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "== ppo ==" in out and "numpy-float64" in out and "golden" in out and out.strip().endswith("PASS")
    report = json.loads(path.read_text())
    assert report["ok"] is True
    assert report["summary"]["ppo"]["numpy-float64"]["failed"] == 0
    assert set(report["tolerances"]) >= {"float64", "float32", "bfloat16"}


def test_cli_lists_cases_and_backends(capsys):
    assert main(["--list", "--algo", "rloo"]) == 0
    out = capsys.readouterr().out
    assert out.count("rloo/") >= registry.MIN_CASES_PER_ALGO and "backend jax" not in out


@pytest.mark.parametrize("argv", [["--algo", "nope"]])
def test_cli_rejects_unknown_algorithms(argv):
    with pytest.raises(SystemExit):
        main(argv)

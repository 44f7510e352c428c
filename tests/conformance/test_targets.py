"""Conformance for anyone (targets.py): aha's own functions pass through the adapters, deliberately wrong targets
fail with the right variant named, unsupported cases never pass, and the ready Liger-Kernel and verl adapters run
on small cases (skipped with the reason when the package is not installed)."""
import json
import sys
import types

import numpy as np
import pytest

from aha.conformance import check_target, registry
from aha.conformance.cli import main
from aha.conformance.target_report import split_name
from aha.conformance.targets import Output, load, run
from aha.conformance.tolerances import tolerance

LIGER = "liger-kernel is not installed (pip install 'aha-rl[liger]')"
VERL = "verl.trainer.ppo.core_algos does not import (see docs/conformance_third_party.md: pip install --no-deps verl)"


def _value(variant: str, dimension: str) -> str:
    return dict(part.split("=", 1) for part in variant.split(","))[dimension]


# ------------------------------------------------------------------------------------------------
# aha's own functions, and wrong ones
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["grpo", "ppo", "online_dpo"])
def test_aha_loss_passes_through_the_aha_adapter(algo):
    report = check_target(f"aha.algos.{algo}:loss", algo=algo, quick=True)
    assert report.ok and report.counts["failed"] == report.counts["unsupported"] == 0
    compared = {c.quantity for r in report.results for c in r.comparisons}
    assert {"loss", "grad:hidden", "grad:weight"} <= compared and any(q.startswith("metric:") for q in compared)
    if algo == "ppo":
        assert "grad:values" in compared


def test_aha_advantages_pass_through_the_advantages_adapter():
    report = check_target("aha.algos.rloo:advantages", algo="rloo", adapter="aha-advantages", quick=True)
    assert report.ok
    assert {c.quantity for r in report.results for c in r.comparisons} == {"output:advantages"}


def batch_mean_when_batch_scaled(rewards, *, num_generations, config):
    """GRPO advantages with a classic bug: scale_rewards="batch" also centres by the batch mean (not the group's)."""
    from aha.algos import grpo

    advantages = grpo.advantages(rewards, num_generations=num_generations, config=config)
    if config.scale_rewards != "batch":
        return advantages
    rewards, advantages = np.asarray(rewards, np.float64), np.asarray(advantages, np.float64)
    group_means = np.nanmean(rewards.reshape(-1, num_generations), axis=1).repeat(num_generations)
    shift = (group_means - np.nanmean(rewards)) / (np.nanstd(rewards, ddof=config.std_ddof) + config.advantage_epsilon)
    return np.where(np.isnan(rewards), 0.0, advantages + shift)


def test_batch_mean_instead_of_group_mean_fails_exactly_the_batch_scaled_variants():
    report = check_target(batch_mean_when_batch_scaled, algo="grpo", adapter="aha-advantages")
    failing = report.failing_variants()
    batch_scaled = [v for v in report.by_variant() if _value(v, "scale") == "batch"]
    assert failing and sorted(failing) == sorted(batch_scaled)
    assert {c.quantity for r in report.results for c in r.failed} == {"output:advantages"}
    lines = [line for line in report.table().splitlines() if line.startswith(tuple(failing))]
    assert len(lines) == len(failing) and all(" FAIL " in line and "output:advantages" in line for line in lines)


def dr_grpo_over_token_count(logp, old_logp, ref_logp, advantages, mask, *, config, num_items_in_batch=None,
                             importance_sampling_ratio=None):
    """The GRPO loss with dr_grpo normalized by the active-token count instead of B · max_completion_length."""
    import dataclasses

    from aha.algos import grpo

    if config.loss_type == "dr_grpo":
        config = dataclasses.replace(config, loss_type="bnpo")
    return grpo.loss(logp, old_logp, ref_logp, advantages, mask, config=config, num_items_in_batch=num_items_in_batch,
                     importance_sampling_ratio=importance_sampling_ratio)


def test_wrong_normalizer_fails_exactly_the_dr_grpo_variants_on_the_loss():
    report = check_target(dr_grpo_over_token_count, algo="grpo", quick=True)
    failing = report.failing_variants()
    assert failing and all(_value(v, "loss") == "dr_grpo" for v in failing)
    assert "loss" in {c.quantity for r in report.results for c in r.failed}
    passing = [v for v in report.by_variant() if v not in failing]
    assert passing and all(_value(v, "loss") != "dr_grpo" for v in passing)


class _NothingSupported:
    name, algos, default_target, dtype, covers = "nothing", ("grpo",), "aha.algos.grpo:loss", "float64", "nothing"

    def supports(self, case):
        return "this adapter supports nothing"

    def __call__(self, target, call):
        raise AssertionError("never called")


def test_unsupported_cases_are_reported_and_never_pass():
    report = check_target(adapter=_NothingSupported(), quick=True)
    assert not report.ok and report.counts["passed"] == 0
    assert {r.status for r in report.results} == {"unsupported"}
    assert {v["status"] for v in report.to_json()["variants"].values()} == {"unsupported"}


def test_a_target_without_the_metric_the_adapter_names_fails():
    class Renamed:
        name, algos, default_target, dtype, covers = "renamed", ("grpo",), "aha.algos.grpo:loss", "float64", "-"

        def supports(self, case):
            return None

        def __call__(self, target, call):
            from aha.conformance.adapters.aha import LOSS

            out = LOSS(target, call)
            return Output(loss=out.loss, metrics={"clip_fraction": out.metrics["clip_ratio/region_mean"]})

    from aha.algos import grpo

    results = run(grpo.loss, Renamed(), registry.all_cases(["grpo"])[:1])
    assert results[0].status == "fail"
    assert [c.note for c in results[0].failed] == ["missing in the reference"]


def test_cli_checks_a_target_writes_json_and_exits_by_the_outcome(tmp_path, capsys, monkeypatch):
    module = types.ModuleType("wrong_grpo")
    module.advantages = batch_mean_when_batch_scaled
    monkeypatch.setitem(sys.modules, "wrong_grpo", module)
    path = tmp_path / "report.json"
    argv = ["--target", "aha.algos.grpo:advantages", "--algo", "grpo", "--adapter", "aha-advantages", "--quick"]
    assert main(argv + ["--report", str(path)]) == 0
    assert capsys.readouterr().out.strip().endswith("PASS")
    payload = json.loads(path.read_text())
    assert payload["ok"] and payload["adapter"] == "aha-advantages" and payload["variants"]
    assert main(["--target", "wrong_grpo:advantages", "--algo", "grpo", "--adapter", "aha-advantages"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "scale=batch" in out.split("failing cases")[1]
    assert main(["--adapter", "aha", "--algo", "grpo", "--algo", "ppo"]) == 2
    assert main(["--target", "no_such_module:loss", "--algo", "grpo"]) == 2


def test_every_edge_pairs_each_variant_with_every_edge():
    cases = registry.all_cases(["ppo"], every_edge=True)
    by_variant: dict = {}
    for case in cases:
        by_variant.setdefault(case.variant, set()).add(case.edge)
    problem = registry.problems.PROBLEMS["ppo"]
    assert all(edges == set(problem.edges) for edges in by_variant.values())
    assert len({c.name for c in cases}) == len(cases)


# ------------------------------------------------------------------------------------------------
# Liger-Kernel and verl: the ready adapters on small cases
# ------------------------------------------------------------------------------------------------

def _quantities(report, status):
    return {c.quantity for r in report.results if r.status == status for c in (r.failed if status == "fail"
                                                                                  else r.comparisons)}


def test_liger_grpo_agrees_except_the_sequence_level_clip_fraction():
    pytest.importorskip("liger_kernel", reason=LIGER)
    report = check_target(adapter="liger-grpo", quick=True)
    assert report.counts["passed"] > 0
    assert {"loss", "grad:hidden", "grad:weight", "metric:kl"} <= _quantities(report, "pass")
    assert _quantities(report, "fail") <= {"metric:clip_ratio/region_mean"}
    assert all(_value(split_name(r.case)[1], "level") == "sequence" for r in report.results if r.status == "fail")
    unsupported = [r for r in report.results if r.status == "unsupported"]
    assert all("loss=cispo" in r.case and "level=sequence" in r.case for r in unsupported)


def test_liger_dpo_agrees_on_the_sigmoid_loss():
    pytest.importorskip("liger_kernel", reason=LIGER)
    report = check_target(adapter="liger-dpo", quick=True)
    assert report.ok
    assert {"loss", "grad:hidden", "grad:weight", "metric:rewards/margins"} <= _quantities(report, "pass")
    assert all("loss=ipo" in r.case or "valid pair" in r.note for r in report.results if r.status == "unsupported")


def test_liger_reference_model_reproduces_the_reference_sums():
    torch = pytest.importorskip("torch")
    from aha.conformance.adapters.liger import _reference_model

    sums = torch.tensor([-0.01, -1.0, -3000.0, 0.0], dtype=torch.float64)
    targets = torch.tensor([[1, 2, 0], [3, 1, 1], [0, 0, 2], [1, 1, 1]])
    active = torch.tensor([[True, True, False], [False, True, True], [True, True, True], [False, False, False]])
    ref_input, ref_weight = _reference_model(sums, targets, active, 5, torch.float64)
    logp = torch.log_softmax(ref_input @ ref_weight.T, -1).gather(-1, targets[..., None])[..., 0]
    tol = tolerance("float64")
    np.testing.assert_allclose((logp * active).sum(-1).numpy(), sums.numpy(), rtol=tol.rtol, atol=tol.atol)


def test_verl_grpo_agrees_except_the_sequence_level_clip_fraction():
    pytest.importorskip("verl.trainer.ppo.core_algos", reason=VERL)
    report = check_target(adapter="verl-grpo", quick=True)
    assert report.counts["passed"] > 0
    assert {"loss", "grad:hidden", "output:advantages"} <= _quantities(report, "pass")
    assert _quantities(report, "fail") <= {"metric:clip_ratio/region_mean"}
    assert all(_value(split_name(r.case)[1], "level") == "sequence" for r in report.results if r.status == "fail")


def test_verl_rloo_advantages_agree():
    pytest.importorskip("verl.trainer.ppo.core_algos", reason=VERL)
    report = check_target(adapter="verl-rloo", quick=True)
    assert report.ok and _quantities(report, "pass") == {"output:advantages"}


def test_verl_ppo_agrees_with_k1_and_clamps_k3_on_far_ratios():
    """verl's low_var_kl clamps k3 at 10 (core_algos.kl_penalty_forward); the spec's k3 is unclamped."""
    pytest.importorskip("verl.trainer.ppo.core_algos", reason=VERL)
    from aha.conformance.adapters import resolve

    adapter = resolve("verl-ppo")
    cases = [c for c in registry.all_cases(["ppo"], every_edge=True)
             if adapter.supports(c) is None and c.config.dual_clip is None and c.edge in ("generic", "far_ratios")]
    results = {(c.config.kl_estimator, c.edge): r
               for c, r in zip(cases, run(load(adapter.default_target), adapter, cases))}
    assert {k: r.status for k, r in results.items()} == {("k1", "generic"): "pass", ("k1", "far_ratios"): "pass",
                                                          ("k3", "generic"): "pass", ("k3", "far_ratios"): "fail"}
    assert "loss" in {c.quantity for c in results[("k3", "far_ratios")].failed}

"""The suite can fail: deliberately perturbed losses are caught.

Each perturbation wraps a plain torch backend (or, for the golden check, `aha.algos` itself);
the same cases pass unperturbed, so the failure is the perturbation's and nothing else's.
"""
import dataclasses
from contextlib import contextmanager
from unittest import mock

import pytest

from aha.conformance import backends, golden, problems, registry, suite


def _cases(algo, *, count=None):
    return registry.all_cases([algo])[:count]


def _plain(dtype="float32"):
    name = "torch-float64" if dtype == "float64" else f"torch-naive-{dtype}"
    return next(b for b in backends.candidate_backends() if b.name == name)


def _perturbed(patch, dtype="float32"):
    base = _plain(dtype)

    def evaluate(case):
        with patch(case):
            return base.evaluate(case)

    return dataclasses.replace(base, name="perturbed", evaluate=evaluate)


def _statuses(cases, backend):
    return {r.status for r in suite.run(cases, [backend]) if r.backend == backend.name}


@contextmanager
def _epsilon_plus(case, amount=1e-3):
    """The clip range ε widened by 1e-3 inside the loss (a typo-sized bug in a config default)."""
    problem, original = case.problem, case.problem.loss

    def loss(logp, params, data, prepared, config):
        return original(logp, params, data, prepared, dataclasses.replace(config, epsilon=config.epsilon + amount))

    with mock.patch.object(problem, "loss", loss):
        yield


@contextmanager
def _mask_shifted(case):
    """The completion mask shifted right by one position inside the loss (the classic off-by-one)."""
    import torch

    problem, original = case.problem, case.problem.loss

    def loss(logp, params, data, prepared, config):
        return original(logp, params, {**data, "mask": torch.roll(data["mask"], 1, dims=1)}, prepared, config)

    with mock.patch.object(problem, "loss", loss):
        yield


@contextmanager
def _batch_mean_advantages(case):
    """GRPO advantages normalized over the whole batch instead of each group of G."""
    from aha.algos import grpo

    original = grpo.advantages

    def advantages(rewards, *, num_generations, config):
        return original(rewards, num_generations=rewards.shape[0], config=config)

    with mock.patch.object(grpo, "advantages", advantages):
        yield


@contextmanager
def _mismatch_perturbed(case, how):
    """The train/inference mismatch ratio (spec/grpo.md eqs. 11–12) with a plausible bug: "unmasked" lets padding
    into Δ; "mean" takes the sequence ratio as GSPO's geometric mean instead of the product; "reset" gives in-range
    ratios 1 in the mask modes (trl.md §2.13 quirk 7)."""
    from array_api_compat import array_namespace

    from aha.algos import mismatch

    original = mismatch.importance_sampling_ratio

    def ratio(old_logp, sampler_logp, mask, *, mode, clip_min, clip_max):
        xp = array_namespace(old_logp)
        if how == "unmasked":
            mask = xp.ones_like(mask)
        if how == "mean" and mode.startswith("sequence"):
            count = xp.clip(xp.sum(xp.astype(mask, old_logp.dtype), axis=-1, keepdims=True), min=1.0)
            sampler_logp = old_logp - (old_logp - sampler_logp) / count
        out = original(old_logp, sampler_logp, mask, mode=mode, clip_min=clip_min, clip_max=clip_max)
        if how == "reset" and mode.endswith("_mask"):
            out = xp.where(out > 0, xp.ones_like(out), out)
        return out

    with mock.patch.object(mismatch, "importance_sampling_ratio", ratio):
        yield


@pytest.mark.parametrize("how", ["unmasked", "mean", "reset"])
def test_mismatch_ratio_bugs_are_caught(how):
    cases = [c for c in registry.all_cases(["grpo"]) if "correction" in c.options]
    assert cases and _statuses(cases, _plain()) == {"pass"}
    results = suite.run(cases, [_perturbed(lambda case: _mismatch_perturbed(case, how))])
    failed = {c.quantity for r in results if r.backend == "perturbed" for c in r.failed}
    assert {"output:importance_sampling_ratio", "loss"} <= failed


def test_epsilon_plus_1e3_fails_every_off_policy_grpo_case_in_float64():
    """ε is seen only by tokens clipped below 1 - ε with A < 0; the registry puts one in every off-policy case
    (problems.visit_every_region), so each must fail. CISPO has no ε; on-policy ratios are 1; a batch whose
    active rows have no negative advantage (NaN rewards: every scorable group of one) has no such token."""
    cases = _cases("grpo")
    assert _statuses(cases, _plain("float64")) == {"pass"}
    results = suite.run(cases, [_perturbed(_epsilon_plus, "float64")])
    status = {r.case: r.status for r in results if r.backend == "perturbed"}

    def negative_advantage(case):
        advantages = case.problem.prepare(case.inputs.data, case.config, case.num_generations)["advantages"]
        return bool(((advantages < 0) & case.inputs.mask.any(-1)).any())

    exposed = [c.name for c in cases if not c.options["on_policy"] and c.config.loss_type != "cispo"
               and negative_advantage(c)]
    assert exposed and all(status[name] == "fail" for name in exposed)


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_epsilon_plus_1e3_is_caught_in_float32(algo):
    cases = _cases(algo)
    assert _statuses(cases, _plain()) == {"pass"}
    assert "fail" in _statuses(cases, _perturbed(_epsilon_plus))


@pytest.mark.parametrize("algo", ["grpo", "ppo", "online_dpo"])
def test_mask_shifted_by_one_is_caught(algo):
    cases = _cases(algo, count=2)
    assert _statuses(cases, _plain()) == {"pass"}
    assert "fail" in _statuses(cases, _perturbed(_mask_shifted))


def test_batch_mean_advantages_are_caught():
    cases = _cases("grpo", count=2)
    assert _statuses(cases, _plain()) == {"pass"}
    results = suite.run(cases, [_perturbed(_batch_mean_advantages)])
    failed = {c.quantity for r in results if r.backend == "perturbed" for c in r.failed}
    assert "output:advantages" in failed


def test_a_change_to_algos_moves_a_golden_value_and_fails():
    from aha.algos import grpo

    original = grpo.loss

    def loss(*args, config, **kwargs):
        return original(*args, config=dataclasses.replace(config, epsilon=config.epsilon + 1e-3), **kwargs)

    assert {r.status for r in golden.check(["grpo"])} == {"pass"}
    with mock.patch.object(grpo, "loss", loss):
        results = golden.check(["grpo"])
    assert "fail" in {r.status for r in results}
    assert any(c.quantity == "numpy:loss" for r in results for c in r.failed)


def test_every_problem_is_perturbable():
    """The perturbations above reach every algorithm's loss through the problem interface."""
    for problem in problems.PROBLEMS.values():
        assert callable(problem.loss) and callable(problem.prepare)

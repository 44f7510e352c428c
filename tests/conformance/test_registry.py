"""The registry: deterministic, complete, and conditioned away from the kinks of the losses."""
import itertools
import math

import numpy as np
import pytest

from aha.conformance import problems, registry
from aha.conformance.tolerances import TOLERANCES, tolerance


@pytest.fixture(scope="module")
def cases():
    return registry.all_cases()


def test_names_are_unique_and_every_algorithm_is_there(cases):
    assert len({c.name for c in cases}) == len(cases)
    assert {c.algo for c in cases} == {"grpo", "rloo", "ppo", "online_dpo"}
    for algo in problems.PROBLEMS:
        assert sum(c.algo == algo for c in cases) >= registry.MIN_CASES_PER_ALGO


def test_every_edge_and_shape_is_met(cases):
    for algo, problem in problems.PROBLEMS.items():
        mine = [c for c in cases if c.algo == algo]
        assert {c.edge for c in mine} == set(problem.edges)
        assert {c.shape.name for c in mine} == {s.name for s in registry.SHAPES}


def test_covering_variants_hold_every_pair_and_the_core_product():
    for problem in problems.PROBLEMS.values():
        chosen = registry.variants(problem)
        full = registry.variants(problem, exhaustive=True)
        assert len(chosen) <= len(full)
        choices = [dict(part.split("=", 1) for part in name.split(",")) for name, _, _ in chosen]
        every = [dict(part.split("=", 1) for part in name.split(",")) for name, _, _ in full]
        for a, b in itertools.combinations(problem.dimensions, 2):
            assert {(c[a], c[b]) for c in every} == {(c[a], c[b]) for c in choices}, (problem.algo, a, b)
        core = lambda c: tuple(c[k] for k in problem.core)  # noqa: E731
        assert {core(c) for c in every} == {core(c) for c in choices}


def test_inputs_are_deterministic_and_exact_in_low_precision(cases):
    import torch

    case = cases[3]
    again = registry.Case(case.algo, case.variant, case.config, case.options, case.shape, case.edge)
    a, b = case.inputs, again.inputs
    np.testing.assert_array_equal(a.hidden, b.hidden)
    np.testing.assert_array_equal(a.logp, b.logp)
    for key, value in a.data.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, b.data[key])
    bf16 = torch.tensor(a.hidden, dtype=torch.bfloat16).double().numpy()
    np.testing.assert_array_equal(bf16, a.hidden)
    for value in a.data.values():
        if isinstance(value, np.ndarray) and value.dtype == np.float64:
            np.testing.assert_array_equal(value.astype(np.float32).astype(np.float64), value)


def test_log_ratios_keep_off_the_kinks(cases):
    """Every ratio statistic a loss thresholds sits RATIO_MARGIN away from every clip edge (up to the float32
    rounding of old_logp, relative to the log-probs' size)."""
    for case in cases:
        slack = 6 * 1.2e-7 * max(1.0, float(np.abs(case.inputs.logp).max()))
        data, config = case.inputs.data, case.config
        if "old_logp" not in data or case.algo == "online_dpo":
            continue
        mask = data["mask"] > 0
        d = np.where(mask, case.inputs.logp - data["old_logp"], 0.0)
        if case.algo == "grpo":
            kinks = problems.GRPOProblem().kinks(config)
            stats = d[mask] if config.importance_sampling_level == "token" else \
                (d.sum(-1) / np.maximum(mask.sum(-1), 1))[mask.any(-1)]
        elif case.algo == "rloo":
            kinks = [math.log(1 - config.epsilon), math.log(1 + config.clip_high)]
            stats = d.sum(-1)[mask.any(-1)]
        else:
            kinks = [math.log(1 - config.cliprange), math.log(1 + config.cliprange)]
            kinks += [math.log(config.dual_clip)] if config.dual_clip else []
            stats = d[mask]
        for kink in kinks:
            assert np.all(np.abs(stats - kink) >= problems.RATIO_MARGIN - slack), case.name


def test_tolerance_table_has_every_dtype_and_a_source():
    for name in ("float64", "float32", "bfloat16"):
        assert tolerance(name).rtol > 0
    for name, tol in TOLERANCES.items():
        assert tol.source.strip(), name
    for prefix in ("", "pipeline/"):
        assert tolerance(f"{prefix}float64").rtol < tolerance(f"{prefix}float32").rtol < tolerance(f"{prefix}bfloat16").rtol


def test_appended_variants_come_last_and_move_no_other_case():
    """Appended variants (GRPO's mismatch correction) are dealt after the covering set by their own permutation:
    the covering cases are exactly the registry's without them."""
    from unittest import mock

    grpo = problems.PROBLEMS["grpo"]
    with_appended = registry.all_cases(["grpo"])
    with mock.patch.object(grpo, "appended_variants", lambda: []):
        without = registry.all_cases(["grpo"])
    assert [c.name for c in with_appended[:len(without)]] == [c.name for c in without]
    appended = with_appended[len(without):]
    assert len(appended) == 2 * len(grpo.corrections)
    assert all("correction" in c.options and ",correction=" in c.variant for c in appended)


def test_sampler_log_ratios_keep_off_the_correction_bounds_and_cross_them(cases):
    """log π_old - log π_sampler, per token or per row sum as the mode thresholds, sits RATIO_MARGIN away from
    log C_min and log C_max, and some token or row lies beyond a bound in every case."""
    for case in (c for c in cases if "correction" in c.options):
        data = case.inputs.data
        mode, clip_min, clip_max = case.options["correction"]
        mask = data["mask"] > 0
        d = np.where(mask, data["old_logp"] - data["sampler_logp"], 0.0)
        stats = d[mask] if mode.startswith("token") else d.sum(-1)[mask.any(-1)]
        bounds = [math.log(b) for b in (clip_min, clip_max) if b is not None]
        slack = 6 * 1.2e-7 * max(1.0, float(np.abs(data["old_logp"]).max()))
        for bound in bounds:
            assert np.all(np.abs(stats - bound) >= problems.RATIO_MARGIN - slack), case.name
        beyond = (stats < math.log(clip_min)) if clip_min is not None else np.zeros_like(stats, bool)
        beyond |= (stats > math.log(clip_max)) if clip_max is not None else False
        assert beyond.any(), case.name

"""Shared primitives: reward combination, KL estimators, NaN statistics, whitening, aggregation by name."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aha.algos import _common
from algos_harness import assert_close, run_jax, run_torch
from algos_inputs import batch


def test_combine_rewards_weighted_nansum_and_unscorable_rows():
    per_func = np.array([[1.0, 2.0], [np.nan, 3.0], [np.nan, np.nan]])
    combined = _common.combine_rewards(per_func, np.array([0.5, 2.0]))
    assert_close(combined[:2], [4.5, 6.0])
    assert np.isnan(combined[2])


def test_missing_eos_penalty():
    rewards, has_eos = np.array([1.0, 2.0]), np.array([True, False])
    assert_close(_common.apply_missing_eos_penalty(rewards, has_eos, 0.5), [1.0, 1.5])
    assert _common.apply_missing_eos_penalty(rewards, has_eos, None) is rewards


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=1, max_size=8), st.lists(st.floats(-30, 30), min_size=1, max_size=8))
def test_kl_estimators(logp, ref):
    n = min(len(logp), len(ref))
    logp, ref = np.array(logp[:n]), np.array(ref[:n])
    x = ref - logp
    assert_close(_common.kl_estimate(logp, ref, "k1"), -x)
    assert_close(_common.kl_estimate(logp, ref, "k2"), 0.5 * x**2)
    k3 = _common.kl_estimate(logp, ref, "k3")
    assert np.all(k3 >= 0)
    assert_close(_common.kl_estimate(logp, logp, "k3"), np.zeros(n))


def test_nan_statistics_with_ddof():
    x = np.array([[1.0, 3.0, np.nan], [np.nan, 5.0, np.nan], [np.nan] * 3])
    assert_close(_common.nanmean(x, axis=1)[:2, 0], [2.0, 5.0])
    std = _common.nanstd(x, axis=1, ddof=1)[:, 0]
    assert_close(std[0], np.sqrt(2.0))
    assert np.isnan(std[1]) and np.isnan(std[2])  # fewer than ddof + 1 values: NaN, as TRL's nanstd
    assert_close(_common.nanstd(x, axis=1, ddof=0)[1, 0], 0.0)


def test_whiten_is_masked_and_bessel():
    x = np.array([[1.0, 2.0, 100.0], [3.0, 4.0, -100.0]])
    mask = np.array([[True, True, False], [True, True, False]])
    active = x[mask]
    expected = (active - active.mean()) / np.sqrt(active.var(ddof=1) + 1e-8)
    assert_close(_common.whiten(x, mask)[mask], expected)
    assert_close(_common.whiten(x, mask, shift_mean=False)[mask], expected + active.mean())


@pytest.mark.parametrize("loss_type, function", [
    ("grpo", lambda x, m: _common.sequence_mean(x, m)),
    ("bnpo", lambda x, m: _common.token_mean(x, m)),
    ("dr_grpo", lambda x, m: _common.token_sum_over_constant(x, m, max_completion_length=9)),
    ("dapo", lambda x, m: _common.token_sum_over_global_count(x, m, num_items_in_batch=13)),
    ("cispo", lambda x, m: _common.token_sum_over_global_count(x, m, num_items_in_batch=13)),
])
def test_aggregate_dispatches_to_the_named_function(loss_type, function):
    arrays = batch(3, junk=1e3)
    x, mask = arrays["logp"], arrays["mask"]
    got = _common.aggregate(x, mask, loss_type, max_completion_length=9, num_items_in_batch=13)
    assert_close(got, function(x, mask))
    m = mask.astype(float)
    oracle = {
        "grpo": ((x * m).sum(1) / np.clip(m.sum(1), 1, None)).mean(),
        "bnpo": (x * m).sum() / m.sum(),
        "dr_grpo": (x * m).sum() / (x.shape[0] * 9),
        "dapo": (x * m).sum() / 13,
        "cispo": (x * m).sum() / 13,
    }[loss_type]
    assert_close(got, oracle)


def test_num_items_in_batch_as_array_or_scalar():
    arrays = batch(4)
    x, mask = arrays["logp"], arrays["mask"]
    want = _common.token_sum_over_global_count(x, mask, num_items_in_batch=11)
    for count in (np.int64(11), 11.0):
        assert_close(_common.token_sum_over_global_count(x, mask, num_items_in_batch=count), want)
    got = _common.token_sum_over_global_count(torch.tensor(x), torch.tensor(mask), num_items_in_batch=torch.tensor(11))
    assert_close(got, want)
    assert_close(_common.token_sum_over_global_count(x, mask, num_items_in_batch=0), (x * mask).sum())


def test_stop_gradient_blocks_gradients_on_torch_and_jax():
    def fn(x):
        return (x * _common.stop_gradient(x)).sum(), {}

    x = np.array([1.0, -2.0, 3.0])
    for run in (run_torch, run_jax):
        value, _, grads = run(fn, {"x": x}, ("x",))
        assert_close(value, (x * x).sum())
        assert_close(grads["x"], x)  # d/dx of x·sg[x] is sg[x] = x, not 2x

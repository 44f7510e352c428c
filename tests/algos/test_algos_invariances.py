"""Invariances (hypothesis, NumPy float64): masking equals slicing, padding rows change nothing, groups permute."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from aha.algos import grpo, online_dpo, ppo, rloo
from algos_harness import assert_close
from algos_inputs import batch

SETTINGS = settings(max_examples=30, deadline=None)
LOSS_TYPES = st.sampled_from(["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
LEVELS = st.sampled_from(["token", "sequence"])


@st.composite
def padded_batches(draw, min_length=0):
    """(arrays with T + extra positions and junk in padding, T): every row's active prefix fits in T."""
    groups, group_size = draw(st.integers(1, 3)), draw(st.integers(2, 4))
    length, extra = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(min_length, length), min_size=groups * group_size,
                            max_size=groups * group_size))
    arrays = batch(draw(st.integers(0, 2**16)), groups=groups, group_size=group_size, length=length + extra,
                   lengths=lengths, junk=50.0)
    return arrays, length


def sliced(arrays, length):
    return {k: v[:, :length] if np.ndim(v) == 2 else v for k, v in arrays.items()}


def assert_same_outputs(a, b):
    assert_close(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        assert_close(a[1][key], b[1][key], err_msg=key)


@SETTINGS
@given(padded_batches(), LOSS_TYPES, LEVELS, st.sampled_from([0.0, 0.1]))
def test_grpo_masking_equals_slicing(data, loss_type, level, beta):
    arrays, length = data
    config = grpo.GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=beta, max_completion_length=8)
    def run(a):
        return grpo.loss(a["logp"], a["old_logp"], a["ref_logp"], a["advantages"], a["mask"], config=config)

    assert_same_outputs(run(arrays), run(sliced(arrays, length)))


@SETTINGS
@given(padded_batches(), st.sampled_from(["reward", "loss"]))
def test_rloo_masking_equals_slicing(data, kl_in):
    arrays, length = data
    config = rloo.RLOOConfig(kl_in=kl_in, beta=0.1)

    def run(a):  # the whole batch is one group
        adv = rloo.advantages(a["rewards"], num_generations=len(a["rewards"]), config=config, logp=a["old_logp"],
                              ref_logp=a["ref_logp"], mask=a["mask"])
        return adv, rloo.loss(a["logp"], a["old_logp"], a["ref_logp"], adv, a["mask"], config=config)

    (adv_full, out_full), (adv_cut, out_cut) = run(arrays), run(sliced(arrays, length))
    assert_close(adv_full, adv_cut)
    assert_same_outputs(out_full, out_cut)


@SETTINGS
@given(padded_batches(), st.sampled_from(["first_pad", "last_token"]), st.sampled_from(["k1", "k3"]))
def test_ppo_masking_equals_slicing(data, reward_position, kl_estimator):
    arrays, length = data
    config = ppo.PPOConfig(reward_position=reward_position, kl_estimator=kl_estimator, dual_clip=2.0)
    # "first_pad" scores one position past the completion: keep that position when it exists
    if reward_position == "first_pad":
        length = min(length + 1, arrays["mask"].shape[1])

    def run(a):
        adv, returns = ppo.advantages(a["scores"], a["old_logp"], a["ref_logp"], a["old_values"], a["mask"],
                                      config=config)
        return adv, returns, ppo.loss(a["logp"], a["old_logp"], adv, a["values"], a["old_values"], returns,
                                      a["mask"], config=config)

    full, cut = run(arrays), run(sliced(arrays, length))
    assert_close(full[0][:, :length], cut[0])
    assert_close(full[1][:, :length], cut[1])
    assert np.all(full[0][:, length:] == 0) and np.all(full[1][:, length:] == 0)
    assert_same_outputs(full[2], cut[2])


@SETTINGS
@given(padded_batches(), st.sampled_from(["sigmoid", "ipo"]))
def test_online_dpo_masking_equals_slicing(data, loss_type):
    arrays, length = data
    config = online_dpo.OnlineDPOConfig(loss_type=loss_type)
    n = len(arrays["rewards"])
    pairs = online_dpo.select_pairs(arrays["rewards"], num_generations=n)
    run = lambda a: online_dpo.loss(a["logp"], a["ref_logp"], a["mask"], *pairs, config=config)  # noqa: E731
    assert_same_outputs(run(arrays), run(sliced(arrays, length)))


@SETTINGS
@given(padded_batches(), st.sampled_from(["dapo", "cispo"]), LEVELS, st.integers(1, 4), st.integers(1, 200))
def test_fully_masked_rows_do_not_change_dapo(data, loss_type, level, padding_rows, num_items):
    arrays, _ = data
    config = grpo.GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.1)
    junk = batch(7, groups=padding_rows, group_size=1, length=arrays["mask"].shape[1], lengths=[0] * padding_rows,
                 junk=50.0)
    padded = {k: np.concatenate([arrays[k], junk[k]]) for k in ("logp", "old_logp", "ref_logp", "advantages", "mask")}
    run = lambda a: grpo.loss(a["logp"], a["old_logp"], a["ref_logp"], a["advantages"], a["mask"],  # noqa: E731
                              config=config, num_items_in_batch=num_items)[0]
    assert_close(run(padded), run(arrays))


@st.composite
def grouped_rewards(draw):
    groups, size = draw(st.integers(1, 4)), draw(st.integers(2, 4))
    values = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, np.nan]), min_size=groups * size,
                           max_size=groups * size))
    return np.array(values), size, draw(st.permutations(range(groups))), draw(st.permutations(range(size)))


def advantage_functions(size):
    yield from (lambda r, s=s: grpo.advantages(r, num_generations=size, config=grpo.GRPOConfig(scale_rewards=s))
                for s in ("group", "batch", "none"))
    yield from (lambda r, n=n: rloo.advantages(r, num_generations=size,
                                               config=rloo.RLOOConfig(beta=0.0, normalize_advantages=n))
                for n in (False, True))


@SETTINGS
@given(grouped_rewards())
def test_permuting_groups_permutes_advantages(data):
    rewards, size, group_order, member_order = data
    rows = (np.asarray(group_order)[:, None] * size + np.asarray(member_order)[None, :]).ravel()
    for advantages in advantage_functions(size):
        result = advantages(rewards)
        assert np.all(np.isfinite(result))
        assert_close(advantages(rewards[rows]), result[rows])


@SETTINGS
@given(grouped_rewards())
def test_permuting_groups_permutes_pairs(data):
    rewards, size, group_order, _ = data
    rows = (np.asarray(group_order)[:, None] * size + np.arange(size)[None, :]).ravel()
    chosen, rejected, valid = online_dpo.select_pairs(rewards, num_generations=size)
    p_chosen, p_rejected, p_valid = online_dpo.select_pairs(rewards[rows], num_generations=size)
    np.testing.assert_array_equal(rows[p_chosen], chosen[list(group_order)])
    np.testing.assert_array_equal(rows[p_rejected], rejected[list(group_order)])
    np.testing.assert_array_equal(p_valid, valid[list(group_order)])
    grouped = rewards.reshape(-1, size)
    assert np.array_equal(valid, (~np.isnan(grouped)).sum(1) >= 2)
    assert np.all(chosen[valid] != rejected[valid])
    assert np.array_equal(rewards[chosen[valid]], np.max(np.where(np.isnan(grouped), -np.inf, grouped), 1)[valid])
    assert np.array_equal(rewards[rejected[valid]], np.min(np.where(np.isnan(grouped), np.inf, grouped), 1)[valid])

"""Gradients: on-policy equals REINFORCE, zero in the clipped region, finite (and backend-equal) on edge cases."""
import numpy as np
import pytest

from aha.algos import grpo, online_dpo, ppo, rloo
from algos_harness import assert_backends_agree, assert_close, run_jax, run_torch
from algos_inputs import batch, pick

B, T, L, N = 6, 5, 8, 40  # rows, positions, max_completion_length, num_items_in_batch


def reinforce_weights(loss_type, mask):
    """w_it with ∇loss = -A_i w_it ∇log π_it: the REINFORCE gradient of each aggregation (spec/grpo.md eq. 9)."""
    m = mask.astype(float)
    return {
        "grpo": m / np.clip(m.sum(1, keepdims=True), 1, None) / m.shape[0],
        "bnpo": m / max(m.sum(), 1),
        "dr_grpo": m / (m.shape[0] * L),
        "dapo": m / N,
        "cispo": m / N,
    }[loss_type]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
def test_grpo_on_policy_is_reinforce(loss_type, level):
    # cispo's cap must exceed ρ = 1 for the on-policy weight to be 1 (with the default 0.2 it is 0.2)
    config = grpo.GRPOConfig(loss_type=loss_type, importance_sampling_level=level, max_completion_length=L,
                             epsilon_high=2.0 if loss_type == "cispo" else None)
    arrays = {**pick(batch(10, junk=5.0), "logp", "advantages", "mask"), "old_logp": None, "ref_logp": None}
    expected = -arrays["advantages"][:, None] * reinforce_weights(loss_type, arrays["mask"])
    for run in (run_torch, run_jax):
        value, metrics, grads = run(lambda **a: grpo.loss(**a, config=config, num_items_in_batch=N), arrays, ("logp",))
        assert_close(grads["logp"], expected)
        # ρ = 1 in value: loss = Σ w (-A), and cispo's surrogate is Σ w (-A) log π
        assert_close(value, (expected * arrays["logp"]).sum() if loss_type == "cispo" else expected.sum())
        assert_close(metrics["ratio_mean"], 1.0)
        assert_close(metrics.get("clip_ratio/region_mean", 0.0), 0.0)


def test_rloo_on_policy_is_reinforce():
    arrays = {**pick(batch(11, junk=5.0), "logp", "advantages", "mask"), "old_logp": None, "ref_logp": None}
    expected = -arrays["advantages"][:, None] * arrays["mask"] / B
    for run in (run_torch, run_jax):
        value, _, grads = run(lambda **a: rloo.loss(**a, config=rloo.RLOOConfig()), arrays, ("logp",))
        assert_close(grads["logp"], expected)
        assert_close(value, -arrays["advantages"].mean())


def test_grpo_gradient_zero_exactly_in_clipped_region():
    """dapo, ε = 0.2: ρ = e^{±0.5} clips only when the sign of A pushes it further out (trl.md §9 item 4)."""
    logp = np.zeros((4, 1))
    old = np.array([[-0.5], [0.5], [-0.5], [0.5]])  # ρ = 1.65, 0.61, 1.65, 0.61
    adv = np.array([1.0, -1.0, -1.0, 1.0])  # clipped, clipped, free, free
    arrays = {"logp": logp, "old_logp": old, "ref_logp": None, "advantages": adv, "mask": np.ones((4, 1), bool)}
    _, metrics, grads = run_torch(lambda **a: grpo.loss(**a, config=grpo.GRPOConfig()), arrays, ("logp",))
    ratio = np.exp(logp - old)[:, 0]
    assert_close(grads["logp"][:, 0], np.array([0.0, 0.0, -adv[2] * ratio[2] / 4, -adv[3] * ratio[3] / 4]))
    assert_close(metrics["clip_ratio/high_mean"], 0.25)
    assert_close(metrics["clip_ratio/low_mean"], 0.25)


def edge_batch(case):
    """Inputs of one edge case (architecture doc: all-equal rewards, fully masked rows, length-1, extreme ratios)."""
    lengths = {"fully_masked_rows": [0, 3, 0, 5, 2, 0], "length_1": [1] * B, "all_masked": [0] * B}.get(case)
    arrays = batch(12, lengths=lengths, junk=30.0)
    if case == "all_equal_rewards":
        arrays["rewards"] = np.full(B, 0.7)
    if case == "extreme_ratios":
        arrays["old_logp"] = arrays["logp"] + np.where(np.arange(T) % 2 == 0, 40.0, -40.0)[None, :]
        arrays["advantages"] = np.where(np.arange(B) % 3 == 0, -1.0, 1.0)
    return arrays


EDGE_CASES = ["all_equal_rewards", "fully_masked_rows", "length_1", "extreme_ratios", "all_masked"]


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "cispo"])
def test_grpo_edge_cases(case, loss_type):
    arrays = edge_batch(case)
    config = grpo.GRPOConfig(loss_type=loss_type, beta=0.04, delta=2.0 if loss_type == "grpo" else None)
    arrays["advantages"] = (grpo.advantages(arrays["rewards"], num_generations=3, config=config)
                            if case == "all_equal_rewards" else arrays["advantages"])
    grads = assert_backends_agree(lambda **a: grpo.loss(**a, config=config),
                                  pick(arrays, "logp", "old_logp", "ref_logp", "advantages", "mask"), ("logp",))
    assert np.all(grads["logp"][~arrays["mask"]] == 0.0)


@pytest.mark.parametrize("case", EDGE_CASES)
def test_rloo_ppo_dpo_edge_cases(case):
    arrays = edge_batch(case)
    rloo_config = rloo.RLOOConfig(kl_in="loss")
    adv = rloo.advantages(arrays["rewards"], num_generations=3, config=rloo_config)
    assert np.all(np.isfinite(adv))
    assert_backends_agree(lambda **a: rloo.loss(**a, config=rloo_config),
                          {**pick(arrays, "logp", "old_logp", "ref_logp", "mask"), "advantages": adv}, ("logp",))

    ppo_config = ppo.PPOConfig(dual_clip=3.0)
    ppo_adv, returns = ppo.advantages(arrays["scores"], arrays["old_logp"], arrays["ref_logp"], arrays["old_values"],
                                      arrays["mask"], config=ppo_config)
    assert np.all(np.isfinite(ppo_adv)) and np.all(np.isfinite(returns))
    ppo_arrays = {**pick(arrays, "logp", "old_logp", "values", "old_values", "mask"), "advantages": ppo_adv,
                  "returns": returns}
    assert_backends_agree(lambda **a: ppo.loss(**a, config=ppo_config), ppo_arrays, ("logp", "values"))

    chosen, rejected, valid = online_dpo.select_pairs(arrays["rewards"], num_generations=2)
    dpo_arrays = {**pick(arrays, "logp", "ref_logp", "mask"), "chosen_idx": chosen, "rejected_idx": rejected,
                  "valid": valid}
    assert_backends_agree(lambda **a: online_dpo.loss(**a, config=online_dpo.OnlineDPOConfig()), dpo_arrays,
                          ("logp",))

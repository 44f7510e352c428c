"""The same algos functions on NumPy, torch (autograd) and JAX (jax.grad, float64): same values, metrics, gradients."""
import numpy as np
import pytest
from array_api_compat import array_namespace

from aha.algos import grpo, online_dpo, ppo, rloo
from algos_harness import assert_backends_agree, assert_close, run_jax, run_torch
from algos_inputs import batch, pick

GRPO_VARIANTS = [
    dict(loss_type=lt, importance_sampling_level=level, beta=0.04, epsilon_high=0.28, max_completion_length=8)
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
    for level in ("token", "sequence")
] + [dict(loss_type="grpo", delta=1.3, epsilon=0.1), dict(loss_type="cispo", epsilon_high=5.0)]


@pytest.mark.parametrize("fields", GRPO_VARIANTS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_grpo_loss(fields):
    config = grpo.GRPOConfig(**fields)
    arrays = pick(batch(0, junk=3.0), "logp", "old_logp", "ref_logp", "advantages", "mask")
    assert_backends_agree(lambda **a: grpo.loss(**a, config=config, num_items_in_batch=40), arrays, ("logp",))


@pytest.mark.parametrize("old", ["given", "on-policy"])
def test_grpo_loss_float_mask_and_on_policy(old):
    config = grpo.GRPOConfig(beta=0.1)
    arrays = pick(batch(1), "logp", "old_logp", "ref_logp", "advantages", "mask")
    arrays["mask"] = arrays["mask"].astype(float)
    if old == "on-policy":
        arrays["old_logp"] = None
    assert_backends_agree(lambda **a: grpo.loss(**a, config=config), arrays, ("logp",))


def _as_loss(fn):
    """Wrap an array-valued function as a (value, {}) pair for the harness."""
    return lambda **a: (fn(**a), {})


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages(scale):
    rewards = batch(2, groups=3, group_size=4)["rewards"]
    rewards[[0, 5, 6]] = np.nan
    config = grpo.GRPOConfig(scale_rewards=scale)
    assert_backends_agree(_as_loss(lambda rewards: grpo.advantages(rewards, num_generations=4, config=config)),
                          {"rewards": rewards}, ())


@pytest.mark.parametrize("fields", [dict(), dict(normalize_advantages=True, reward_clip_range=(0.0, 1.5)),
                                    dict(kl_in="loss"), dict(beta=0.0)])
def test_rloo(fields):
    config = rloo.RLOOConfig(**fields)
    arrays = batch(3, junk=3.0)
    arrays["rewards"][1] = np.nan
    adv = _as_loss(lambda **a: rloo.advantages(a["rewards"], num_generations=3, config=config,
                                                logp=a["old_logp"], ref_logp=a["ref_logp"], mask=a["mask"]))
    assert_backends_agree(adv, pick(arrays, "rewards", "old_logp", "ref_logp", "mask"), ())
    loss_arrays = pick(arrays, "logp", "old_logp", "ref_logp", "advantages", "mask")
    assert_backends_agree(lambda **a: rloo.loss(**a, config=config), loss_arrays, ("logp",))


@pytest.mark.parametrize("fields", [dict(), dict(kl_estimator="k3", whiten_rewards=True, reward_position="last_token"),
                                    dict(dual_clip=3.0, gamma=0.9, whiten_advantages=False)])
def test_ppo(fields):
    config = ppo.PPOConfig(**fields)
    arrays = batch(4, junk=3.0)

    def both(scores, logp, ref_logp, values, mask):
        adv, returns = ppo.advantages(scores, logp, ref_logp, values, mask, config=config)
        return array_namespace(adv).stack([adv, returns]), {}

    assert_backends_agree(both, pick(arrays, "scores", "logp", "ref_logp", "values", "mask"), ())
    loss_arrays = pick(arrays, "logp", "old_logp", "advantages", "values", "old_values", "returns", "mask")
    loss_arrays["advantages"] = np.broadcast_to(arrays["advantages"][:, None], arrays["mask"].shape).copy()
    assert_backends_agree(lambda **a: ppo.loss(**a, config=config), loss_arrays, ("logp", "values"))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_online_dpo(loss_type):
    config = online_dpo.OnlineDPOConfig(loss_type=loss_type, beta=0.2)
    arrays = batch(5, groups=3, group_size=2, junk=3.0)
    rewards = arrays["rewards"]
    rewards[[4]] = np.nan  # the third pair has one scorable sample: not valid
    pairs = online_dpo.select_pairs(rewards, num_generations=2)

    def stacked_pairs(rewards):
        xp = array_namespace(rewards)
        return xp.stack([xp.astype(p, rewards.dtype) for p in online_dpo.select_pairs(rewards, num_generations=2)])

    for run in (run_torch, run_jax):
        assert_close(run(_as_loss(stacked_pairs), {"rewards": rewards})[0], np.stack(pairs).astype(float))
    loss_arrays = {**pick(arrays, "logp", "ref_logp", "mask"), "chosen_idx": pairs[0], "rejected_idx": pairs[1],
                   "valid": pairs[2]}
    assert_backends_agree(lambda **a: online_dpo.loss(**a, config=config), loss_arrays, ("logp",))

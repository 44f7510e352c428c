"""Every value of shared/reference/trl.md §8.2, reproduced in NumPy float64.

Two checks per value: the implementation rounds to the printed digits, and it equals (float64 tolerance) the
independent NumPy transcription of trl.md Appendix A, re-typed below as the oracle.
"""
import numpy as np
import pytest

from aha.algos import _common, grpo, online_dpo, ppo, rloo
from algos_harness import assert_close, assert_printed, decimals_of

# ---- GRPO inputs of §8.2 -----------------------------------------------------------------------------------
LOGP = np.array([[-1.0, -0.5, -2.0, -0.3], [-0.7, -1.2, 0.0, 0.0]])
OLD = np.array([[-1.1, -0.4, -1.5, -0.3], [-0.9, -1.0, 0.0, 0.0]])
REF = np.array([[-1.2, -0.6, -1.8, -0.5], [-0.8, -1.1, 0.0, 0.0]])
MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=float)
ADV = np.array([0.8, -0.5])


def appendix_a_grpo(loss_type, level, eps, eps_high, beta, delta=None, max_len=4):
    """trl.md Appendix A ``run`` (P = GA = 1, N = Σ mask)."""
    log_ratio = LOGP - OLD
    if level == "sequence":
        log_ratio = ((log_ratio * MASK).sum(-1) / np.clip(MASK.sum(-1), 1, None))[:, None]
    c1 = np.exp(log_ratio)
    kl = np.exp(REF - LOGP) - (REF - LOGP) - 1
    a = ADV[:, None]
    if loss_type == "cispo":
        ptl = -np.minimum(c1, eps_high) * a * LOGP
    else:
        c2 = np.clip(c1, 1 - eps, 1 + eps_high)
        if delta is not None:
            c1 = np.minimum(c1, delta)
        ptl = -np.minimum(c1 * a, c2 * a)
    ptl = np.broadcast_to(ptl + beta * kl, MASK.shape)
    if loss_type == "grpo":
        return ((ptl * MASK).sum(-1) / np.clip(MASK.sum(-1), 1, None)).mean()
    if loss_type == "dr_grpo":
        return (ptl * MASK).sum() / (MASK.shape[0] * max_len)
    return (ptl * MASK).sum() / max(MASK.sum(), 1)  # bnpo, dapo, cispo


# (loss_type, level, epsilon, epsilon_high, delta, beta, printed value)
GRPO_TABLE = [
    ("grpo", "token", 0.2, 0.28, None, 0.0, "-0.10663721"),
    ("grpo", "token", 0.2, 0.28, None, 0.04, "-0.10621862"),
    ("bnpo", "token", 0.2, 0.28, None, 0.0, "-0.31219407"),
    ("bnpo", "token", 0.2, 0.28, None, 0.04, "-0.31170267"),
    ("dr_grpo", "token", 0.2, 0.28, None, 0.0, "-0.23414556"),
    ("dr_grpo", "token", 0.2, 0.28, None, 0.04, "-0.23377701"),
    ("dapo", "token", 0.2, 0.28, None, 0.0, "-0.31219407"),
    ("dapo", "token", 0.2, 0.28, None, 0.04, "-0.31170267"),
    ("cispo", "token", 0.2, 0.28, None, 0.0, "0.09753333"),
    ("cispo", "token", 0.2, 0.28, None, 0.04, "0.09802473"),
    ("cispo", "token", 0.2, 5.0, None, 0.0, "0.25629856"),
    ("grpo", "sequence", 0.2, 0.28, None, 0.0, "-0.10299876"),
    ("grpo", "sequence", 0.2, 0.28, None, 0.04, "-0.10258017"),
    ("dapo", "sequence", 0.2, 0.28, None, 0.0, "-0.30399835"),
    ("dapo", "sequence", 0.2, 0.28, None, 0.04, "-0.30350695"),
    ("grpo", "token", 0.1, 0.1, 1.2, 0.0, "-0.09863681"),
    ("grpo", "token", 0.1, 0.1, None, 0.0, "-0.09596146"),
]


@pytest.mark.parametrize("loss_type, level, eps, eps_high, delta, beta, printed", GRPO_TABLE)
def test_grpo_loss_table(loss_type, level, eps, eps_high, delta, beta, printed):
    config = grpo.GRPOConfig(
        epsilon=eps, epsilon_high=eps_high, delta=delta, beta=beta, loss_type=loss_type,
        importance_sampling_level=level, max_completion_length=4,
    )
    value, _ = grpo.loss(LOGP, OLD, REF, ADV, MASK, config=config)
    assert_printed(value, float(printed), decimals_of(printed))
    assert_close(value, appendix_a_grpo(loss_type, level, eps, eps_high, beta, delta))


def test_grpo_intermediates():
    token = grpo.importance_log_ratio(LOGP, OLD, MASK, "token")
    sequence = grpo.importance_log_ratio(LOGP, OLD, MASK, "sequence")
    kl = np.where(MASK > 0, _common.kl_estimate(LOGP, REF, "k3"), 0.0)
    assert_printed(np.exp(token), [[1.105171, 0.904837, 0.606531, 1], [1.221403, 0.818731, 1, 1]], 6)
    assert_printed(np.exp(sequence), [0.882497, 1.0], 6)
    assert_printed(kl, [[0.018731, 0.004837, 0.021403, 0.018731], [0.004837, 0.005171, 0, 0]], 6)
    assert_close(kl, (np.exp(REF - LOGP) - (REF - LOGP) - 1) * MASK)


# ---- advantages of §8.2 ----------------------------------------------------------------------------------
REWARDS = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 1.5, np.nan, 1.0])
ADVANTAGES = {
    "group": [0.865875, -0.865875, -0.865875, 0.865875, 0, 0, 0, 0, -0.9998, 0.9998, 0, 0],
    "none": [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.5, 0.5, 0, 0],
    "batch": [0.638203, -0.638203, -0.638203, 0.638203, 0, 0, 0, 0, -0.638203, 0.638203, 0, 0],
}


def appendix_a_advantages(scale):
    g = REWARDS.reshape(-1, 4)
    mean = np.nanmean(g, axis=1, keepdims=True)
    if scale == "none":
        return np.nan_to_num(g - mean).ravel()
    std = np.nanstd(g, axis=1, ddof=1, keepdims=True) if scale == "group" else np.nanstd(REWARDS, ddof=1)
    return np.nan_to_num((g - mean) / (std + 1e-4)).ravel()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the oracle's nanstd of a 1-element group
@pytest.mark.parametrize("scale", ["group", "none", "batch"])
def test_grpo_advantages(scale):
    result = grpo.advantages(REWARDS, num_generations=4, config=grpo.GRPOConfig(scale_rewards=scale))
    assert_printed(result, ADVANTAGES[scale], 6)
    assert_close(result, appendix_a_advantages(scale))


def test_batch_std():
    assert_printed(_common.nanstd(REWARDS, ddof=1), [0.783349], 6)


def test_rloo_advantages():
    result = rloo.advantages(REWARDS, num_generations=4, config=rloo.RLOOConfig(beta=0.0))
    assert_printed(result, [0.666667, -0.666667, -0.666667, 0.666667, 0, 0, 0, 0, -0.75, 0.75, 0, 0], 6)
    g = REWARDS.reshape(-1, 4)
    count = (~np.isnan(g)).sum(1, keepdims=True)
    assert_close(result, np.nan_to_num((g - (np.nansum(g, 1, keepdims=True) - g) / (count - 1)).ravel()))


# ---- PPO of §8.2 -----------------------------------------------------------------------------------------
PPO_MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)  # seq0 = t t EOS PAD PAD; seq1 truncated
PPO_OLD = np.array([[-1.0, -0.5, -0.2, -3.0, -3.0], [-0.3, -0.6, -0.9, -1.2, -1.5]])  # padding values are junk
PPO_REF = np.array([[-1.2, -0.4, -0.3, -2.0, -2.0], [-0.5, -0.5, -1.0, -1.0, -1.6]])
PPO_VALUES = np.array([[0.1, 0.2, 0.3, 0.4, 0.5], [0.0, 0.1, 0.2, 0.3, 0.4]])
PPO_SCORES = np.array([1.0, -0.5])
PPO_STEP = np.array([[0.3, -0.3, 0.1, 0, 0], [0.05, 0.0, -0.25, 0.1, 0.0]])
PPO_PRINTED = {
    "rewards": [[-0.01, 0.005, -0.005, 1.0, 0], [-0.01, 0.005, -0.005, 0.01, -0.505]],
    "raw": [[0.789912, 0.73675, 0.665, 0.6, 0], [-0.367329, -0.481399, -0.617262, -0.74975, -0.905]],
    "returns": [[0.889912, 0.93675, 0.965, 1.0, 0], [-0.367329, -0.381399, -0.417262, -0.44975, -0.505]],
    "whitened": [[1.258204, 1.184378, 1.084741, 0, 0], [-0.348827, -0.507233, -0.695902, -0.879884, -1.095476]],
}
PPO_LOSSES = {"k1": ("-0.01093902", "0.30353369", "0.01941435"), "k3": ("-0.01126260", "0.30494525", "0.01923193")}


def appendix_a_ppo(estimator):
    """trl.md Appendix A PPO transcription (INVALID_LOGPROB fill, score at the first PAD, GAE, whitening, loss)."""
    length = np.array([2, 4])
    idx = np.arange(5)[None, :]
    pad, pad1 = idx > length[:, None], idx > (length + 1)[:, None]
    lp, ref = np.where(pad, 1.0, PPO_OLD), np.where(pad, 1.0, PPO_REF)
    values = np.where(pad1, 0.0, PPO_VALUES)
    logr = ref - lp
    kl = -logr if estimator == "k1" else np.exp(logr) - 1 - logr
    rewards = -0.05 * kl
    rewards[np.arange(2), np.where(length + 1 < 5, length + 1, length)] += PPO_SCORES
    last, steps = 0.0, []
    for t in reversed(range(5)):
        nv = values[:, t + 1] if t < 4 else 0.0
        last = rewards[:, t] + nv - values[:, t] + 0.95 * last
        steps.append(last)
    adv = np.stack(steps[::-1], 1)
    ret = adv + values
    valid = ~pad
    mu = adv[valid].mean()
    white = np.where(pad, 0.0, (adv - mu) / np.sqrt(adv[valid].var(ddof=1) + 1e-8))
    new = np.where(pad, 1.0, lp + PPO_STEP)
    vpred = np.where(pad1, 0.0, values + 0.3)
    vf = np.maximum((vpred - ret) ** 2, (np.clip(vpred, values - 0.2, values + 0.2) - ret) ** 2)
    vf_loss = 0.5 * vf[~pad1].mean()
    ratio = np.exp(new - lp)
    pg_loss = np.maximum(-white * ratio, -white * np.clip(ratio, 0.8, 1.2))[valid].mean()
    return rewards, adv, ret, white, (pg_loss, vf_loss, pg_loss + 0.1 * vf_loss)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_ppo(estimator):
    config = ppo.PPOConfig(kl_estimator=estimator)
    rewards = ppo.token_rewards(PPO_SCORES, PPO_OLD, PPO_REF, PPO_MASK, config=config)
    raw, returns = ppo.gae(rewards, PPO_VALUES, PPO_MASK, config=config)
    whitened, returns_again = ppo.advantages(PPO_SCORES, PPO_OLD, PPO_REF, PPO_VALUES, PPO_MASK, config=config)
    value, metrics = ppo.loss(
        PPO_OLD + PPO_STEP, PPO_OLD, whitened, PPO_VALUES + 0.3, PPO_VALUES, returns, PPO_MASK, config=config
    )
    o_rewards, o_raw, o_returns, o_white, o_losses = appendix_a_ppo(estimator)
    if estimator == "k1":
        for name, got in {"rewards": rewards, "raw": raw, "returns": returns, "whitened": whitened}.items():
            assert_printed(got, PPO_PRINTED[name], 6)
    for got, printed in zip((metrics["pg_loss"], metrics["vf_loss"], value), PPO_LOSSES[estimator]):
        assert_printed(got, float(printed), decimals_of(printed))
    computed = (rewards, raw, returns, returns_again, whitened)
    for got, want in zip(computed, (o_rewards, o_raw, o_returns, o_returns, o_white)):
        assert_close(got, want)
    for got, want in zip((metrics["pg_loss"], metrics["vf_loss"], value), o_losses):
        assert_close(got, want)


# ---- Online DPO of §8.2 ------------------------------------------------------------------------------------
# TRL's layout is [first samples | second samples]; ours is contiguous groups. TRL row j of prompt k:
# k + j·B  ->  our row 2k + j. TRL rewards [0.3, 0.9, 0.5, 0.9] (prompts 0, 1 first, then second samples).
TRL_TO_OURS = np.array([0, 2, 1, 3])
DPO_REWARDS = np.array([0.3, 0.9, 0.5, 0.9])[np.argsort(TRL_TO_OURS)]
DPO_LOGP = np.array([-10.0, -12.0, -9.0, -11.5])[np.argsort(TRL_TO_OURS)]
DPO_REF = np.array([-10.5, -11.0, -9.5, -12.0])[np.argsort(TRL_TO_OURS)]


@pytest.mark.parametrize("loss_type, printed", [("sigmoid", "0.73205211"), ("ipo", "33.625")])
def test_online_dpo(loss_type, printed):
    chosen, rejected, valid = online_dpo.select_pairs(DPO_REWARDS, num_generations=2)
    np.testing.assert_array_equal(chosen, TRL_TO_OURS[[2, 1]])  # TRL chosen idx [2, 1]
    np.testing.assert_array_equal(rejected, TRL_TO_OURS[[0, 3]])  # TRL rejected idx [0, 3]
    assert valid.all()
    h = (DPO_LOGP[chosen] - DPO_LOGP[rejected]) - (DPO_REF[chosen] - DPO_REF[rejected])
    assert_printed(h, [0, -1.5], 6)
    # one token per sequence carries the summed log-prob; a padded second position holds junk
    logp = np.stack([DPO_LOGP, np.full(4, 7.0)], axis=1)
    ref = np.stack([DPO_REF, np.full(4, -7.0)], axis=1)
    mask = np.array([[True, False]] * 4)
    value, metrics = online_dpo.loss(
        logp, ref, mask, chosen, rejected, valid, config=online_dpo.OnlineDPOConfig(beta=0.1, loss_type=loss_type)
    )
    oracle = np.mean(np.log1p(np.exp(-0.1 * h))) if loss_type == "sigmoid" else np.mean((h - 1 / (2 * 0.1)) ** 2)
    assert_printed(value, float(printed), decimals_of(printed))
    assert_close(value, oracle)
    assert_close(metrics["rewards/margins"], np.mean(0.1 * h))

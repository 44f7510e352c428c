"""Bad input raises ValueError naming the argument (or config field) at fault."""
import numpy as np
import pytest

from aha.algos import _common, grpo, online_dpo, ppo, rloo
from algos_inputs import batch

A = batch(0)  # B = 6 (2 groups of 3), T = 5
LOGP, OLD, REF, MASK, ADV, REWARDS = A["logp"], A["old_logp"], A["ref_logp"], A["mask"], A["advantages"], A["rewards"]
PAIRS = online_dpo.select_pairs(REWARDS, num_generations=2)
G, R, P, D = grpo.GRPOConfig(), rloo.RLOOConfig(), ppo.PPOConfig(), online_dpo.OnlineDPOConfig()

CALLS = {
    "grpo logp rank": (lambda: grpo.loss(LOGP[0], OLD, REF, ADV, MASK, config=G), "logp"),
    "grpo old_logp shape": (lambda: grpo.loss(LOGP, OLD[:, :3], REF, ADV, MASK, config=G), "old_logp"),
    "grpo advantages shape": (lambda: grpo.loss(LOGP, OLD, REF, ADV[:4], MASK, config=G), "advantages"),
    "grpo mask shape": (lambda: grpo.loss(LOGP, OLD, REF, ADV, MASK[:, :2], config=G), "mask"),
    "grpo dtype mismatch": (lambda: grpo.loss(LOGP, OLD.astype(np.float32), REF, ADV, MASK, config=G), "old_logp"),
    "grpo integer logp": (lambda: grpo.loss(LOGP.astype(int), None, None, ADV, MASK, config=G), "logp"),
    "grpo integer mask": (lambda: grpo.loss(LOGP, OLD, REF, ADV, MASK.astype(int), config=G), "mask"),
    "grpo float32 mask": (lambda: grpo.loss(LOGP, OLD, REF, ADV, MASK.astype(np.float32), config=G), "mask"),
    "grpo ref missing": (lambda: grpo.loss(LOGP, OLD, None, ADV, MASK, config=grpo.GRPOConfig(beta=0.1)), "ref_logp"),
    "grpo group size": (lambda: grpo.advantages(REWARDS, num_generations=4, config=G), "num_generations"),
    "grpo group size zero": (lambda: grpo.advantages(REWARDS, num_generations=0, config=G), "num_generations"),
    "grpo rewards rank": (lambda: grpo.advantages(REWARDS[:, None], num_generations=3, config=G), "rewards"),
    "grpo loss_type": (lambda: grpo.GRPOConfig(loss_type="sapo"), "loss_type"),
    "grpo scale_rewards": (lambda: grpo.GRPOConfig(scale_rewards=True), "scale_rewards"),
    "grpo level": (lambda: grpo.GRPOConfig(importance_sampling_level="sequence_token"), "importance_sampling_level"),
    "grpo epsilon": (lambda: grpo.GRPOConfig(epsilon=1.5), "epsilon"),
    "grpo delta": (lambda: grpo.GRPOConfig(delta=0.9), "delta"),
    "aggregate loss_type": (lambda: _common.aggregate(LOGP, MASK, "luspo", max_completion_length=4), "loss_type"),
    "combine weights": (lambda: _common.combine_rewards(np.ones((6, 2)), np.ones(3)), "weights"),
    "rloo kl inputs": (lambda: rloo.advantages(REWARDS, num_generations=3, config=R), "logp"),
    "rloo ref for kl in loss": (lambda: rloo.loss(LOGP, OLD, None, ADV, MASK, config=rloo.RLOOConfig(kl_in="loss")),
                                "ref_logp"),
    "rloo group size": (lambda: rloo.advantages(REWARDS, num_generations=4, config=rloo.RLOOConfig(beta=0)),
                        "num_generations"),
    "rloo kl_in": (lambda: rloo.RLOOConfig(kl_in="both"), "kl_in"),
    "rloo clip range": (lambda: rloo.RLOOConfig(reward_clip_range=(1.0, 0.0)), "reward_clip_range"),
    "ppo scores shape": (lambda: ppo.token_rewards(REWARDS[:3], LOGP, REF, MASK, config=P), "scores"),
    "ppo values shape": (lambda: ppo.gae(LOGP, A["values"][:, :2], MASK, config=P), "values"),
    "ppo returns dtype": (lambda: ppo.loss(LOGP, OLD, LOGP, LOGP, LOGP, LOGP.astype(np.float32), MASK, config=P),
                          "returns"),
    "ppo kl_estimator": (lambda: ppo.PPOConfig(kl_estimator="k2"), "kl_estimator"),
    "ppo dual_clip": (lambda: ppo.PPOConfig(dual_clip=0.5), "dual_clip"),
    "ppo reward_position": (lambda: ppo.PPOConfig(reward_position="eos"), "reward_position"),
    "dpo group of one": (lambda: online_dpo.select_pairs(REWARDS, num_generations=1), "num_generations"),
    "dpo float indices": (lambda: online_dpo.loss(LOGP, REF, MASK, PAIRS[0].astype(float), PAIRS[1], PAIRS[2],
                                                  config=D), "chosen_idx"),
    "dpo valid shape": (lambda: online_dpo.loss(LOGP, REF, MASK, PAIRS[0], PAIRS[1], PAIRS[2][:1], config=D),
                        "valid"),
    "dpo loss_type": (lambda: online_dpo.OnlineDPOConfig(loss_type="hinge"), "loss_type"),
    "dpo beta": (lambda: online_dpo.OnlineDPOConfig(beta=0.0), "beta"),
    "eos has_eos dtype": (lambda: online_dpo.apply_missing_eos_penalty(REWARDS, REWARDS, 1.0), "has_eos"),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_bad_input_names_the_argument(name):
    call, argument = CALLS[name]
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        call()

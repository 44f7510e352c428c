"""PPO and Online DPO through the one training loop: LoRA runs, the value head's checkpoint and resume, GAE on
padded sequences against the float64 reference, and Online DPO's pair rule on ties and unscorable rewards."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aha.algos import ppo
from aha.backends.torch import TrainConfig, Trainer
from aha.backends.torch.algorithms import make_algorithm
from aha.backends.torch.batch import collate_rollout
from aha.backends.torch.config import ConfigError
from aha.backends.torch.logprobs import token_logprobs
from aha.backends.torch.tracking import read_metrics
from aha.backends.torch.batch import shuffle_in_units
from aha.conformance.tolerances import tolerance

REQUIRED_METRICS = {
    "ppo": ["reward/mean", "loss", "pg_loss", "vf_loss", "approx_kl", "clipfrac", "vf_clipfrac", "kl", "entropy",
            "value/explained_variance", "return/mean", "return/std", "advantage/mean", "advantage/std", "grad_norm"],
    "online_dpo": ["reward/mean", "loss", "rewards/margins", "rewards/accuracies", "rewards/chosen",
                   "rewards/rejected", "logps/chosen", "logps/rejected", "valid_fraction", "pairs/reward_margin",
                   "pairs/valid_fraction", "entropy", "grad_norm"],
}
# G = 1 for PPO (one completion per prompt, as TRL); two PPO epochs per rollout.
ALGO_SETTINGS = {"ppo": {"num_generations": 1, "num_iterations": 2}, "online_dpo": {"num_generations": 2}}
UNSCORABLE_PATTERN = [0.2, 0.7, 0.7, 0.2, None, 0.4, None, None]
"""Rewards by row of an 8-row batch (G = 4): group 0 has tied maxima (rows 1, 2) and minima (0, 3); group 1
has one scorable row, so no pair (spec/online_dpo.md worked example 2)."""


def tied_and_unscorable(prompts, completions, **_):
    return [UNSCORABLE_PATTERN[i % len(UNSCORABLE_PATTERN)] for i in range(len(completions))]


def _train(**values) -> Trainer:
    trainer = Trainer(TrainConfig.from_dict(values))
    trainer.train()
    return trainer


@pytest.mark.parametrize("algo", ["ppo", "online_dpo"])
def test_lora_run_writes_metrics_and_checkpoint(base_config, algo):
    trainer = _train(**{**base_config, "algo": algo, **ALGO_SETTINGS[algo],
                        "reward_funcs": ["think_answer_format", "tests/trainer/rewards.py:digit_fraction"]})
    rows = read_metrics(trainer.run_dir)
    assert [row["step"] for row in rows] == [1, 2]
    missing = [name for name in REQUIRED_METRICS[algo] if name not in rows[0]]
    assert not missing, f"metrics.jsonl lacks {missing}"
    assert all(math.isfinite(row["loss"]) for row in rows)
    checkpoint = trainer.run_dir / "checkpoint-2"
    assert all("lora" in name for name in load_file(checkpoint / "adapter_model.safetensors"))
    if algo == "ppo":
        head = load_file(checkpoint / "extra_modules" / "value_head.safetensors")
        assert head["linear.weight"].abs().sum() > 0, "the value head did not train (it starts at zero)"


def test_ppo_resume_equals_uninterrupted(base_config, tmp_path):
    """The value head and its optimizer state come back from the checkpoint: the resumed run is the same run."""
    values = {**base_config, "algo": "ppo", "num_generations": 2, "num_iterations": 2, "max_steps": 4,
              "save_steps": 2, "reward_funcs": ["tests/trainer/rewards.py:digit_fraction"], "log_completions_steps": 0}
    whole = _train(**{**values, "output_dir": str(tmp_path / "whole")})
    first = _train(**{**values, "output_dir": str(tmp_path / "split"), "max_steps": 2})
    resumed = _train(**{**values, "output_dir": str(tmp_path / "split"), "resume": str(first.run_dir)})
    assert resumed.step == 4
    keys = ["reward/mean", "loss", "pg_loss", "vf_loss", "approx_kl", "kl", "grad_norm"]
    assert ([{k: row[k] for k in keys} for row in read_metrics(resumed.run_dir)]
            == [{k: row[k] for k in keys} for row in read_metrics(whole.run_dir)])
    for (name, a), (_, b) in zip(whole.policy.named_trainable_parameters(),
                                 resumed.policy.named_trainable_parameters()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(whole.algorithm.modules["value_head"].named_parameters(),
                                 resumed.algorithm.modules["value_head"].named_parameters()):
        assert torch.equal(a, b), name


def _padded_ppo_batch(rng: np.random.Generator):
    """Four hand-made rows: prompts of 2-4 tokens, completions of 3, 5, 1 and 4 tokens (T = 5), the third
    truncated (no EOS), the fourth unscorable (every reward function NaN)."""
    prompts = [[5, 6], [7, 8, 9, 10], [11, 12, 13], [14, 15]]
    completions = [[20, 21, 2], [22, 23, 24, 25, 2], [26], [27, 28, 29, 2]]
    batch = collate_rollout(prompts, completions, [False, False, True, False], pad_token_id=0)
    shape = batch.completion_ids.shape
    batch.extras["old_logp"] = torch.tensor(rng.normal(-1.0, 0.5, shape), dtype=torch.float32)
    batch.extras["ref_logp"] = torch.tensor(rng.normal(-1.0, 0.5, shape), dtype=torch.float32)
    batch.extras["old_values"] = torch.tensor(rng.normal(0.0, 0.5, shape), dtype=torch.float32)
    rewards = torch.tensor([[1.0, 0.5], [np.nan, -0.25], [0.75, 0.0], [np.nan, np.nan]], dtype=torch.float64)
    return batch, rewards


@pytest.mark.parametrize("reward_position", ["first_pad", "last_token"])
def test_ppo_advantages_match_float64_reference(reward_position):
    """The adapter's GAE on padded rows (missing-EOS penalty, an unscorable row) equals aha.algos.ppo in
    float64, and values or log-probs where the spec says they are unused change nothing."""
    config = TrainConfig(algo="ppo", num_generations=1, per_device_train_batch_size=4, beta=0.1, kl_estimator="k3",
                         gamma=0.9, lam=0.8, missing_eos_penalty=0.5, reward_weights=(1.0, 2.0))
    algorithm = make_algorithm(config, 2, hidden_size=8)
    algorithm.algo_config = dataclasses.replace(algorithm.algo_config, reward_position=reward_position)
    batch, rewards = _padded_ppo_batch(np.random.default_rng(0))
    algorithm.prepare(batch, rewards)

    # The reference, by hand in NumPy float64: weighted NaN-ignoring sum, penalty, unscorable -> score 0, no mask.
    combined = np.array([1.0 + 2 * 0.5, 2 * -0.25, 0.75 - 0.5, 0.0])
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=np.float64)
    expected_adv, expected_returns = ppo.advantages(
        combined, batch.extras["old_logp"].double().numpy(), batch.extras["ref_logp"].double().numpy(),
        batch.extras["old_values"].double().numpy(), mask, config=algorithm.algo_config)
    np.testing.assert_array_equal(batch.mask.numpy(), mask)
    tol = tolerance("float32")  # float64 math, stored as float32 for the float32 loss
    for got, expected in ((batch.extras["advantages"], expected_adv), (batch.extras["returns"], expected_returns)):
        np.testing.assert_allclose(got.numpy(), expected, rtol=tol.rtol, atol=tol.atol * np.abs(expected).max())

    # Padding invariance: junk where the mask (log-probs) or the value mask (values) is 0 changes nothing.
    junk, _ = _padded_ppo_batch(np.random.default_rng(0))
    unused_values = ~ppo.value_mask(torch.as_tensor(mask), config=algorithm.algo_config)
    junk.extras["old_logp"][torch.as_tensor(mask) == 0] = 123.0
    junk.extras["ref_logp"][torch.as_tensor(mask) == 0] = -77.0
    junk.extras["old_values"][unused_values] = 1e3
    algorithm.prepare(junk, rewards)
    assert torch.equal(junk.extras["advantages"], batch.extras["advantages"])
    assert torch.equal(junk.extras["returns"], batch.extras["returns"])


def test_online_dpo_pairs_on_ties_and_nan_rewards(base_config):
    """Through the trainer: ties pick the earliest maximum and the latest minimum, a group with one scorable
    reward gives no pair, and the reference log-probs are scored at temperature 1 (spec/online_dpo.md §3)."""
    values = {**base_config, "algo": "online_dpo", "max_steps": 1, "temperature": 0.7, "log_completions_steps": 0,
              "reward_funcs": [f"{Path(__file__)}:tied_and_unscorable"]}
    trainer = _train(**values)
    extras = trainer.batch.extras
    assert extras["pair_chosen"][:4].tolist() == [1] * 4
    assert extras["pair_rejected"][:4].tolist() == [3] * 4
    assert extras["pair_valid"].tolist() == [True] * 4 + [False] * 4
    row = read_metrics(trainer.run_dir)[0]
    assert row["pairs/valid_fraction"] == 0.5 and row["valid_fraction"] == 0.5
    assert row["pairs/reward_margin"] == pytest.approx(0.5) and math.isfinite(row["loss"])

    batch = trainer.batch
    with torch.no_grad(), trainer.policy.reference():
        hidden = trainer._hidden(batch)
        weight = trainer.policy.lm_head_weight
        at_one, at_sampling = (token_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight,
                                              batch.completion_ids.reshape(-1), temperature=t).view(batch.mask.shape)
                               for t in (1.0, 0.7))
    tol = tolerance("float32")  # the trainer scored in micro-batches of 4 rows, here all 8 at once
    torch.testing.assert_close(extras["ref_logp"], at_one, rtol=tol.rtol, atol=tol.atol * at_one.abs().max().item())
    assert not torch.allclose(extras["ref_logp"], at_sampling, rtol=0.01)


def test_loss_type_and_pair_layout_are_validated_per_algorithm():
    for algo, loss_type in (("online_dpo", "dapo"), ("grpo", "ipo"), ("ppo", "grpo"), ("rloo", "sigmoid")):
        with pytest.raises(ConfigError, match=f"does not apply to {algo}"):
            TrainConfig(algo=algo, loss_type=loss_type, num_generations=2)
    TrainConfig(algo="online_dpo", loss_type="ipo", num_generations=2)
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        TrainConfig(algo="online_dpo", num_generations=4, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match="beta"):
        make_algorithm(TrainConfig(algo="online_dpo", beta=0.0, num_generations=2), 1, hidden_size=8)


def test_shuffle_keeps_groups_together():
    order = shuffle_in_units(12, 4, torch.Generator().manual_seed(0))
    blocks = order.view(3, 4)
    assert sorted(order.tolist()) == list(range(12))
    assert all(block.tolist() == list(range(block[0], block[0] + 4)) and block[0] % 4 == 0 for block in blocks)
    assert torch.equal(shuffle_in_units(12, 1, torch.Generator().manual_seed(0)),
                       torch.randperm(12, generator=torch.Generator().manual_seed(0)))

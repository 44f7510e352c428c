"""What differs between algorithms in the training loop, behind one small interface.

The trainer knows nothing of GRPO or RLOO: it asks the adapter how many samples each prompt
gets, which log-probs to score before the update, how rewards become advantages, and what the
loss of a micro-batch is. Every formula comes from `aha.algos` through `backends/torch/losses.py`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from aha.algos import grpo, rloo
from aha.algos._common import combine_rewards

from . import losses
from .batch import RolloutBatch
from .config import ConfigError, TrainConfig

Metrics = dict[str, float]


class Algorithm(Protocol):
    needs_old_logp: bool
    """Score the sampling policy's log-probs before the update (off-policy passes)."""
    needs_ref_logp: bool
    """Score the reference policy (adapter disabled) before the update."""

    def prepare(self, batch: RolloutBatch, rewards_per_func: torch.Tensor) -> Metrics:
        """Turn rewards [B, K] into what the loss needs (batch.extras); return metrics."""

    def loss(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             batch: RolloutBatch, *, num_items_in_batch: int,
             gradient_accumulation_steps: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to backpropagate for one micro-batch, already scaled for accumulation."""


def _reward_stats(rewards: torch.Tensor, num_generations: int) -> Metrics:
    grouped = rewards.view(-1, num_generations)
    scorable = ~torch.isnan(grouped)
    counts = scorable.sum(1)
    means = torch.where(scorable, grouped, 0).sum(1) / counts.clamp(min=1)
    spread = torch.where(scorable, (grouped - means[:, None]).abs(), 0).amax(1)
    valid = rewards[~torch.isnan(rewards)]
    return {
        "reward/mean": valid.mean().item() if valid.numel() else float("nan"),
        "reward/std": valid.std().item() if valid.numel() > 1 else 0.0,
        "reward/unscorable": float(torch.isnan(rewards).sum().item()),
        "frac_reward_zero_std": (spread < 1e-12).float().mean().item(),
    }


class _GroupRelative:
    """GRPO and RLOO: G samples per prompt, one advantage per sequence, a clipped surrogate."""

    algos_module = grpo

    def __init__(self, config: TrainConfig, weights: torch.Tensor, algo_config) -> None:
        self.config = config
        self.weights = weights
        self.algo_config = algo_config
        self.needs_old_logp = config.num_iterations > 1
        self.needs_ref_logp = config.beta != 0.0
        self.global_count = False

    def _advantages(self, rewards: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
        return self.algos_module.advantages(rewards, num_generations=self.config.num_generations,
                                            config=self.algo_config)

    def prepare(self, batch: RolloutBatch, rewards_per_func: torch.Tensor) -> Metrics:
        rewards = combine_rewards(rewards_per_func, self.weights.to(rewards_per_func))
        advantages = self._advantages(rewards, batch)
        batch.extras["advantages"] = advantages.float()
        stats = _reward_stats(rewards, self.config.num_generations)
        stats.update({"advantage/mean": advantages.mean().item(), "advantage/std": advantages.std().item(),
                      "advantage/max_abs": advantages.abs().max().item()})
        return stats

    def _scale(self, gradient_accumulation_steps: int) -> float:
        # Global-count normalizers (dapo, cispo) already divide by the whole generation batch's tokens.
        return 1.0 if self.global_count else 1.0 / gradient_accumulation_steps


class GRPOAdapter(_GroupRelative):
    algos_module = grpo

    def __init__(self, config: TrainConfig, weights: torch.Tensor) -> None:
        algo_config = grpo.GRPOConfig(
            epsilon=config.epsilon, epsilon_high=config.epsilon_high, delta=config.delta, beta=config.beta,
            loss_type=config.loss_type, scale_rewards=config.scale_rewards,
            importance_sampling_level=config.importance_sampling_level,
            max_completion_length=config.max_completion_length)
        super().__init__(config, weights, algo_config)
        self.global_count = config.loss_type in ("dapo", "cispo")

    def loss(self, hidden, weight, bias, batch, *, num_items_in_batch, gradient_accumulation_steps):
        loss, metrics = losses.grpo_loss(
            hidden, weight, batch.completion_ids, batch.mask, batch.extras.get("old_logp"),
            batch.extras.get("ref_logp"), batch.extras["advantages"], config=self.algo_config,
            temperature=self.config.temperature, bias=bias, num_items_in_batch=num_items_in_batch,
            with_entropy=True)
        return loss * self._scale(gradient_accumulation_steps), metrics


class RLOOAdapter(_GroupRelative):
    algos_module = rloo

    def __init__(self, config: TrainConfig, weights: torch.Tensor) -> None:
        algo_config = rloo.RLOOConfig(beta=config.beta, kl_in=config.kl_in, epsilon=config.epsilon,
                                      epsilon_high=config.epsilon_high)
        super().__init__(config, weights, algo_config)
        self.global_count = False
        # KL folded into the reward needs the sampling policy's log-probs before the advantages.
        self.needs_old_logp = config.num_iterations > 1 or (config.beta != 0 and config.kl_in == "reward")

    def _advantages(self, rewards: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
        return rloo.advantages(rewards, num_generations=self.config.num_generations, config=self.algo_config,
                               logp=_float64(batch.extras.get("old_logp")),
                               ref_logp=_float64(batch.extras.get("ref_logp")), mask=batch.mask.double())

    def loss(self, hidden, weight, bias, batch, *, num_items_in_batch, gradient_accumulation_steps):
        loss, metrics = losses.rloo_loss(
            hidden, weight, batch.completion_ids, batch.mask, batch.extras.get("old_logp"),
            batch.extras.get("ref_logp"), batch.extras["advantages"], config=self.algo_config,
            temperature=self.config.temperature, bias=bias, with_entropy=True)
        return loss * self._scale(gradient_accumulation_steps), metrics


def _float64(x: torch.Tensor | None) -> torch.Tensor | None:
    """Advantages are computed in float64 from float64 rewards; log-probs join them there."""
    return None if x is None else x.double()


ALGORITHMS = {"grpo": GRPOAdapter, "rloo": RLOOAdapter}


def make_algorithm(config: TrainConfig, num_reward_funcs: int) -> Algorithm:
    if config.algo not in ALGORITHMS:
        raise ConfigError(f"algo '{config.algo}' is not available in the trainer yet; "
                          f"choose one of {sorted(ALGORITHMS)}")
    weights = torch.tensor(config.reward_weights or [1.0] * num_reward_funcs, dtype=torch.float64)
    return ALGORITHMS[config.algo](config, weights)

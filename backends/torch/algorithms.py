"""What differs between algorithms in the training loop, behind one small interface.

The trainer knows nothing of GRPO, RLOO, PPO or Online DPO: it asks the adapter which log-probs to score
before the update (and at which temperature), what else to read off the sampling policy's hidden states
(PPO's rollout values), how rewards become what the loss needs, which rows must share a micro-batch
(Online DPO's pairs), which extra modules train with the policy (PPO's value head), and what the loss of a
micro-batch is. Every formula comes from `aha.algos` through `backends/torch/losses.py`.

TrainConfig -> algos config, per algorithm (TRL's names where they differ):
    GRPO        beta, epsilon, epsilon_high, delta, loss_type, scale_rewards, importance_sampling_level;
                with rollout="vllm", vllm_importance_sampling_* -> mismatch.importance_sampling_ratio, the
                loss's importance_sampling_ratio (the other algorithms have no such weight and ignore them)
    RLOO        beta, kl_in, epsilon, epsilon_high
    PPO         beta -> kl_coef, epsilon -> cliprange, kl_estimator, gamma, lam, vf_coef, cliprange_value,
                whiten_rewards; num_iterations is TRL's num_ppo_epochs (one mini-batch per epoch)
    Online DPO  beta, loss_type
A `None` beta or loss_type takes the algorithm's own default from its `aha.algos` config.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from aha.algos import grpo, mismatch, online_dpo, ppo, rloo
from aha.algos._common import (apply_missing_eos_penalty, combine_rewards, kl_estimate, masked_mean, masked_var,
                               nanmean, nanstd)

from . import distributed, losses
from .batch import RolloutBatch
from .config import ConfigError, TrainConfig
from .value_head import ValueHead

Metrics = dict[str, float]


class Algorithm(Protocol):
    needs_old_logp: bool
    """Score the sampling policy's log-probs before the update (off-policy passes, PPO's KL and ratio)."""
    needs_ref_logp: bool
    """Score the reference policy (adapter disabled) before the update."""
    temperature: float
    """Temperature of every log-prob the algorithm scores (the sampling one; Online DPO: 1, spec §3)."""
    micro_batch_unit: int
    """Rows that must share a micro-batch, contiguous and in order: shuffling moves blocks of this size."""
    corrects_mismatch: bool
    """Weights its loss by the sampler-to-trainer ratio (spec/grpo.md §2.5): the trainer then stores the rollout
    engine's log-probs in batch.extras["sampler_logp"] (GRPO with rollout="vllm")."""
    modules: dict[str, nn.Module]
    """Extra trainable modules (PPO: {"value_head": ...}): optimized with the policy, saved in checkpoints."""

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups of `modules` (with their own learning rate where one is set)."""

    def score(self, hidden: torch.Tensor, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        """Per-row tensors read off the sampling policy's hidden states [b, T, H] in the old-log-prob pass
        (no grad; called only when needs_old_logp), e.g. PPO's rollout values [b, T]; the trainer stores them
        in batch.extras before `prepare`."""

    def prepare(self, batch: RolloutBatch, rewards_per_func: torch.Tensor) -> Metrics:
        """Turn rewards [B, K] into what the loss needs (batch.extras); return metrics."""

    def loss(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             batch: RolloutBatch, *, num_items_in_batch: int,
             gradient_accumulation_steps: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to backpropagate for one micro-batch, already scaled for accumulation."""


class _Adapter:
    """Defaults shared by the four adapters: no extra modules or scores, rows shuffled one by one."""

    micro_batch_unit = 1
    corrects_mismatch = False

    def __init__(self, config: TrainConfig, weights: torch.Tensor) -> None:
        self.config = config
        self.weights = weights
        self.temperature = config.temperature
        self.modules: dict[str, nn.Module] = {}

    def score(self, hidden: torch.Tensor, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        return {}

    def param_groups(self) -> list[dict]:
        return [{"params": list(module.parameters())} for module in self.modules.values()]

    def _rewards(self, batch: RolloutBatch, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """R_i (NaN = not scorable) minus the missing-EOS penalty (spec/common.md §6, eq. 8): [B] float64."""
        rewards = combine_rewards(rewards_per_func, self.weights.to(rewards_per_func))
        return apply_missing_eos_penalty(rewards, ~batch.truncated, self.config.missing_eos_penalty)


def _reward_stats(rewards: torch.Tensor, num_generations: int) -> Metrics:
    """Mean and std (Bessel) of the scorable rewards, how many are not, and the share of groups whose
    scorable rewards are all equal (no learning signal for GRPO and RLOO)."""
    stats = {
        "reward/mean": nanmean(rewards).item(),
        "reward/std": nanstd(rewards, ddof=1).item(),
        "reward/unscorable": float(torch.isnan(rewards).sum().item()),
    }
    if num_generations > 1:
        spread = nanstd(rewards.view(-1, num_generations), axis=1, ddof=0)
        stats["frac_reward_zero_std"] = (torch.nan_to_num(spread) == 0).float().mean().item()
    return stats


def _default(value, algo_config_class, field: str):
    """A TrainConfig value, or the algorithm's own default where it is None."""
    return getattr(algo_config_class, field) if value is None else value


class _GroupRelative(_Adapter):
    """GRPO and RLOO: G samples per prompt, one advantage per sequence, a clipped surrogate."""

    algos_module = grpo

    def __init__(self, config: TrainConfig, weights: torch.Tensor, algo_config) -> None:
        super().__init__(config, weights)
        self.algo_config = algo_config
        self.needs_old_logp = config.num_iterations > 1
        self.needs_ref_logp = algo_config.beta != 0.0
        self.global_count = False

    def _advantages(self, rewards: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
        return self.algos_module.advantages(rewards, num_generations=self.config.num_generations,
                                            config=self.algo_config)

    def prepare(self, batch: RolloutBatch, rewards_per_func: torch.Tensor) -> Metrics:
        rewards = self._rewards(batch, rewards_per_func)
        advantages = self._advantages(rewards, batch)
        batch.extras["advantages"] = advantages.float()
        stats = _reward_stats(rewards, self.config.num_generations)
        stats.update({"advantage/mean": advantages.mean().item(), "advantage/std": advantages.std().item(),
                      "advantage/max_abs": advantages.abs().max().item()})
        return stats

    def _scale(self, gradient_accumulation_steps: int) -> float:
        # c of spec/common.md eq. 7. Global-count normalizers (dapo, cispo) already divide by the tokens of the
        # whole step on all P processes, whose gradients are then averaged: c = P (1 in one process).
        return float(distributed.world_size()) if self.global_count else 1.0 / gradient_accumulation_steps


class GRPOAdapter(_GroupRelative):
    algos_module = grpo

    def __init__(self, config: TrainConfig, weights: torch.Tensor, *, hidden_size: int, device) -> None:
        algo_config = grpo.GRPOConfig(
            epsilon=config.epsilon, epsilon_high=config.epsilon_high, delta=config.delta,
            beta=_default(config.beta, grpo.GRPOConfig, "beta"),
            loss_type=_default(config.loss_type, grpo.GRPOConfig, "loss_type"), scale_rewards=config.scale_rewards,
            importance_sampling_level=config.importance_sampling_level,
            max_completion_length=config.max_completion_length)
        super().__init__(config, weights, algo_config)
        self.global_count = algo_config.loss_type in ("dapo", "cispo")
        # The train/inference mismatch correction (spec/grpo.md §2.5) compares the sampler's log-probs with the
        # trainer's, so π_old is scored even on-policy (as TRL).
        self.corrects_mismatch = config.rollout == "vllm" and config.vllm_importance_sampling_correction
        self.needs_old_logp = self.needs_old_logp or self.corrects_mismatch

    def prepare(self, batch: RolloutBatch, rewards_per_func: torch.Tensor) -> Metrics:
        stats = super().prepare(batch, rewards_per_func)
        if self.corrects_mismatch:
            old_logp, sampler_logp = batch.extras["old_logp"], batch.extras["sampler_logp"]
            ratio = mismatch.importance_sampling_ratio(
                old_logp, sampler_logp, batch.mask, mode=self.config.vllm_importance_sampling_mode,
                clip_min=self.config.vllm_importance_sampling_clip_min,
                clip_max=self.config.vllm_importance_sampling_clip_max)
            batch.extras["importance_sampling_ratio"] = ratio
            stats.update({name: value.item() for name, value in
                          mismatch.mismatch_metrics(old_logp, sampler_logp, batch.mask, ratio).items()})
        return stats

    def _advantages(self, rewards: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
        if self.algo_config.scale_rewards == "batch" and distributed.world_size() > 1:
            # The batch std is over the whole step: gather every process's rewards (groups stay whole on their
            # process, so group means are unchanged) and keep this process's rows (distributed.py).
            everyone = grpo.advantages(distributed.gather_rows(rewards), num_generations=self.config.num_generations,
                                       config=self.algo_config)
            return distributed.own_rows(everyone)
        return super()._advantages(rewards, batch)

    def loss(self, hidden, weight, bias, batch, *, num_items_in_batch, gradient_accumulation_steps):
        loss, metrics = losses.grpo_loss(
            hidden, weight, batch.completion_ids, batch.mask, batch.extras.get("old_logp"),
            batch.extras.get("ref_logp"), batch.extras["advantages"], config=self.algo_config,
            temperature=self.temperature, bias=bias, num_items_in_batch=num_items_in_batch,
            importance_sampling_ratio=batch.extras.get("importance_sampling_ratio"), with_entropy=True)
        return loss * self._scale(gradient_accumulation_steps), metrics


class RLOOAdapter(_GroupRelative):
    algos_module = rloo

    def __init__(self, config: TrainConfig, weights: torch.Tensor, *, hidden_size: int, device) -> None:
        algo_config = rloo.RLOOConfig(beta=_default(config.beta, rloo.RLOOConfig, "beta"), kl_in=config.kl_in,
                                      epsilon=config.epsilon, epsilon_high=config.epsilon_high)
        super().__init__(config, weights, algo_config)
        # KL folded into the reward needs the sampling policy's log-probs before the advantages.
        self.needs_old_logp = config.num_iterations > 1 or (algo_config.beta != 0 and config.kl_in == "reward")

    def _advantages(self, rewards: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
        return rloo.advantages(rewards, num_generations=self.config.num_generations, config=self.algo_config,
                               logp=_float64(batch.extras.get("old_logp")),
                               ref_logp=_float64(batch.extras.get("ref_logp")), mask=batch.mask.double())

    def loss(self, hidden, weight, bias, batch, *, num_items_in_batch, gradient_accumulation_steps):
        loss, metrics = losses.rloo_loss(
            hidden, weight, batch.completion_ids, batch.mask, batch.extras.get("old_logp"),
            batch.extras.get("ref_logp"), batch.extras["advantages"], config=self.algo_config,
            temperature=self.temperature, bias=bias, with_entropy=True)
        return loss * self._scale(gradient_accumulation_steps), metrics


class PPOAdapter(_Adapter):
    """PPO with a value head (spec/ppo.md): per-token rewards with a KL penalty, GAE, whitened advantages,
    clipped policy and value losses. The rollout values come from the old-log-prob pass, so GAE sees the
    values of the policy that sampled; the advantages are computed once per rollout in float64."""

    def __init__(self, config: TrainConfig, weights: torch.Tensor, *, hidden_size: int, device) -> None:
        super().__init__(config, weights)
        self.algo_config = ppo.PPOConfig(
            gamma=config.gamma, lam=config.lam, kl_coef=_default(config.beta, ppo.PPOConfig, "kl_coef"),
            kl_estimator=config.kl_estimator, cliprange=config.epsilon, cliprange_value=config.cliprange_value,
            vf_coef=config.vf_coef, whiten_rewards=config.whiten_rewards)
        self.needs_old_logp = True  # the KL penalty in the reward and the ratio both need log π_old
        self.needs_ref_logp = self.algo_config.kl_coef != 0.0
        self.value_head = ValueHead(hidden_size, trains_backbone=config.value_head_trains_backbone).to(device)
        self.modules = {"value_head": self.value_head}

    def param_groups(self) -> list[dict]:
        own = self.config.value_head_learning_rate
        return [{"params": list(self.value_head.parameters()),
                 "lr": self.config.learning_rate if own is None else own}]

    def score(self, hidden, batch):
        return {"old_values": self.value_head(hidden)}

    def prepare(self, batch: RolloutBatch, rewards_per_func: torch.Tensor) -> Metrics:
        rewards = self._rewards(batch, rewards_per_func)
        # spec/ppo.md §2: PPO has no group to leave an unscorable row out of; it gets score 0 and no loss.
        scorable = ~torch.isnan(rewards)
        batch.mask = batch.mask * scorable[:, None].to(batch.mask.dtype)
        mask = batch.mask.double()
        old_logp = batch.extras["old_logp"].double()
        ref_logp = batch.extras["ref_logp"].double() if self.needs_ref_logp else old_logp
        values = batch.extras["old_values"].double()
        advantages, returns = ppo.advantages(torch.where(scorable, rewards, 0.0), old_logp, ref_logp, values, mask,
                                             config=self.algo_config)
        batch.extras["advantages"], batch.extras["returns"] = advantages.float(), returns.float()

        scoring = ppo.value_mask(mask, config=self.algo_config)
        return_var = masked_var(returns, scoring, ddof=1)
        residual_var = masked_var(returns - values, scoring, ddof=1)
        kl = kl_estimate(old_logp, ref_logp, self.algo_config.kl_estimator)
        stats = _reward_stats(rewards, self.config.num_generations)
        stats.update({
            "kl": masked_mean(kl, mask).item(),
            "advantage/mean": masked_mean(advantages, mask).item(),
            "advantage/std": masked_var(advantages, mask, ddof=1).sqrt().item(),
            "advantage/max_abs": advantages.abs().max().item(),
            "return/mean": masked_mean(returns, scoring).item(),
            "return/std": return_var.sqrt().item(),
            # Of the rollout values, before this rollout's updates (cleanrl's explained_variance).
            "value/explained_variance": (1.0 - residual_var / return_var).item() if return_var > 0 else float("nan"),
        })
        return stats

    def loss(self, hidden, weight, bias, batch, *, num_items_in_batch, gradient_accumulation_steps):
        loss, metrics = losses.ppo_loss(
            hidden, weight, batch.completion_ids, batch.mask, batch.extras["old_logp"], batch.extras["advantages"],
            self.value_head(hidden), batch.extras["old_values"], batch.extras["returns"], config=self.algo_config,
            temperature=self.temperature, bias=bias, with_entropy=True)
        return loss / gradient_accumulation_steps, metrics


class OnlineDPOAdapter(_Adapter):
    """Online DPO (spec/online_dpo.md): one (chosen, rejected) pair per group of G samples, DPO or IPO loss
    against the reference policy. Log-probs are scored at temperature 1 (spec §3, as TRL): the implicit reward
    is defined on the model's own distribution; the sampling temperature only decides which pairs are seen.

    Each row carries its group's pair as offsets into the group, and micro-batches hold whole groups, so the
    loss rebuilds the pair's row indices inside any micro-batch. Rows that are neither chosen nor rejected
    (G > 2) get no gradient."""

    def __init__(self, config: TrainConfig, weights: torch.Tensor, *, hidden_size: int, device) -> None:
        super().__init__(config, weights)
        self.algo_config = online_dpo.OnlineDPOConfig(
            beta=_default(config.beta, online_dpo.OnlineDPOConfig, "beta"),
            loss_type=_default(config.loss_type, online_dpo.OnlineDPOConfig, "loss_type"))
        self.temperature = 1.0
        self.micro_batch_unit = config.num_generations
        self.needs_old_logp = False
        self.needs_ref_logp = True

    def prepare(self, batch: RolloutBatch, rewards_per_func: torch.Tensor) -> Metrics:
        group = self.config.num_generations
        rewards = self._rewards(batch, rewards_per_func)
        chosen, rejected, valid = online_dpo.select_pairs(rewards, num_generations=group)
        starts = torch.arange(0, len(batch), group)
        batch.extras["pair_chosen"] = (chosen - starts).repeat_interleave(group)
        batch.extras["pair_rejected"] = (rejected - starts).repeat_interleave(group)
        batch.extras["pair_valid"] = valid.repeat_interleave(group)
        stats = _reward_stats(rewards, group)
        margins = (rewards[chosen] - rewards[rejected])[valid]
        stats["pairs/reward_margin"] = margins.mean().item() if margins.numel() else float("nan")
        stats["pairs/valid_fraction"] = valid.double().mean().item()
        return stats

    def loss(self, hidden, weight, bias, batch, *, num_items_in_batch, gradient_accumulation_steps):
        starts = torch.arange(0, len(batch), self.config.num_generations, device=batch.mask.device)
        loss, metrics = losses.online_dpo_loss(
            hidden, weight, batch.completion_ids, batch.mask, batch.extras["ref_logp"],
            starts + batch.extras["pair_chosen"][starts], starts + batch.extras["pair_rejected"][starts],
            batch.extras["pair_valid"][starts], config=self.algo_config, temperature=self.temperature, bias=bias,
            with_entropy=True)
        return loss / gradient_accumulation_steps, metrics


def _float64(x: torch.Tensor | None) -> torch.Tensor | None:
    """Advantages are computed in float64 from float64 rewards; log-probs join them there."""
    return None if x is None else x.double()


ALGORITHMS = {"grpo": GRPOAdapter, "rloo": RLOOAdapter, "ppo": PPOAdapter, "online_dpo": OnlineDPOAdapter}


_KL_COEFFICIENT = {"grpo": (grpo.GRPOConfig, "beta"), "rloo": (rloo.RLOOConfig, "beta"),
                   "ppo": (ppo.PPOConfig, "kl_coef")}


def needs_reference_model(config: TrainConfig) -> bool:
    """Whether the run scores a reference policy: Online DPO always, the others when their KL
    coefficient is non-zero. Known before the model loads, so full fine-tuning can keep a frozen
    copy exactly when one is needed (LoRA switches its adapter off instead)."""
    if config.algo not in _KL_COEFFICIENT:
        return True
    config_class, field = _KL_COEFFICIENT[config.algo]
    return _default(config.beta, config_class, field) != 0.0


def make_algorithm(config: TrainConfig, num_reward_funcs: int, *, hidden_size: int,
                   device: torch.device | str = "cpu") -> Algorithm:
    """The adapter of `config.algo`; `hidden_size` and `device` place extra modules (PPO's value head)."""
    if config.algo not in ALGORITHMS:
        raise ConfigError(f"algo '{config.algo}' is not available in the trainer; choose one of {sorted(ALGORITHMS)}")
    weights = torch.tensor(config.reward_weights or [1.0] * num_reward_funcs, dtype=torch.float64)
    try:
        return ALGORITHMS[config.algo](config, weights, hidden_size=hidden_size, device=device)
    except ConfigError:
        raise
    except ValueError as error:  # an aha.algos config rejected a value; name the algorithm
        raise ConfigError(f"{config.algo}: {error}") from None

"""RLOO: REINFORCE with a leave-one-out baseline, as TRL >= v0.22 implements it.

Spec: spec/rloo.md. TRL semantics: shared/reference/trl.md §3.
Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!", eq. 5 (leave-one-out baseline);
Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for RLHF", eq. 7 (RLOO with
the KL penalty in the sequence reward); Schulman et al. 2017 (PPO), eq. 7 (clipped surrogate, here on the
full-sequence ratio).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from array_api_compat import array_namespace

from ._common import (
    Array,
    Metrics,
    as_bool,
    as_float,
    check_clipped_surrogate_config,
    check_float,
    check_group_size,
    check_mask,
    check_shapes,
    kl_estimate,
    masked_mean,
    masked_sum,
    nan_count,
    nan_to_zero,
    nanmean,
    nansum,
    nanstd,
    stop_gradient,
)


@dataclass(frozen=True)
class RLOOConfig:
    beta: float = 0.05
    """KL coefficient (TRL default 0.05); 0 = no reference model."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL goes. "reward" (TRL): R_i -= β Σ_t m (log π_old - log π_ref) (k1, no gradient), before the
    baseline. "loss" (not TRL): β Σ_t m k3(π, π_ref) is added to each sequence's loss (with gradient)."""
    epsilon: float = 0.2
    """Lower clip range of the sequence ratio."""
    epsilon_high: float | None = None
    """Upper clip range of the sequence ratio; None -> epsilon."""
    normalize_advantages: bool = False
    """Whiten the advantages over the batch: (A - nanmean A) / (nanstd A + advantage_epsilon) (trl.md §3.2)."""
    reward_clip_range: tuple[float, float] | None = None
    """Clamp of the combined reward to [low, high] before the KL penalty; None = no clamp."""
    advantage_epsilon: float = 1e-4
    """ε added to the std when ``normalize_advantages`` (TRL hard-codes 1e-4)."""
    std_ddof: int = 1
    """Delta degrees of freedom of that std (1 = Bessel, as TRL's ``nanstd``)."""

    def __post_init__(self):
        if self.kl_in not in ("reward", "loss"):
            raise ValueError(f"kl_in: unknown {self.kl_in!r}; expected 'reward' or 'loss'")
        check_clipped_surrogate_config(self)
        if self.reward_clip_range is not None and not self.reward_clip_range[0] <= self.reward_clip_range[1]:
            raise ValueError(f"reward_clip_range: expected (low, high) with low <= high, got {self.reward_clip_range}")

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def advantages(
    rewards: Array,
    *,
    num_generations: int,
    config: RLOOConfig,
    logp: Array | None = None,
    ref_logp: Array | None = None,
    mask: Array | None = None,
) -> Array:
    """Leave-one-out advantages A_i = R_i - mean_{j in S, j != i} R_j (spec/rloo.md eqs. 1–5; trl.md §3.2).

    Shapes: rewards [B] (NaN = not scorable); logp (the sampling/old policy), ref_logp, mask [B, T] -> [B].
    R_i = clip(r_i) - β Σ_t m_it (logp_it - ref_logp_it) when kl_in == "reward" and β != 0 (then logp, ref_logp
    and mask are required). S: the scorable members of i's group. Groups with < 2 scorable members and unscorable
    rows get 0. Optional batch normalization (``normalize_advantages``). Computed without gradient.
    """
    check_shapes(rewards=(rewards, "B"), logp=(logp, "B T"), ref_logp=(ref_logp, "B T"), mask=(mask, "B T"))
    check_float(rewards=rewards, logp=logp, ref_logp=ref_logp)
    check_group_size(rewards.shape[0], num_generations)
    xp = array_namespace(rewards)
    rewards = stop_gradient(rewards)
    if config.reward_clip_range is not None:
        rewards = xp.clip(rewards, min=config.reward_clip_range[0], max=config.reward_clip_range[1])
    if config.kl_in == "reward" and config.beta != 0:
        for name, array in (("logp", logp), ("ref_logp", ref_logp), ("mask", mask)):
            if array is None:
                raise ValueError(f"{name}: required when config.kl_in == 'reward' and config.beta != 0")
        check_mask(mask, logp)
        rewards = rewards - config.beta * sequence_kl(stop_gradient(logp), stop_gradient(ref_logp), mask)

    grouped = xp.reshape(rewards, (-1, num_generations))
    count = nan_count(grouped, axis=1)
    others = nansum(grouped, axis=1, keepdims=True) - grouped
    baseline = xp.where(count > 1, others / xp.clip(count - 1, min=1.0), xp.full_like(grouped, math.nan))
    result = xp.reshape(grouped - baseline, (-1,))
    if config.normalize_advantages:
        result = (result - nanmean(result)) / (nanstd(result, ddof=config.std_ddof) + config.advantage_epsilon)
    return nan_to_zero(result)


def sequence_kl(logp: Array, ref_logp: Array, mask: Array) -> Array:
    """Σ_t m_it (log π_it - log π_ref,it): k1 sequence KL (spec/rloo.md eq. 2; trl.md §3.2). [B, T] -> [B]."""
    return masked_sum(kl_estimate(logp, ref_logp, "k1"), mask, axis=-1)


def loss(
    logp: Array,
    old_logp: Array | None,
    ref_logp: Array | None,
    advantages: Array,
    mask: Array,
    *,
    config: RLOOConfig,
) -> tuple[Array, Metrics]:
    """Sequence-level clipped REINFORCE loss (spec/rloo.md eqs. 6–9; trl.md §3.3).

    Shapes: logp, old_logp, ref_logp, mask [B, T]; advantages [B]. Returns a 0-d loss and 0-d metrics.

    ρ_i = exp(Σ_t m (log π - log π_old)) (full-sequence ratio, product of token ratios);
    ℓ_i = -min(ρ_i A_i, clip(ρ_i, 1-ε_low, 1+ε_high) A_i) [+ β Σ_t m k3 if kl_in == "loss"]; L = mean_i ℓ_i.
    ``old_logp=None``: on-policy (ρ = 1 in value, gradient -A_i ∇Σ_t log π). ``ref_logp`` is required only for
    kl_in == "loss" with β != 0; when given, the ``kl`` metric reports the KL estimator of the configured mode.
    """
    check_shapes(
        logp=(logp, "B T"), old_logp=(old_logp, "B T"), ref_logp=(ref_logp, "B T"),
        advantages=(advantages, "B"), mask=(mask, "B T"),
    )
    check_float(logp=logp, old_logp=old_logp, ref_logp=ref_logp, advantages=advantages)
    check_mask(mask, logp)
    kl_in_loss = config.kl_in == "loss" and config.beta != 0
    if ref_logp is None and kl_in_loss:
        raise ValueError("ref_logp: required when config.kl_in == 'loss' and config.beta != 0")
    xp = array_namespace(logp, mask)

    old_logp = stop_gradient(logp) if old_logp is None else stop_gradient(old_logp)
    adv = stop_gradient(advantages)
    log_ratio = masked_sum(logp - old_logp, mask, axis=-1)
    ratio = xp.exp(log_ratio)
    clipped = xp.clip(ratio, min=1.0 - config.epsilon, max=1.0 + config.clip_high)
    per_sequence = -xp.minimum(ratio * adv, clipped * adv)

    kl = None
    if ref_logp is not None:
        reference = stop_gradient(ref_logp)
        if config.kl_in == "loss":
            kl = xp.where(as_bool(mask), kl_estimate(logp, reference, "k3"), xp.zeros_like(logp))
        else:
            kl = kl_estimate(old_logp, reference, "k1")
        if kl_in_loss:
            per_sequence = per_sequence + config.beta * masked_sum(kl, mask, axis=-1)

    return xp.mean(per_sequence), _metrics(ratio, adv, kl, mask, config)


def _metrics(ratio: Array, adv: Array, kl: Array | None, mask: Array, config: RLOOConfig) -> Metrics:
    """spec/rloo.md §4: sequence-level clip fractions (as TRL), ratio mean, token-mean KL when a reference is given."""
    xp = array_namespace(ratio)
    ratio = stop_gradient(ratio)
    low = (ratio < 1.0 - config.epsilon) & (adv < 0)
    high = (ratio > 1.0 + config.clip_high) & (adv > 0)
    fraction = lambda flags: xp.mean(as_float(flags, ratio.dtype))  # noqa: E731
    metrics: Metrics = {
        "clip_ratio/low_mean": fraction(low),
        "clip_ratio/high_mean": fraction(high),
        "clip_ratio/region_mean": fraction(low | high),
        "ratio_mean": xp.mean(ratio),
        "advantage_mean": xp.mean(adv),
    }
    if kl is not None:
        metrics["kl"] = masked_mean(stop_gradient(kl), mask)
    return metrics

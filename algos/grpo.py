"""GRPO and its loss variants (bnpo, dr_grpo, dapo, cispo; GSPO via sequence-level ratios).

Spec: spec/grpo.md. TRL semantics: shared/reference/trl.md §2 (TRL v1.9.0 / 1.10.0.dev0).
Shao et al. 2024, "DeepSeekMath" (GRPO), eqs. 3–4; Yu et al. 2025 (DAPO), eq. 8 (clip-higher, token loss);
Zheng et al. 2025 (GSPO), eq. 7 (sequence ratio); MiniMax 2025 (CISPO), eq. 4; Prime Intellect 2025
(INTELLECT-2) §3.3 (two-sided clipping δ).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from array_api_compat import array_namespace

from ._common import (
    AGGREGATION_NAMES,
    Array,
    Metrics,
    aggregate,
    as_bool,
    as_float,
    check_clipped_surrogate_config,
    check_float,
    check_group_size,
    check_mask,
    check_shapes,
    kl_estimate,
    masked_mean,
    nan_to_zero,
    nanmean,
    nanstd,
    stop_gradient,
)

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"]


@dataclass(frozen=True)
class GRPOConfig:
    epsilon: float = 0.2
    """Lower clip range ε_low: ratios below 1 - ε_low are clipped (spec/grpo.md "Clipped surrogate")."""
    epsilon_high: float | None = None
    """Upper clip range ε_high (DAPO clip-higher); None -> ε. For ``cispo`` the ratio cap itself (TRL sharp edge)."""
    delta: float | None = None
    """Two-sided clipping (INTELLECT-2): cap of the unclipped ratio branch; None = off. Recommended > 1 + ε_high."""
    beta: float = 0.0
    """Coefficient of the k3 KL(π‖π_ref) term added to every token's loss (0 = no reference model)."""
    loss_type: LossType = "dapo"
    """Per-token objective and aggregation (spec/common.md "Aggregation"; trl.md §2.6, §2.8)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage denominator: group std, batch std, or none (mean is always the group mean; trl.md §2.2)."""
    advantage_epsilon: float = 1e-4
    """ε_A added to the std in the advantage denominator (TRL hard-codes 1e-4)."""
    std_ddof: int = 1
    """Delta degrees of freedom of the reward std (1 = Bessel, as TRL's ``nanstd``)."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """Token ratios r_it, or GSPO's sequence ratio exp(masked mean of log-ratios)."""
    max_completion_length: int = 512
    """L of the ``dr_grpo`` normalizer B·L (TRL default 512 at HEAD, 256 in <= v1.9.0)."""

    def __post_init__(self):
        if self.loss_type not in AGGREGATION_NAMES:
            raise ValueError(f"loss_type: unknown {self.loss_type!r}; expected one of {AGGREGATION_NAMES}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards: unknown {self.scale_rewards!r}; expected 'group', 'batch' or 'none'")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                f"importance_sampling_level: unknown {self.importance_sampling_level!r}; expected 'token' or 'sequence'"
            )
        check_clipped_surrogate_config(self)
        if self.delta is not None and self.delta <= 1:
            raise ValueError(f"delta: expected > 1 (INTELLECT-2 recommends > 1 + epsilon_high), got {self.delta}")
        if self.max_completion_length < 1:
            raise ValueError(f"max_completion_length: expected >= 1, got {self.max_completion_length}")

    @property
    def clip_high(self) -> float:
        """ε_high as used: ``epsilon_high`` or, when unset, ``epsilon`` (TRL grpo_trainer L920–921)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def advantages(rewards: Array, *, num_generations: int, config: GRPOConfig) -> Array:
    """Group-relative advantages A_i = (R_i - μ_g(i)) / (σ + ε_A) (spec/grpo.md eqs. 1–2; trl.md §2.2).

    Shapes: rewards [B] (NaN = not scorable), groups are contiguous rows [kG, (k+1)G) -> [B].
    μ_g: NaN-ignoring group mean. σ: NaN-ignoring std with ``std_ddof`` over the group ("group") or the whole
    batch ("batch"); no division for "none". Every NaN advantage becomes 0: unscorable rows, and groups with
    fewer than ddof + 1 scorable rewards under std scaling (TRL). Computed without gradient.
    """
    check_shapes(rewards=(rewards, "B"))
    check_float(rewards=rewards)
    check_group_size(rewards.shape[0], num_generations)
    xp = array_namespace(rewards)
    rewards = stop_gradient(rewards)
    grouped = xp.reshape(rewards, (-1, num_generations))
    centered = grouped - nanmean(grouped, axis=1)
    if config.scale_rewards == "group":
        centered = centered / (nanstd(grouped, axis=1, ddof=config.std_ddof) + config.advantage_epsilon)
    elif config.scale_rewards == "batch":
        centered = centered / (nanstd(rewards, ddof=config.std_ddof) + config.advantage_epsilon)
    return nan_to_zero(xp.reshape(centered, (-1,)))


def importance_log_ratio(logp: Array, old_logp: Array, mask: Array, level: str) -> Array:
    """log ρ: token level log π - log π_old [B, T]; sequence level (GSPO eq. 7) its masked mean [B, 1]
    (spec/grpo.md eqs. 3–4).

    Inactive positions have log-ratio 0 (so ρ = 1 there and nothing overflows in padding).
    """
    xp = array_namespace(logp, mask)
    log_ratio = xp.where(as_bool(mask), logp - old_logp, xp.zeros_like(logp))
    if level == "token":
        return log_ratio
    return masked_mean(log_ratio, mask, axis=-1)[:, None]


def _clipped_surrogate(ratio: Array, adv: Array, logp: Array, config: GRPOConfig) -> Array:
    """ℓ = -min(min(ρ, δ)·A, clip(ρ, 1-ε_low, 1+ε_high)·A) (spec/grpo.md eq. 5; DAPO eq. 8; INTELLECT-2 δ)."""
    xp = array_namespace(ratio)
    clipped = xp.clip(ratio, min=1.0 - config.epsilon, max=1.0 + config.clip_high)
    unclipped = ratio if config.delta is None else xp.clip(ratio, max=config.delta)
    return -xp.minimum(unclipped * adv, clipped * adv)


def _cispo(ratio: Array, adv: Array, logp: Array, config: GRPOConfig) -> Array:
    """ℓ = -sg[min(ρ, ε_high)]·A·log π (spec/grpo.md eq. 6; CISPO eq. 4); the cap is ε_high, not 1 + ε_high."""
    xp = array_namespace(ratio)
    return -stop_gradient(xp.clip(ratio, max=config.clip_high)) * adv * logp


_POLICY_TERMS = {
    "grpo": _clipped_surrogate,
    "bnpo": _clipped_surrogate,
    "dr_grpo": _clipped_surrogate,
    "dapo": _clipped_surrogate,
    "cispo": _cispo,
}


def loss(
    logp: Array,
    old_logp: Array | None,
    ref_logp: Array | None,
    advantages: Array,
    mask: Array,
    *,
    config: GRPOConfig,
    num_items_in_batch: Array | float | None = None,
    importance_sampling_ratio: Array | None = None,
) -> tuple[Array, Metrics]:
    """GRPO micro-batch loss (spec/grpo.md eqs. 3–9, 13; trl.md §2.5–§2.8).

    Shapes: logp, old_logp, ref_logp, mask [B, T]; advantages [B]; importance_sampling_ratio [B, T] or [B, 1].
    Returns a 0-d loss and 0-d metrics.

    ℓ_it = policy_term(ρ, A_i, log π_it)·ρ^IS_it + β·k3_it, then ``aggregate`` by ``loss_type``.
    ``importance_sampling_ratio``: the train/inference mismatch weight ρ^IS of ``mismatch.importance_sampling_ratio``
    (a constant: no gradient flows into it); it multiplies the policy term only, not the KL term (trl.md §2.7).
    None = no correction (ρ^IS = 1).
    ``old_logp=None`` is on-policy: ρ = exp(log π - sg[log π]) is 1 in value with gradient ∇log π (REINFORCE).
    ``ref_logp`` may be None only when β = 0; the KL term is added after the policy term and is not
    weighted by ρ. ``num_items_in_batch``: the generation batch's active-token count for dapo/cispo
    (None = Σ mask of this micro-batch). The value is the loss of this micro-batch alone (GA = 1).
    Clip metrics use the δ-capped ratio, as TRL (trl.md §2.13 quirk 9).
    """
    check_shapes(
        logp=(logp, "B T"), old_logp=(old_logp, "B T"), ref_logp=(ref_logp, "B T"),
        advantages=(advantages, "B"), mask=(mask, "B T"),
    )
    check_float(logp=logp, old_logp=old_logp, ref_logp=ref_logp, advantages=advantages,
                importance_sampling_ratio=importance_sampling_ratio)
    check_mask(mask, logp)
    if importance_sampling_ratio is not None and tuple(importance_sampling_ratio.shape) not in (
            tuple(logp.shape), (logp.shape[0], 1)):
        raise ValueError(f"importance_sampling_ratio: expected shape [B, T] = {tuple(logp.shape)} or [B, 1], "
                         f"got {tuple(importance_sampling_ratio.shape)}")
    if ref_logp is None and config.beta != 0:
        raise ValueError(f"ref_logp: required when config.beta != 0 (beta={config.beta})")
    xp = array_namespace(logp, mask)

    old_logp = stop_gradient(logp) if old_logp is None else stop_gradient(old_logp)
    adv = stop_gradient(advantages)[:, None]
    ratio = xp.exp(importance_log_ratio(logp, old_logp, mask, config.importance_sampling_level))
    per_token = _POLICY_TERMS[config.loss_type](ratio, adv, logp, config)
    if importance_sampling_ratio is not None:  # spec/grpo.md eq. 13: before the KL term, which it does not weight
        per_token = per_token * stop_gradient(importance_sampling_ratio)

    kl = None
    if ref_logp is not None:
        kl = xp.where(as_bool(mask), kl_estimate(logp, stop_gradient(ref_logp), "k3"), xp.zeros_like(logp))
        if config.beta != 0:
            per_token = per_token + config.beta * kl

    value = aggregate(
        per_token, mask, config.loss_type,
        max_completion_length=config.max_completion_length, num_items_in_batch=num_items_in_batch,
    )
    return value, _metrics(ratio, adv, kl, mask, config)


def _metrics(ratio: Array, adv: Array, kl: Array | None, mask: Array, config: GRPOConfig) -> Metrics:
    """spec/grpo.md §3: clip fractions as TRL (token-masked, or over sequences for GSPO), ratio and KL stats."""
    xp = array_namespace(ratio, mask)
    ratio, adv = stop_gradient(ratio), stop_gradient(adv)
    active = as_bool(mask)
    if config.importance_sampling_level == "sequence":  # every statistic is over sequences, as TRL
        active = xp.ones_like(ratio, dtype=xp.bool)
    fraction = lambda flags: masked_mean(as_float(flags, ratio.dtype), active)  # noqa: E731
    metrics: Metrics = {}
    if config.loss_type == "cispo":
        metrics["cispo_clip_ratio"] = fraction((ratio > config.clip_high) & (adv > 0))
    else:
        capped = ratio if config.delta is None else xp.clip(ratio, max=config.delta)
        low = (capped < 1.0 - config.epsilon) & (adv < 0)
        high = (capped > 1.0 + config.clip_high) & (adv > 0)
        metrics["clip_ratio/low_mean"] = fraction(low)
        metrics["clip_ratio/high_mean"] = fraction(high)
        metrics["clip_ratio/region_mean"] = fraction(low | high)
    full = xp.broadcast_to(ratio, active.shape)
    metrics["ratio_mean"] = masked_mean(full - 1.0, active) + 1.0  # 1 (no drift) when nothing is active
    metrics["ratio_min"] = _masked_extreme(xp.min, full, active, float("inf"))
    metrics["ratio_max"] = _masked_extreme(xp.max, full, active, float("-inf"))
    metrics["advantage_mean"] = xp.mean(adv)
    if kl is not None:
        metrics["kl"] = masked_mean(stop_gradient(kl), mask)
    return metrics


def _masked_extreme(reduce, x: Array, active: Array, fill: float) -> Array:
    """min or max (``fill`` = +inf or -inf) of x over active positions; 1 (no drift) when nothing is active."""
    xp = array_namespace(x, active)
    extreme = reduce(xp.where(active, x, xp.full_like(x, fill)))
    return xp.where(xp.any(active), extreme, xp.ones_like(extreme))

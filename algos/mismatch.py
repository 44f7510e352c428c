"""Train/inference mismatch: truncated or masked importance sampling from the rollout engine to the trainer.

A fast rollout engine (vLLM) samples from π_sampler, which differs from the trainer's π_old even with the same
weights: other kernels, other precision, batch-dependent reductions. The policy-gradient estimate then is off
policy, and the fix is to reweight each token's (or sequence's) policy loss by the importance ratio
ρ = π_old / π_sampler, truncated (clamped) or masked (zeroed) outside [C_min, C_max] to bound its variance.

Spec: spec/grpo.md §2.5 (eqs. 11–14). TRL semantics and names: trl.md §2.4, §2.7 (`vllm_importance_sampling_*`).
Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" (token-level truncated
importance sampling, TIS); Liu et al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the
Training-Inference Mismatch" (sequence-level masked importance sampling, MIS); Ionides 2008, "Truncated
importance sampling".
"""
from __future__ import annotations

from typing import Literal, get_args

from array_api_compat import array_namespace

from ._common import (
    Array,
    Metrics,
    as_bool,
    check_float,
    check_mask,
    check_shapes,
    kl_estimate,
    masked_mean,
    stop_gradient,
)

Mode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
MODES: tuple[str, ...] = get_args(Mode)
DEFAULT_MODE: Mode = "sequence_mask"
"""TRL's `vllm_importance_sampling_mode` default (grpo_config.py L924)."""
DEFAULT_CLIP_MIN: float | None = None
"""TRL's `vllm_importance_sampling_clip_min` default: no lower bound."""
DEFAULT_CLIP_MAX: float | None = 3.0
"""TRL's `vllm_importance_sampling_clip_max` default."""


def check_correction(mode: str, clip_min: float | None, clip_max: float | None) -> None:
    """The validation of TRL's GRPOConfig (L1141–1150): a known mode, positive bounds, C_min < C_max, and a
    truncate mode needs at least one bound. Raises ValueError naming the argument."""
    if mode not in MODES:
        raise ValueError(f"mode: unknown {mode!r}; expected one of {MODES}")
    for name, bound in (("clip_min", clip_min), ("clip_max", clip_max)):
        if bound is not None and not bound > 0:
            raise ValueError(f"{name}: expected a ratio bound > 0 or None, got {bound}")
    if clip_min is not None and clip_max is not None and not clip_min < clip_max:
        raise ValueError(f"clip_min: expected < clip_max, got {clip_min} >= {clip_max}")
    if mode.endswith("_truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"clip_min, clip_max: mode {mode!r} truncates, so at least one bound must be set")


def importance_sampling_ratio(
    old_logp: Array,
    sampler_logp: Array,
    mask: Array,
    *,
    mode: Mode = DEFAULT_MODE,
    clip_min: float | None = DEFAULT_CLIP_MIN,
    clip_max: float | None = DEFAULT_CLIP_MAX,
) -> Array:
    """ρ^IS, the weight of each token's policy loss (spec/grpo.md eqs. 11–12; trl.md §2.4).

    Shapes: old_logp, sampler_logp, mask [B, T] -> [B, T] for token modes, [B, 1] for sequence modes.
    Δ = (log π_old - log π_sampler)·m; token modes ρ = exp(Δ), sequence modes ρ_i = exp(Σ_t Δ) (the product of
    the token ratios, not their geometric mean). ``*_truncate`` clamps ρ into [clip_min, clip_max];
    ``*_mask`` sets ρ to 0 outside it and keeps it (not 1) inside. A ``None`` bound is no bound.
    Inactive tokens have Δ = 0. No gradient: both log-probs are constants of the update.
    """
    check_shapes(old_logp=(old_logp, "B T"), sampler_logp=(sampler_logp, "B T"), mask=(mask, "B T"))
    check_float(old_logp=old_logp, sampler_logp=sampler_logp)
    check_mask(mask, old_logp)
    check_correction(mode, clip_min, clip_max)
    xp = array_namespace(old_logp, mask)
    difference = stop_gradient(old_logp) - stop_gradient(sampler_logp)
    log_ratio = xp.where(as_bool(mask), difference, xp.zeros_like(difference))
    if mode.startswith("sequence"):
        log_ratio = xp.sum(log_ratio, axis=-1, keepdims=True)
    ratio = xp.exp(log_ratio)
    if mode.endswith("_truncate"):
        return xp.clip(ratio, min=clip_min, max=clip_max)
    outside = xp.zeros_like(ratio, dtype=xp.bool)
    if clip_min is not None:
        outside = outside | (ratio < clip_min)
    if clip_max is not None:
        outside = outside | (ratio > clip_max)
    return xp.where(outside, xp.zeros_like(ratio), ratio)


def mismatch_metrics(old_logp: Array, sampler_logp: Array, mask: Array, ratio: Array) -> Metrics:
    """How far the sampler is from the trainer, and the weights applied (spec/grpo.md eq. 14; TRL's names).

    Shapes: old_logp, sampler_logp, mask [B, T]; ratio [B, T] or [B, 1] (``importance_sampling_ratio``).
    ``sampling/sampling_logp_difference/mean|max``: |log π_old - log π_sampler| over active tokens;
    ``sampling/kl``: k3 estimate of KL(π_sampler ‖ π_old) (the tokens were drawn from π_sampler), token mean;
    ``sampling/importance_sampling_ratio/min|mean|max``: over active tokens (token modes) or over rows with an
    active token (sequence modes; TRL also counts fully masked rows, whose ratio is 1). Nothing active: 0 for
    the differences, 1 for the ratio statistics.
    """
    check_shapes(old_logp=(old_logp, "B T"), sampler_logp=(sampler_logp, "B T"), mask=(mask, "B T"))
    check_float(old_logp=old_logp, sampler_logp=sampler_logp, ratio=ratio)
    check_mask(mask, old_logp)
    batch, length = old_logp.shape
    if tuple(ratio.shape) not in ((batch, length), (batch, 1)):
        raise ValueError(f"ratio: expected shape [B, T] = {(batch, length)} or [B, 1], got {tuple(ratio.shape)}")
    xp = array_namespace(old_logp, mask)
    old_logp, sampler_logp, ratio = stop_gradient(old_logp), stop_gradient(sampler_logp), stop_gradient(ratio)
    active = as_bool(mask)
    gap = xp.where(active, xp.abs(old_logp - sampler_logp), xp.zeros_like(old_logp))
    kl = kl_estimate(sampler_logp, old_logp, "k3")
    rated = active if ratio.shape[1] == length else xp.any(active, axis=1, keepdims=True)
    ratio_min = xp.min(xp.where(rated, ratio, xp.full_like(ratio, float("inf"))))
    ratio_max = xp.max(xp.where(rated, ratio, xp.full_like(ratio, float("-inf"))))
    anything = xp.any(rated)
    one = xp.ones_like(ratio_min)
    return {
        "sampling/sampling_logp_difference/mean": masked_mean(gap, active),
        "sampling/sampling_logp_difference/max": xp.max(gap),
        "sampling/kl": masked_mean(kl, active),
        "sampling/importance_sampling_ratio/min": xp.where(anything, ratio_min, one),
        "sampling/importance_sampling_ratio/mean": masked_mean(ratio - 1.0, rated) + 1.0,
        "sampling/importance_sampling_ratio/max": xp.where(anything, ratio_max, one),
    }


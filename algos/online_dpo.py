"""Online DPO: pairs ranked by reward from the policy's own samples, trained with the DPO (or IPO) loss.

Spec: spec/online_dpo.md. TRL semantics: shared/reference/trl.md §4.
Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback" (Online DPO), Alg. 1;
Rafailov et al. 2023, "Direct Preference Optimization", eq. 7 (sigmoid loss);
Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17 (IPO).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from array_api_compat import array_namespace, device

from ._common import (
    Array,
    Metrics,
    apply_missing_eos_penalty,
    as_float,
    check_float,
    check_group_size,
    check_mask,
    check_shapes,
    masked_sum,
    nan_count,
    stop_gradient,
)

__all__ = ["OnlineDPOConfig", "apply_missing_eos_penalty", "select_pairs", "loss"]


@dataclass(frozen=True)
class OnlineDPOConfig:
    beta: float = 0.1
    """Inverse temperature β of the implicit reward β·(log π - log π_ref) (TRL default [0.1] -> 0.1)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """"sigmoid": -log σ(β h) (DPO eq. 7); "ipo": (h - 1/(2β))² with summed log-ratios (IPO eq. 17, as TRL)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the reward of completions without EOS before pair selection (``apply_missing_eos_penalty``)."""

    def __post_init__(self):
        if self.loss_type not in _LOSSES:
            raise ValueError(f"loss_type: unknown {self.loss_type!r}; expected one of {tuple(_LOSSES)}")
        if not self.beta > 0:
            raise ValueError(f"beta: expected > 0, got {self.beta}")


def select_pairs(rewards: Array, *, num_generations: int) -> tuple[Array, Array, Array]:
    """One (chosen, rejected) pair per contiguous group of G >= 2 samples (spec/online_dpo.md eq. 2).

    Shapes: rewards [B] (NaN = not scorable) -> chosen_idx [P], rejected_idx [P] (integer row indices into
    [0, B)), valid [P] (bool), with P = B / G.
    chosen = the highest scorable reward, ties -> the earliest row; rejected = the lowest scorable reward, ties ->
    the latest row. So chosen != rejected whenever two rows are scorable, and G = 2 reproduces TRL's
    ``first >= second`` rule (trl.md §4.1 step 7). A group with fewer than 2 scorable rewards is not valid.
    """
    check_shapes(rewards=(rewards, "B"))
    check_float(rewards=rewards)
    check_group_size(rewards.shape[0], num_generations)
    if num_generations < 2:
        raise ValueError(f"num_generations: pairs need at least 2 samples per group, got {num_generations}")
    xp = array_namespace(rewards)
    grouped = xp.reshape(stop_gradient(rewards), (-1, num_generations))
    unscorable = xp.isnan(grouped)
    # argmax/argmin return the first extreme (array API); reversing the row makes the argmin the last one.
    best = xp.argmax(xp.where(unscorable, xp.full_like(grouped, -float("inf")), grouped), axis=1)
    lowest = xp.where(unscorable, xp.full_like(grouped, float("inf")), grouped)
    worst = num_generations - 1 - xp.argmin(xp.flip(lowest, axis=1), axis=1)
    offsets = xp.arange(grouped.shape[0], dtype=best.dtype, device=device(rewards)) * num_generations
    valid = nan_count(grouped, axis=1)[:, 0] >= 2
    return offsets + best, offsets + xp.astype(worst, best.dtype), valid


def _sigmoid(h: Array, beta: float) -> Array:
    """-log σ(β h) = log(1 + e^{-β h}), computed stably (spec/online_dpo.md eq. 5; DPO eq. 7)."""
    xp = array_namespace(h)
    return xp.logaddexp(xp.zeros_like(h), -beta * h)


def _ipo(h: Array, beta: float) -> Array:
    """(h - 1/(2β))² (spec/online_dpo.md eq. 6; IPO eq. 17 with summed log-ratios, as TRL)."""
    return (h - 1.0 / (2.0 * beta)) ** 2


_LOSSES = {"sigmoid": _sigmoid, "ipo": _ipo}


def loss(
    logp: Array,
    ref_logp: Array,
    mask: Array,
    chosen_idx: Array,
    rejected_idx: Array,
    valid: Array,
    *,
    config: OnlineDPOConfig,
) -> tuple[Array, Metrics]:
    """Online DPO loss over the valid pairs (spec/online_dpo.md eqs. 3–7, metrics §5; trl.md §4.1).

    Shapes: logp, ref_logp, mask [B, T]; chosen_idx, rejected_idx [P] integer; valid [P] bool.
    Sequence log-probs s_i = Σ_t m_it log π_it (no length normalization);
    h = (s_c - s_r) - (s^ref_c - s^ref_r); loss = mean over valid pairs of the ``loss_type`` term
    (0 when no pair is valid). Metrics are means over valid pairs.
    """
    check_shapes(
        logp=(logp, "B T"), ref_logp=(ref_logp, "B T"), mask=(mask, "B T"),
        chosen_idx=(chosen_idx, "P"), rejected_idx=(rejected_idx, "P"), valid=(valid, "P"),
    )
    check_float(logp=logp, ref_logp=ref_logp)
    check_mask(mask, logp)
    xp = array_namespace(logp, mask, chosen_idx)
    for name, index in (("chosen_idx", chosen_idx), ("rejected_idx", rejected_idx)):
        if not xp.isdtype(index.dtype, "integral"):
            raise ValueError(f"{name}: expected an integer dtype, got {index.dtype}")
    if valid.dtype != xp.bool:
        raise ValueError(f"valid: expected bool, got {valid.dtype}")

    sequence = masked_sum(logp, mask, axis=-1)
    reference = stop_gradient(masked_sum(ref_logp, mask, axis=-1))
    chosen, rejected = xp.take(sequence, chosen_idx, axis=0), xp.take(sequence, rejected_idx, axis=0)
    ref_chosen, ref_rejected = xp.take(reference, chosen_idx, axis=0), xp.take(reference, rejected_idx, axis=0)
    h = (chosen - rejected) - (ref_chosen - ref_rejected)
    per_pair = _LOSSES[config.loss_type](xp.where(valid, h, xp.zeros_like(h)), config.beta)

    weights = as_float(valid, logp.dtype)
    pair_mean = lambda x: xp.sum(weights * x) / xp.clip(xp.sum(weights), min=1.0)  # noqa: E731
    sg = stop_gradient
    reward_chosen = config.beta * sg(chosen - ref_chosen)
    reward_rejected = config.beta * sg(rejected - ref_rejected)
    metrics: Metrics = {
        "logps/chosen": pair_mean(sg(chosen)),
        "logps/rejected": pair_mean(sg(rejected)),
        "rewards/chosen": pair_mean(reward_chosen),
        "rewards/rejected": pair_mean(reward_rejected),
        "rewards/margins": pair_mean(reward_chosen - reward_rejected),
        "rewards/accuracies": pair_mean(as_float(reward_chosen > reward_rejected, logp.dtype)),
        "valid_fraction": xp.mean(weights),
    }
    return pair_mean(per_pair), metrics

"""The one place where each algorithm meets the fused log-probs: hidden states -> ``token_logprobs`` -> the
``aha.algos`` loss. The trainer and the conformance suite both call these functions, so the suite tests exactly
what training runs. No formula lives here: each function computes log-probs and hands them, with the
algorithm's other inputs unchanged, to ``aha.algos.<algo>.loss``.

Shapes: hidden [B, T, H] are the final hidden states at the T completion positions (the states that predict
``targets``), weight [V, H] (and bias [V]) the LM head, targets [B, T] int64 token ids, mask [B, T] the
completion mask: bool, or float32 like the log-probs (float64 for float64 hidden states). Per-token inputs
(old_logp, ref_logp, values, ...) are float32 like the log-probs. ``temperature`` is the sampling temperature,
applied exactly as in sampling. ``with_entropy`` adds the metric "entropy": the masked mean of the per-token
entropy of the policy (no gradient), as TRL logs it.
"""
from __future__ import annotations

import torch

from aha.algos import grpo, online_dpo, ppo, rloo
from aha.algos._common import masked_mean

from .logprobs import Implementation, token_logprobs


def completion_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    bias: torch.Tensor | None = None,
    implementation: Implementation = "auto",
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` over [B, T]: logp [B, T] (and entropy [B, T]). Also the scoring pass for
    old and reference log-probs (call it under ``torch.no_grad()``)."""
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden, targets: expected [B, T, H] and [B, T], got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    batch, length, width = hidden.shape
    out = token_logprobs(
        hidden.reshape(batch * length, width), weight, targets.reshape(-1), bias=bias, temperature=temperature,
        return_entropy=return_entropy, implementation=implementation,
    )
    if return_entropy:
        return out[0].view(batch, length), out[1].view(batch, length)
    return out.view(batch, length)


def _policy_logprobs(hidden, weight, targets, mask, *, temperature, bias, implementation, with_entropy):
    """(logp [B, T], extra metrics)."""
    out = completion_logprobs(hidden, weight, targets, temperature=temperature, bias=bias,
                              implementation=implementation, return_entropy=with_entropy)
    if not with_entropy:
        return out, {}
    logp, entropy = out
    return logp, {"entropy": masked_mean(entropy.detach(), mask)}


def grpo_loss(
    hidden, weight, targets, mask, old_logp, ref_logp, advantages, *,
    config: grpo.GRPOConfig, temperature: float, bias=None, implementation: Implementation = "auto",
    num_items_in_batch=None, importance_sampling_ratio=None, with_entropy: bool = False,
):
    """``aha.algos.grpo.loss`` on fused log-probs. advantages [B]; old_logp / ref_logp may be None;
    importance_sampling_ratio [B, T] or [B, 1] (the train/inference mismatch weight) or None."""
    logp, extra = _policy_logprobs(hidden, weight, targets, mask, temperature=temperature, bias=bias,
                                   implementation=implementation, with_entropy=with_entropy)
    value, metrics = grpo.loss(logp, old_logp, ref_logp, advantages, mask, config=config,
                               num_items_in_batch=num_items_in_batch,
                               importance_sampling_ratio=importance_sampling_ratio)
    return value, {**metrics, **extra}


def rloo_loss(
    hidden, weight, targets, mask, old_logp, ref_logp, advantages, *,
    config: rloo.RLOOConfig, temperature: float, bias=None, implementation: Implementation = "auto",
    with_entropy: bool = False,
):
    """``aha.algos.rloo.loss`` on fused log-probs. advantages [B]; old_logp / ref_logp may be None."""
    logp, extra = _policy_logprobs(hidden, weight, targets, mask, temperature=temperature, bias=bias,
                                   implementation=implementation, with_entropy=with_entropy)
    value, metrics = rloo.loss(logp, old_logp, ref_logp, advantages, mask, config=config)
    return value, {**metrics, **extra}


def ppo_loss(
    hidden, weight, targets, mask, old_logp, advantages, values, old_values, returns, *,
    config: ppo.PPOConfig, temperature: float, bias=None, implementation: Implementation = "auto",
    with_entropy: bool = False,
):
    """``aha.algos.ppo.loss`` on fused log-probs: the policy's log-probs come from hidden states; the value
    predictions ``values`` [B, T] (with gradient, from the value head) are passed in, as are advantages,
    old_values and returns [B, T]."""
    logp, extra = _policy_logprobs(hidden, weight, targets, mask, temperature=temperature, bias=bias,
                                   implementation=implementation, with_entropy=with_entropy)
    value, metrics = ppo.loss(logp, old_logp, advantages, values, old_values, returns, mask, config=config)
    return value, {**metrics, **extra}


def online_dpo_loss(
    hidden, weight, targets, mask, ref_logp, chosen_idx, rejected_idx, valid, *,
    config: online_dpo.OnlineDPOConfig, temperature: float, bias=None, implementation: Implementation = "auto",
    with_entropy: bool = False,
):
    """``aha.algos.online_dpo.loss`` on fused log-probs. chosen_idx, rejected_idx [P] int; valid [P] bool."""
    logp, extra = _policy_logprobs(hidden, weight, targets, mask, temperature=temperature, bias=bias,
                                   implementation=implementation, with_entropy=with_entropy)
    value, metrics = online_dpo.loss(logp, ref_logp, mask, chosen_idx, rejected_idx, valid, config=config)
    return value, {**metrics, **extra}

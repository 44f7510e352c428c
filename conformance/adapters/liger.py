"""Adapters for Liger-Kernel's chunked losses (pip install liger-kernel; tested with 0.8.5).

Both take hidden states and the LM head, like aha's fused log-prob contract (hidden [B, T, H], weight [V, H],
bias [V], targets [B, T]), and compute the log-probs themselves in chunks, with a backward computed during the
forward. Their gradients w.r.t. hidden states, weight and bias are compared with the reference's.

Run eagerly (`compiled=False`): on a CPU, `torch.compile` of the loss math costs ~25 s per shape and config,
and compiles the same float32 arithmetic (the chunked log-probs are never compiled in Liger). The dtype of
the run is the hidden states' (float32 by default); Liger's log-softmax is float32 in every case.
"""
from __future__ import annotations

import math

from ..targets import Call, Output

PAIR_LOSSES = {"sigmoid": "sigmoid"}
"""aha Online DPO loss_type -> Liger's. Liger 0.8.5 raises NotImplementedError for "ipo"."""


class GRPO:
    """`LigerFusedLinearGRPOLoss` (liger_kernel/chunked_loss/grpo_loss.py): the GRPO loss with TRL's loss
    types, the spec's advantages given. aha config -> Liger: epsilon -> epsilon_low, epsilon_high (or epsilon)
    -> epsilon_high (for cispo the absolute cap, as TRL and aha), delta -> delta, beta -> beta with the given
    reference log-probs, num_items_in_batch -> num_items_in_batch (dapo, cispo), the train/inference mismatch
    weight ρ^IS (spec/grpo.md §2.5, prepared by the spec) -> vllm_is_ratio."""

    name = "liger-grpo"
    algos = ("grpo",)
    default_target = "liger_kernel.chunked_loss:LigerFusedLinearGRPOLoss"
    dtype = "float32"
    covers = ("loss and gradients (hidden states, LM head weight and bias) from hidden states, metrics kl and "
              "clip_ratio/region_mean (cispo: cispo_clip_ratio); advantages are the spec's (an input)")

    def supports(self, case) -> str | None:
        config = case.config
        if config.importance_sampling_level == "sequence" and config.loss_type == "cispo":
            return "Liger raises ValueError: sequence-level importance sampling is not supported for cispo"
        return None

    def __call__(self, loss_class, call: Call) -> Output:
        config, data = call.config, call.data
        module = loss_class(
            beta=config.beta, compiled=False, use_ref_model=config.beta != 0, chunk_size=1,
            epsilon_low=config.epsilon, epsilon_high=config.clip_high, loss_type=config.loss_type,
            max_completion_length=config.max_completion_length,
            importance_sampling_level=config.importance_sampling_level, temperature=call.temperature,
            delta=config.delta,
        )
        loss, metrics = module(
            call.hidden, call.weight, call.targets, call.mask, call.prepared["advantages"], bias=call.bias,
            ref_per_token_logps=data.get("ref_logp") if config.beta != 0 else None,
            old_per_token_logps=data.get("old_logp"), num_items_in_batch=data.get("num_items_in_batch"),
            vllm_is_ratio=call.prepared.get("importance_sampling_ratio"),
        )
        # Liger's metrics, in order: the k3 token mean (only when beta != 0), the clipped-token fraction.
        names = (["kl"] if config.beta != 0 else []) + [
            "cispo_clip_ratio" if config.loss_type == "cispo" else "clip_ratio/region_mean"]
        return Output(loss=loss, metrics=dict(zip(names, metrics)))


class DPO:
    """`LigerFusedLinearDPOLoss` (liger_kernel/chunked_loss/dpo_loss.py) on the pairs the spec selects (Online
    DPO's pair selection is aha's `prepare`; Liger's loss is the offline pairwise loss). The valid pairs' rows
    are stacked [chosen; rejected] with the completion mask as ignore_index, summed log-probs
    (average_log_prob=False), no NLL term.

    Two mappings are needed because Liger's signature lacks two inputs:
    - temperature: Liger has none; logits / τ = h·(W/τ)ᵀ + b/τ, so the adapter passes W/τ and b/τ (the
      gradient flows back through the division).
    - reference log-probs: Liger takes only a reference model (ref_input, ref_weight). The adapter builds one
      that reproduces the given per-sequence reference sums S: ref_input holds one logit vector per position
      (ref_weight = identity); the first active position has logit 0 at its target and c elsewhere with
      -log(1 + (V-1)e^c) = S, every other position log-prob 0. A sum S >= 0 is not a log-probability and
      cannot be produced that way (reported unsupported).
    """

    name = "liger-dpo"
    algos = ("online_dpo",)
    default_target = "liger_kernel.chunked_loss:LigerFusedLinearDPOLoss"
    dtype = "float32"
    covers = ("loss and gradients (hidden states, LM head weight and bias) from hidden states, metrics "
              "logps/chosen, logps/rejected, rewards/chosen, rewards/rejected, rewards/margins, "
              "rewards/accuracies; pairs are the spec's (an input)")

    def supports(self, case) -> str | None:
        if case.config.loss_type not in PAIR_LOSSES:
            return f"Liger raises NotImplementedError for loss_type {case.config.loss_type!r} (0.8.5)"
        import numpy as np

        data, mask = case.inputs.data, case.inputs.mask
        prepared = case.problem.prepare(data, case.config, case.num_generations)
        valid = prepared["valid"]
        if not valid.any():
            return "no valid pair: Liger's pairwise loss needs at least one (the spec's loss is 0 then)"
        rows = np.concatenate([prepared["chosen_idx"][valid], prepared["rejected_idx"][valid]])
        sums = (data["ref_logp"] * mask).sum(-1)[rows]
        if np.any((sums >= 0) & mask[rows].any(-1)):
            return "a reference log-prob sum >= 0: no reference model produces it"
        return None

    def __call__(self, loss_class, call: Call) -> Output:
        import torch

        config, p, data = call.config, call.prepared, call.data
        rows = torch.cat([p["chosen_idx"][p["valid"]], p["rejected_idx"][p["valid"]]])
        active = call.mask[rows] > 0
        labels = torch.where(active, call.targets[rows], torch.full_like(call.targets[rows], -100))
        ref_sums = (data["ref_logp"] * call.mask).sum(-1)[rows].double()
        module = loss_class(beta=config.beta, compute_nll_loss=False, compiled=False, use_ref_model=True,
                            average_log_prob=False, chunk_size=1, loss_type=PAIR_LOSSES[config.loss_type])
        scale = 1.0 / call.temperature
        ref_input, ref_weight = _reference_model(ref_sums, call.targets[rows], active, call.weight.shape[0],
                                                 call.hidden.dtype)
        loss, aux = module(call.weight * scale, call.hidden[rows], labels,
                           None if call.bias is None else call.bias * scale, ref_input, ref_weight, None)
        # aux: chosen and rejected log-prob sums, two logit means, the NLL term, chosen and rejected rewards.
        chosen, rejected, chosen_rewards, rejected_rewards = aux[0], aux[1], aux[5], aux[6]
        metrics = {
            "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean(),
            "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        }
        return Output(loss=loss, metrics=metrics)


def _reference_model(sums, targets, active, vocab: int, dtype):
    """(ref_input [R, T, V], ref_weight [V, V]) whose log-probs at `targets` sum, over the active positions of
    each row, to `sums` [R] (< 0): the whole sum on the row's first active position, 0 on the others."""
    import torch

    rows, length = targets.shape
    # c with -log(1 + (V-1) e^c) = S: e^c = expm1(-S) / (V-1), i.e. c = -S + log(-expm1(S)) - log(V-1) (no
    # overflow for sums of thousands). Log-prob 0: c -> -inf (-1e4 underflows to exactly 0).
    c = -sums + torch.log(-torch.expm1(sums)) - math.log(vocab - 1)
    first = active & (torch.cumsum(active.long(), dim=1) == 1)
    fill = torch.where(first, c[:, None], torch.full_like(c[:, None].expand(rows, length), -1e4))
    logits = fill[..., None].expand(rows, length, vocab).clone()
    logits.scatter_(-1, targets[..., None], 0.0)
    return logits.to(dtype), torch.eye(vocab, dtype=dtype)

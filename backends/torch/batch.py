"""From a Rollout (lists of token ids) to the padded tensors the scoring and update passes use.

Layout (spec/common.md "Shapes and masks"): prompts left-padded to P, completions right-padded to
T, `input_ids = [prompt | completion]` of width P + T. The completion mask is 1 on every sampled
token up to and including EOS. Position ids count real tokens only, exactly as `generate` numbers
them for left-padded prompts, so scoring sees the positions the sampler saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor        # [B, P + T] long
    attention_mask: torch.Tensor   # [B, P + T] long
    position_ids: torch.Tensor     # [B, P + T] long
    completion_ids: torch.Tensor   # [B, T] long (pad where mask is 0)
    mask: torch.Tensor             # [B, T] float32, loss mask
    completion_lengths: torch.Tensor  # [B] long, sampled tokens incl. EOS
    truncated: torch.Tensor        # [B] bool, no EOS within max_completion_length
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-row tensors added by scoring: advantages [B], old_logp/ref_logp [B, T], ..."""

    @property
    def completion_width(self) -> int:
        return self.completion_ids.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The rows `rows` (a 1-d index tensor) of every tensor, extras included."""
        return RolloutBatch(
            input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows],
            position_ids=self.position_ids[rows], completion_ids=self.completion_ids[rows],
            mask=self.mask[rows], completion_lengths=self.completion_lengths[rows],
            truncated=self.truncated[rows], extras={k: v[rows] for k, v in self.extras.items()})

    def to(self, device: torch.device | str) -> RolloutBatch:
        moved = {name: getattr(self, name).to(device) for name in
                 ("input_ids", "attention_mask", "position_ids", "completion_ids", "mask",
                  "completion_lengths", "truncated")}
        return RolloutBatch(**moved, extras={k: v.to(device) for k, v in self.extras.items()})


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] positions counting attended tokens; padding gets 0 (transformers' generate rule)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def collate_rollout(prompt_ids: list[list[int]], completion_ids: list[list[int]], truncated: list[bool],
                    *, pad_token_id: int, mask_truncated_completions: bool = False) -> RolloutBatch:
    """Pad one rollout into a RolloutBatch (prompts left, completions right)."""
    if len(prompt_ids) != len(completion_ids) or len(prompt_ids) != len(truncated):
        raise ValueError(f"collate_rollout: {len(prompt_ids)} prompts, {len(completion_ids)} completions and "
                         f"{len(truncated)} truncation flags must be equally many")
    rows = len(prompt_ids)
    width_p = max(len(p) for p in prompt_ids)
    width_t = max(1, max(len(c) for c in completion_ids))
    input_ids = torch.full((rows, width_p + width_t), pad_token_id, dtype=torch.long)
    attention = torch.zeros((rows, width_p + width_t), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[row, width_p - len(prompt):width_p] = torch.tensor(prompt, dtype=torch.long)
        attention[row, width_p - len(prompt):width_p] = 1
        if completion:
            input_ids[row, width_p:width_p + len(completion)] = torch.tensor(completion, dtype=torch.long)
            attention[row, width_p:width_p + len(completion)] = 1
    position_ids = position_ids_from_mask(attention)
    lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.long)
    mask = (torch.arange(width_t)[None, :] < lengths[:, None]).float()
    truncated_t = torch.tensor(truncated, dtype=torch.bool)
    if mask_truncated_completions:
        # TRL: truncated rows still count in the group statistics, only their loss mask is zeroed.
        mask = mask * (~truncated_t)[:, None].float()
    return RolloutBatch(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                        completion_ids=input_ids[:, width_p:], mask=mask, completion_lengths=lengths,
                        truncated=truncated_t)


def pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    """[len(rows), width] float32, each row's values first and zeros after (right padding, as completions)."""
    out = torch.zeros(len(rows), width)
    for index, row in enumerate(rows):
        out[index, :len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def shuffle_in_units(rows: int, unit: int, generator: torch.Generator) -> torch.Tensor:
    """A random order of `rows` rows that keeps blocks of `unit` contiguous rows together and in order
    (unit 1 is exactly `torch.randperm(rows)`)."""
    blocks = torch.randperm(rows // unit, generator=generator)
    return (blocks[:, None] * unit + torch.arange(unit)).flatten()

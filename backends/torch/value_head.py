"""PPO's value function as a linear head on the policy's last hidden state.

    V(s_t) = w · h_t + b,    h_t = the final-norm hidden state that predicts completion token t

h_t has read the prompt and the completion tokens before t, so it is the state in which o_t is chosen:
the value at completion position t comes from exactly the hidden state whose log-prob scores o_t (TRL's
separate value model reads the same positions, `full_value[:, context_length - 1 : -1]`, trl.md §5.2).
Sharing the policy's forward pass costs one [H] dot product per token instead of a second model.

LoRA-friendly: the head is an ordinary float32 `nn.Module` trained next to the adapter. By default it
reads detached hidden states, so the value loss trains the head alone and the policy's update is the PPO
policy loss only; `trains_backbone=True` lets the value loss's gradient into the shared weights (the
LoRA adapter, or the whole model in full fine-tuning), as a shared actor-critic trunk does.

Initialization: zero weight and bias, so V ≡ 0 before the first update and the first advantages are the
λ-returns of the token rewards rather than the noise of a random head; the weight's gradient h_t · ∂L/∂V
is non-zero from the start, so the head learns from the first step.
"""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int, *, trains_backbone: bool = False) -> None:
        super().__init__()
        self.trains_backbone = trains_backbone
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] (any float dtype) -> values [B, T] float32, like the fused log-probs."""
        if hidden.ndim != 3 or hidden.shape[-1] != self.linear.in_features:
            raise ValueError(f"hidden: expected [B, T, {self.linear.in_features}], got {tuple(hidden.shape)}")
        if not self.trains_backbone:
            hidden = hidden.detach()
        return self.linear(hidden.float()).squeeze(-1)

"""Record the gradient of every optimizer step of a Trainer (the mean over processes, after clipping: what
the optimizer steps with), as full tensors by parameter name, for comparing runs."""

from __future__ import annotations

import torch


def record_gradients(trainer) -> list[dict[str, torch.Tensor]]:
    """A list that receives, after each optimizer step of `trainer`, {name: gradient}. Under FSDP every
    process must call this (gathering a sharded gradient is a collective)."""
    from torch.distributed.tensor import DTensor

    names = [name for name, _ in trainer.policy.named_trainable_parameters()]
    names += [f"{module}.{key}" for module, m in trainer.algorithm.modules.items() for key, _ in m.named_parameters()]
    steps: list[dict[str, torch.Tensor]] = []
    update = trainer._update

    def recording(batch):
        sums = update(batch)
        steps.append({name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.detach().clone())
                      for name, p in zip(names, trainer.trainable, strict=True) if p.grad is not None})
        return sums

    trainer._update = recording
    return steps

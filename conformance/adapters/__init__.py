"""Ready adapters (targets.Adapter): aha's own signatures, Liger-Kernel's chunked losses, verl's core_algos.

| name             | algos                  | default target                                          | dtype   |
|------------------|------------------------|---------------------------------------------------------|---------|
| aha              | grpo, rloo, ppo, dpo   | (give one: a loss with `aha.algos.<algo>.loss`'s signature) | float64 |
| aha-advantages   | grpo, rloo, ppo        | (give one: `aha.algos.<algo>.advantages`'s signature)   | float64 |
| liger-grpo       | grpo                   | liger_kernel.chunked_loss:LigerFusedLinearGRPOLoss      | float32 |
| liger-dpo        | online_dpo             | liger_kernel.chunked_loss:LigerFusedLinearDPOLoss       | float32 |
| verl-grpo        | grpo                   | verl.trainer.ppo.core_algos                             | float32 |
| verl-rloo        | rloo                   | verl.trainer.ppo.core_algos                             | float32 |
| verl-ppo         | ppo                    | verl.trainer.ppo.core_algos                             | float32 |

Third-party packages are imported only when a target is loaded, so every adapter lists without them.
"""
from __future__ import annotations

import importlib

ADAPTERS: dict[str, str] = {
    "aha": "aha:LOSS",
    "aha-advantages": "aha:ADVANTAGES",
    "liger-grpo": "liger:GRPO",
    "liger-dpo": "liger:DPO",
    "verl-grpo": "verl:GRPO",
    "verl-rloo": "verl:RLOO",
    "verl-ppo": "verl:PPO",
}
"""Name -> "module of this package:attribute"."""


def resolve(name: str):
    """A ready adapter by name, or any adapter object by "package.module:attr" (a class is instantiated)."""
    if name in ADAPTERS:
        module, attr = ADAPTERS[name].split(":")
        adapter = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    elif ":" in name:
        from ..targets import load

        adapter = load(name)
    else:
        raise ValueError(f"adapter: unknown {name!r}; expected one of {', '.join(ADAPTERS)} or package.module:attr")
    return adapter() if isinstance(adapter, type) else adapter

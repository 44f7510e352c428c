"""Pure, array-API generic loss functions of GRPO, RLOO, PPO and Online DPO (spec/*.md).

One file per algorithm, shared primitives in ``_common``. NumPy, JAX and torch arrays all work; gradients
flow through ``jax.grad`` and torch autograd. Nothing here imports the rest of aha.
"""
from . import grpo, online_dpo, ppo, rloo

__all__ = ["grpo", "online_dpo", "ppo", "rloo"]

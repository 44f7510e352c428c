"""Full fine-tuning across processes with FSDP2 (`torch.distributed.fsdp.fully_shard`): every weight,
gradient and optimizer moment is split across the ranks, for models whose training state does not fit one
device (config.fsdp; distributed.py describes the rest of multi-process training).

Layout: one FSDP unit per decoder layer (the classes the model lists in `_no_split_modules`, as accelerate
and torchtitan wrap) and a root unit holding the rest (embeddings, final norm, LM head; tied or not). The
trainer never calls the model's own forward (it reads hidden states and the LM-head weight, logprobs.py),
so the root is a thin module, `_Root`, whose forward runs whatever it is handed: the decoder for hidden
states, `generate` for rollouts. FSDP's hooks on the root then gather the root unit's weights for that
call, keep them gathered until backward (a root is not resharded after forward), and reduce-scatter their
gradients after it, so the LM-head weight read after the decoder pass is the gathered one and its gradient
from the fused log-prob op reaches the sharded parameter. `generate` runs with `synced_gpus=True`: a rank
whose completions all ended keeps stepping the sharded forward until every rank is done.

Checkpoints hold what one process writes: the full weights (`from_pretrained` format) and the optimizer
state in torch's own layout (parameters numbered in order), gathered to rank 0. So a sharded run's
checkpoint resumes in one process, or sharded on any number of ranks (read by every rank and re-sharded).

Limits: every rank must run the same forward and backward passes, so out-of-memory retries (which halve
the rows per pass on one rank) stop the run instead, and a skipped step is agreed before backward.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .config import ConfigError
from .models import Policy


class _Root(nn.Module):
    """FSDP root over the causal LM: `root(fn, *args, **kwargs)` runs fn under the root's hooks."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


class ShardedModel:
    """A policy's model sharded by FSDP2 across the ranks (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device_type, (distributed.world_size(),))
        layer_classes = set(getattr(model, "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
        if not layers:
            raise ValueError(f"fsdp: {type(model).__name__} names no decoder layer classes (_no_split_modules)")
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        self.root = _Root(model)
        fully_shard(self.root, mesh=mesh)
        self.model = model

    def run(self, fn):
        """fn, called under the root's hooks (its weights gathered for the call)."""
        return functools.partial(self.root, fn)

    @property
    def generation_model(self) -> _SyncedGeneration:
        return _SyncedGeneration(self)

    def parameter_names(self) -> dict[nn.Parameter, str]:
        """Sharded parameter -> its name in the root (what torch.distributed.checkpoint calls its FQN)."""
        self.root.reshard()  # after a forward without backward the root's modules hold gathered tensors
        return {p: name for name, p in self.root.named_parameters()}


class _SyncedGeneration:
    """The model as the rollout engine and evaluation see it: `generate` runs inside the root with
    synced_gpus=True; every other attribute is the model's."""

    def __init__(self, sharded: ShardedModel) -> None:
        self._sharded = sharded

    def generate(self, *args, **kwargs):
        return self._sharded.root(self._sharded.model.generate, *args, synced_gpus=True, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sharded.model, name)


def shard_policy(policy: Policy, *, needs_reference: bool) -> None:
    """Shard a full-fine-tuning policy across the ranks in place; build the optimizer after this."""
    if policy.is_peft:
        raise ConfigError("fsdp shards full fine-tuning; a LoRA policy is replicated (distributed.py)")
    if needs_reference:
        raise ConfigError("fsdp: a reference policy (beta != 0, or online_dpo) would be a full unsharded copy of "
                          "the model on every process; train with beta=0, or with LoRA (the adapter switched off "
                          "is the reference)")
    policy.sharded = ShardedModel(policy.model)


class CheckpointView:
    """What checkpoint.py sees of a sharded policy and its optimizer, built on every rank (collective).

    Saving: the full weights and the optimizer state, gathered to rank 0 at construction, which writes them
    as one process would. Loading: every rank reads the full files and FSDP keeps its shards.
    """

    def __init__(self, policy: Policy, optimizer: torch.optim.Optimizer, *, gather: bool) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        self._policy, self._optimizer, self._sharded = policy, optimizer, policy.sharded
        self.is_peft, self.tokenizer, self.name_or_path = False, policy.tokenizer, policy.name_or_path
        self._names = self._sharded.parameter_names()
        self._weights = self._optimizer_state = None
        if gather:
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            self._weights = _strip_root(get_model_state_dict(self._sharded.root, options=full))
            self._optimizer_state = get_optimizer_state_dict(self._sharded.root, optimizer, options=full)

    @property
    def optimizer(self) -> CheckpointView:
        return self  # state_dict / load_state_dict below are the optimizer's

    # --- the Policy side (checkpoint.save_checkpoint / load_checkpoint) ---
    def save_full(self, path: str | Path) -> None:
        self._sharded.model.save_pretrained(str(path), state_dict=self._weights, safe_serialization=True)

    def load_trained_weights(self, path: str | Path) -> None:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = {}
        for file in sorted(Path(path).glob("*.safetensors")):
            state.update(load_file(file))
        expected = {name.removeprefix("model.") for name in self._names.values()}
        missing = sorted(expected - state.keys() - _tied_names(self._sharded.model))
        if missing:
            raise ValueError(f"weights in {path} do not fit this model: missing {missing[:5]}")
        state = {f"model.{k}": v for k, v in state.items() if k in expected}
        set_model_state_dict(self._sharded.root, state, options=StateDictOptions(full_state_dict=True, strict=False))

    # --- the optimizer side ---
    def state_dict(self) -> dict:
        """The gathered state in torch's layout: parameters numbered in param_groups order."""
        order = self._order()
        number = {name: i for i, name in enumerate(order)}
        state = self._optimizer_state
        return {"state": {number[name]: value for name, value in state["state"].items()},
                "param_groups": [{**group, "params": [number[name] for name in group["params"]]}
                                 for group in state["param_groups"]]}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        order = self._order()
        named = {"state": {order[int(i)]: value for i, value in state["state"].items()},
                 "param_groups": [{**group, "params": [order[int(i)] for i in group["params"]]}
                                  for group in state["param_groups"]]}
        set_optimizer_state_dict(self._sharded.root, self._optimizer, named,
                                 options=StateDictOptions(full_state_dict=True))

    def _order(self) -> list[str]:
        return [self._names[p] for group in self._optimizer.param_groups for p in group["params"]]


def _strip_root(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name.removeprefix("model."): value for name, value in state.items()}


def _tied_names(model: nn.Module) -> set[str]:
    """Names transformers may leave out of a saved file because they share another weight."""
    tied = getattr(model, "_tied_weights_keys", None) or ()
    return set(tied) if getattr(model.config, "tie_word_embeddings", False) else set()

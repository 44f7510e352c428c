"""What a run is built from before its first step: task, reference copy, rollout engine, optimizer,
schedule, seeds. Kept apart from the loop (trainer.py) so each file reads in one sitting."""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from .algorithms import needs_reference_model
from .config import TrainConfig
from .data import PromptDataset, load_prompt_dataset
from .rollout import HFRolloutEngine


def resolve_task(config: TrainConfig):
    """Model path, training dataset and held-out rows; the embedded demo fills what is not given."""
    from . import demo

    model_path = config.model or str(demo.build_demo_model())
    if config.dataset:
        dataset = load_prompt_dataset(config.dataset, prompt_field=config.prompt_field,
                                      answer_field=config.answer_field, skip_bad_rows=config.skip_bad_rows,
                                      seed=config.seed)
    else:
        dataset = PromptDataset(demo.demo_dataset("train", demo.TRAIN_ROWS, seed=config.seed), source="demo",
                                seed=config.seed)
    if config.eval_dataset:
        eval_rows = load_prompt_dataset(config.eval_dataset, prompt_field=config.prompt_field,
                                        answer_field=config.answer_field).rows[:config.eval_samples]
    elif not config.dataset:
        eval_rows = demo.demo_dataset("test", config.eval_samples, seed=config.seed)
    else:
        eval_rows = []
    return model_path, dataset, eval_rows


def reference_copy(config: TrainConfig) -> str:
    """Full fine-tuning has no adapter to switch off: keep a frozen copy when the run needs a reference."""
    return "device" if config.lora_r == 0 and needs_reference_model(config) else "none"


def make_engine(config: TrainConfig, policy, tokenizer):
    if config.rollout == "vllm":
        from .vllm_rollout import VLLMRolloutEngine
        return VLLMRolloutEngine.from_policy(policy, tokenizer, config)
    return HFRolloutEngine(policy.generation_model, tokenizer)


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    params = list(params)
    if config.optim == "adamw_8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def make_scheduler(config: TrainConfig, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total = config.warmup_steps, config.max_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if config.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        if config.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lora_targets(modules: tuple[str, ...]) -> str | list[str]:
    return "all-linear" if tuple(modules) == ("all-linear",) else list(modules)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

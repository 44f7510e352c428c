"""Tiny models and datasets on disk (the real from_pretrained path) for the fault tests; one torch thread."""

from __future__ import annotations

import pytest

from tests.trainer.conftest import one_thread, prompt_file, save_tiny_model, tiny_model_dir  # noqa: F401


@pytest.fixture
def base_config(tiny_model_dir, prompt_file, tmp_path):
    """A step takes about a second on one CPU core: 2 prompts x 4 completions, 2 micro-batches of 4."""
    return dict(model=str(tiny_model_dir), dataset=str(prompt_file), output_dir=str(tmp_path / "run"),
                num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_completion_length=12, max_prompt_length=32, max_steps=2, learning_rate=1e-3,
                lora_r=4, lora_alpha=8, logging_steps=1, log_completions_steps=0, seed=0, dtype="float32",
                reward_funcs=["tests/faults/rewards.py:count_sevens"])

"""Tiny models and datasets written to disk, so the trainer runs the real from_pretrained path."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from aha.backends.torch.demo.task import demo_dataset
from aha.backends.torch.demo.tokenizer import build_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a loaded 2-core machine spin for seconds with several threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def save_tiny_model(folder, *, pad_token: bool = True):
    """A 2-layer Qwen2 with the demo's character tokenizer, written with save_pretrained."""
    tokenizer = build_tokenizer()
    if not pad_token:
        tokenizer.pad_token = None
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in demo_dataset("train", 32, seed=1)))
    return path


@pytest.fixture
def base_config(tiny_model_dir, prompt_file, tmp_path):
    """Settings small enough for a step in about a second on one CPU core."""
    return dict(model=str(tiny_model_dir), dataset=str(prompt_file), output_dir=str(tmp_path / "run"),
                num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_completion_length=12, max_prompt_length=32, max_steps=2, learning_rate=1e-3,
                lora_r=4, lora_alpha=8, logging_steps=1, log_completions_steps=1, seed=0, dtype="float32")

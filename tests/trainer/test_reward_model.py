"""A sequence-classification reward model by path, scoring as TRL does, inside a training run."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification

from aha.backends.torch import TrainConfig, Trainer
from aha.backends.torch.demo.tokenizer import build_tokenizer
from aha.backends.torch.rewards import load_reward_function, reward_names
from aha.backends.torch.tracking import read_metrics
from aha.conformance.tolerances import tolerance


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reward-model")
    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        Qwen2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_reward_model_scores_prompt_plus_completion_like_trl(reward_model_dir):
    fn = load_reward_function(f"reward_model:{reward_model_dir}")
    assert reward_names([fn]) == ["reward_model"]
    rewards = fn(prompts=["12+34", "5+6"], completions=["<answer>46</answer>", "<answer>1</answer>"])
    tokenizer = build_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tol = tolerance("float32")  # batched and right-padded vs one at a time
    for prompt, completion, reward in zip(["12+34", "5+6"], ["<answer>46</answer>", "<answer>1</answer>"], rewards):
        ids = tokenizer(prompt + completion, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            assert reward == pytest.approx(model(**ids).logits[0, 0].item(), rel=tol.rtol, abs=tol.atol)


def test_training_with_a_reward_model(base_config, reward_model_dir):
    trainer = Trainer(TrainConfig.from_dict({**base_config, "algo": "online_dpo", "max_steps": 1,
                                            "reward_funcs": [f"reward_model:{reward_model_dir}"]}))
    trainer.train()
    row = read_metrics(trainer.run_dir)[0]
    assert row["reward/reward_model"] is not None and row["reward/reward_model/unscorable"] == 0

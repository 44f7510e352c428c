"""End-to-end training runs on tiny local models: GRPO and RLOO with LoRA, QLoRA, full fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from aha.backends.torch import TrainConfig, Trainer
from aha.backends.torch.tracking import read_metrics

REQUIRED_METRICS = [
    "reward/mean", "reward/std", "reward/exact_answer", "reward/think_answer_format", "frac_reward_zero_std",
    "advantage/mean", "advantage/std", "loss", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "entropy",
    "completion_length/mean", "completion_length/min", "completion_length/max", "frac_truncated",
    "learning_rate", "tokens_per_s/rollout", "tokens_per_s/train", "time/rollout", "time/score", "time/update",
    "peak_memory_gib", "grad_norm",
]


def _train(**values) -> Trainer:
    trainer = Trainer(TrainConfig.from_dict(values))
    trainer.train()
    return trainer


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_lora_run_writes_metrics_plot_and_adapter(base_config, algo):
    trainer = _train(**{**base_config, "algo": algo, "beta": 0.04, "num_iterations": 2})
    run = trainer.run_dir
    rows = read_metrics(run)
    assert [row["step"] for row in rows] == [1, 2]
    missing = [name for name in REQUIRED_METRICS if name not in rows[0]]
    assert not missing, f"metrics.jsonl lacks {missing}"
    assert (run / "curves.png").stat().st_size > 1000
    assert (run / "samples.jsonl").read_text().strip()
    adapter = load_file(run / "checkpoint-2" / "adapter_model.safetensors")
    assert adapter and all("lora" in name for name in adapter)


def test_full_finetuning_changes_base_weights(base_config):
    trainer = _train(**{**base_config, "lora_r": 0, "max_steps": 1, "reward_funcs": ["tests/trainer/rewards.py:count_sevens"]})
    assert (trainer.run_dir / "checkpoint-1" / "model.safetensors").exists()


def test_qlora_run(base_config):
    pytest.importorskip("bitsandbytes")
    trainer = _train(**{**base_config, "load_in_4bit": True, "max_steps": 1})
    assert read_metrics(trainer.run_dir)[0]["step"] == 1


def test_resume_equals_uninterrupted(base_config, tmp_path):
    values = {**base_config, "max_steps": 4, "save_steps": 2, "reward_funcs": ["tests/trainer/rewards.py:count_sevens"],
              "beta": 0.04}
    whole = _train(**{**values, "output_dir": str(tmp_path / "whole")})
    first = _train(**{**values, "output_dir": str(tmp_path / "split"), "max_steps": 2})
    resumed = _train(**{**values, "output_dir": str(tmp_path / "split"), "resume": str(first.run_dir)})
    assert resumed.step == 4
    keys = ["reward/mean", "loss", "kl", "completion_length/mean", "grad_norm"]
    expected = [{k: row[k] for k in keys} for row in read_metrics(whole.run_dir)]
    got = [{k: row[k] for k in keys} for row in read_metrics(resumed.run_dir)]
    assert got == expected
    for (name, a), (_, b) in zip(whole.policy.named_trainable_parameters(),
                                 resumed.policy.named_trainable_parameters()):
        assert torch.equal(a, b), name


def test_policy_learns_from_reward(base_config):
    """A reward for digits must raise their frequency within a few steps (a flipped sign fails this).

    Full fine-tuning: the random tiny model's LM head is what makes its distribution near uniform,
    and LoRA leaves the head alone, so only full fine-tuning moves it within a dozen steps."""
    values = {**base_config, "reward_funcs": ["tests/trainer/rewards.py:digit_fraction"], "max_steps": 10,
              "learning_rate": 5e-2, "lora_r": 0, "log_completions_steps": 0}
    trainer = _train(**values)
    rewards = [row["reward/mean"] for row in read_metrics(trainer.run_dir)]
    assert sum(rewards[-3:]) / 3 > 3 * sum(rewards[:3]) / 3, rewards


def test_config_summary_is_written(base_config):
    trainer = _train(**{**base_config, "max_steps": 1})
    saved = json.loads((trainer.run_dir / "config.json").read_text())
    assert saved["num_generations"] == 4 and saved["algo"] == "grpo"


@pytest.mark.parametrize("algo", ["grpo", "online_dpo"])
def test_full_finetuning_with_a_reference_keeps_a_frozen_copy(base_config, algo):
    values = {**base_config, "algo": algo, "lora_r": 0, "max_steps": 1, "beta": 0.1}
    trainer = _train(**values)
    assert read_metrics(trainer.run_dir)[0]["kl" if algo == "grpo" else "loss"] is not None


def test_8bit_adamw_from_bitsandbytes(base_config):
    pytest.importorskip("bitsandbytes")
    trainer = _train(**{**base_config, "optim": "adamw_8bit", "max_steps": 1,
                        "reward_funcs": ["tests/trainer/rewards.py:digit_fraction"]})
    assert type(trainer.optimizer).__name__ == "AdamW8bit"
    assert read_metrics(trainer.run_dir)[0]["grad_norm"] > 0


def test_full_finetuning_reference_is_the_untrained_model(base_config, tiny_model_dir):
    """After updates, reference log-probs still come from the frozen copy: its decoder AND its LM head."""
    from transformers import AutoModelForCausalLM

    from aha.conformance.tolerances import tolerance

    trainer = _train(**{**base_config, "lora_r": 0, "beta": 0.1, "max_steps": 2, "learning_rate": 1e-2,
                        "reward_funcs": ["tests/trainer/rewards.py:digit_fraction"]})
    assert read_metrics(trainer.run_dir)[0]["grad_norm"] > 0  # the weights did move
    batch = trainer.batch
    ref = trainer._logprobs(batch, reference=True, size=4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids).logits[:, -batch.completion_width - 1:-1]
    expected = torch.log_softmax(logits.float(), -1).gather(-1, batch.completion_ids[..., None])[..., 0]
    tol = tolerance("float32")
    mask = batch.mask.bool()
    torch.testing.assert_close(ref[mask], expected[mask], rtol=tol.rtol, atol=tol.atol)


def test_checkpoints_fall_on_generation_cycle_boundaries(base_config):
    trainer = _train(**{**base_config, "num_iterations": 2, "save_steps": 1, "max_steps": 4})
    saved = sorted(int(p.name.split("-")[1]) for p in trainer.run_dir.glob("checkpoint-*"))
    assert saved == [2, 4]

"""The trainer with rollout="vllm" on the stand-in LLM (fake_vllm.py): weights synced after every optimizer step,
and GRPO's train/inference mismatch correction (spec/grpo.md §2.5) fed with the sampler's log-probs, passed to the
loss, and logged. The stand-in samples from the training model itself and reports its log-probs shifted by a known
amount, so the mismatch is known: Δ = log π_old - log π_sampler = SHIFT per token, up to float32 noise."""
import math

import pytest
import torch

from aha.backends.torch import TrainConfig, Trainer, losses
from aha.backends.torch.tracking import read_metrics
from aha.backends.torch.vllm_rollout import VLLMRolloutEngine
from tests.vllm.fake_vllm import API, FakeLLM

SHIFT = 0.01
NOISE = 1e-4
"""|trainer - sampler| log-prob difference of the same float32 model: KV-cached generate vs one forward pass."""


@pytest.fixture
def stand_in(monkeypatch):
    """VLLMRolloutEngine.from_policy builds the engine around a FakeLLM on the policy; the engines it made."""
    made = []

    def from_policy(cls, policy, tokenizer, config):
        engine = cls(FakeLLM(policy.generation_model, tokenizer, logprob_shift=-SHIFT), tokenizer, api=API,
                     eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                     lora=policy.is_peft, sleep=config.vllm_enable_sleep_mode)
        made.append(engine)
        return engine

    monkeypatch.setattr(VLLMRolloutEngine, "from_policy", classmethod(from_policy))
    return made


@pytest.fixture
def ratios(monkeypatch):
    """Every importance_sampling_ratio the GRPO loss received, with the micro-batch's mask."""
    seen = []
    original = losses.grpo_loss

    def grpo_loss(*args, **kwargs):
        seen.append((kwargs["importance_sampling_ratio"], args[3]))
        return original(*args, **kwargs)

    monkeypatch.setattr(losses, "grpo_loss", grpo_loss)
    return seen


def _train(**values) -> Trainer:
    trainer = Trainer(TrainConfig.from_dict(values))
    trainer.train()
    return trainer


def test_grpo_corrects_the_mismatch_and_syncs_lora_each_step(base_config, stand_in, ratios):
    trainer = _train(**{**base_config, "rollout": "vllm", "beta": 0.04})
    (engine,) = stand_in
    assert trainer.engine is engine and engine._lora_version == 2  # one adapter per optimizer step
    requests = [call[1] for call in engine.llm.calls if call[0] == "generate"]
    assert requests[0] is None and requests[1].lora_int_id == 1  # the second rollout samples the updated adapter

    rows = read_metrics(trainer.run_dir)
    for row in rows:
        assert abs(row["sampling/sampling_logp_difference/mean"] - SHIFT) < NOISE
        assert abs(row["sampling/kl"] - (math.exp(SHIFT) - SHIFT - 1)) < NOISE * SHIFT
        assert row["sampling/importance_sampling_ratio/min"] > 1.0
    assert ratios and all(ratio is not None for ratio, _ in ratios)
    for ratio, mask in ratios:  # sequence_mask (TRL's default): exp(Σ Δ) per row, below C_max = 3
        expected = torch.exp(SHIFT * mask.sum(-1, keepdim=True))
        assert ratio.shape == (mask.shape[0], 1)
        torch.testing.assert_close(ratio, expected.to(ratio), rtol=NOISE * mask.shape[1], atol=0)


def test_token_mode_and_full_finetuning(base_config, stand_in, ratios):
    trainer = _train(**{**base_config, "rollout": "vllm", "lora_r": 0, "vllm_importance_sampling_mode": "token_truncate",
                        "vllm_importance_sampling_clip_max": 1.005})
    (engine,) = stand_in
    assert len(engine.llm.runner_model.loaded) == 1  # step 1's weights, copied before the second rollout
    for ratio, mask in ratios:  # e^0.01 > 1.005: every active token truncated, padding at e^0 = 1
        assert ratio.shape == mask.shape
        torch.testing.assert_close(ratio, torch.where(mask > 0, 1.005, 1.0).to(ratio))
    assert read_metrics(trainer.run_dir)[0]["sampling/importance_sampling_ratio/max"] == pytest.approx(1.005)


@pytest.mark.parametrize("values", [dict(algo="grpo", vllm_importance_sampling_correction=False), dict(algo="rloo")])
def test_without_the_correction_nothing_is_weighted(base_config, stand_in, ratios, values):
    trainer = _train(**{**base_config, "rollout": "vllm", "max_steps": 1, **values})
    assert not any(name.startswith("sampling/") for name in read_metrics(trainer.run_dir)[0])
    assert all(ratio is None for ratio, _ in ratios)
    assert "sampler_logp" not in trainer.batch.extras and not trainer.algorithm.corrects_mismatch

"""VLLMRolloutEngine without vLLM: import safety, the install hint, the sampling-parameter map, the memory budget,
and the engine's own logic (outputs, finish reasons, sleep and wake, LoRA and full weight sync) on a stand-in
LLM (fake_vllm.py). What needs vLLM itself runs on the GPU machine: bench/rollout.py."""
import gc
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from aha.backends.torch.config import ConfigError, TrainConfig
from aha.backends.torch.rollout import HFRolloutEngine, SamplingParams
from aha.backends.torch.vllm_rollout import (VLLMRolloutEngine, gpu_memory_utilization, request_seeds,
                                             sampling_params_kwargs, training_state_bytes)
from tests.vllm.fake_vllm import API, FakeLLM

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


@pytest.fixture
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make_engine(llm, tokenizer, *, lora=False, sleep=True):
    """As from_policy leaves it: awake, the first rollout comes next."""
    return VLLMRolloutEngine(llm, tokenizer, api=API, eos_token_ids=[tokenizer.eos_token_id],
                             pad_token_id=tokenizer.pad_token_id, lora=lora, sleep=sleep)


# ------------------------------------------------------------------------------------------------
# Without an engine
# ------------------------------------------------------------------------------------------------

def test_importing_the_engine_or_the_trainer_does_not_import_vllm():
    code = ("import sys, aha.backends.torch.vllm_rollout, aha.backends.torch.trainer; "
            "print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_from_policy_without_vllm_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ConfigError, match=r"install aha-rl\[vllm\]"):
        VLLMRolloutEngine.from_policy(None, None, TrainConfig(rollout="vllm"))


def test_sampling_params_map_one_to_one():
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=0, min_p=0.05, max_tokens=64, seed=3)
    assert sampling_params_kwargs(sampling, 8, eos_token_ids=[2, 7], seed=11) == dict(
        n=8, temperature=0.7, top_p=0.9, top_k=-1, min_p=0.05, max_tokens=64, seed=11, logprobs=0,
        stop_token_ids=[2, 7], ignore_eos=False, min_tokens=0, repetition_penalty=1.0, presence_penalty=0.0,
        frequency_penalty=0.0, detokenize=False)
    greedy = sampling_params_kwargs(SamplingParams(temperature=0.0, top_k=5), 1, eos_token_ids=[2], seed=None)
    assert (greedy["temperature"], greedy["top_k"], greedy["seed"]) == (0.0, 5, None)


def test_sampling_params_are_accepted_by_vllm():
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed (GPU machine only)")
    kwargs = sampling_params_kwargs(SamplingParams(top_k=4, top_p=0.5), 2, eos_token_ids=[2], seed=0)
    params = vllm.SamplingParams(**kwargs)
    assert (params.top_k, params.logprobs, params.n) == (4, 0, 2)


def test_request_seeds_differ_per_prompt_and_follow_the_call_seed():
    seeds = request_seeds(SamplingParams(seed=5), 4)
    assert len(set(seeds)) == 4 and seeds == request_seeds(SamplingParams(seed=5), 4)
    assert set(seeds).isdisjoint(request_seeds(SamplingParams(seed=6), 4))
    assert request_seeds(SamplingParams(), 3) == [None, None, None]
    assert request_seeds(SamplingParams(prompt_seeds=(9, 4)), 2) == [9, 4]
    with pytest.raises(ValueError, match="prompt_seeds"):
        request_seeds(SamplingParams(prompt_seeds=(9,)), 2)


def test_memory_budget_leaves_training_state_and_headroom():
    gib = 2**30
    # 80 GiB device, 60 free after loading the policy, 6 GiB of gradients and AdamW moments, 5% headroom.
    assert gpu_memory_utilization(free_bytes=60 * gib, total_bytes=80 * gib, training_state_bytes=6 * gib) == 0.62
    assert gpu_memory_utilization(free_bytes=10 * gib, total_bytes=80 * gib, training_state_bytes=8 * gib) < 0
    weight = torch.nn.Parameter(torch.zeros(10, 4, dtype=torch.bfloat16))
    assert training_state_bytes([weight]) == 3 * 40 * 2


def test_config_fields_have_trls_names_defaults_and_checks():
    config = TrainConfig()
    assert (config.vllm_importance_sampling_correction, config.vllm_importance_sampling_mode,
            config.vllm_importance_sampling_clip_min, config.vllm_importance_sampling_clip_max) == (
        True, "sequence_mask", None, 3.0)
    assert config.vllm_gpu_memory_utilization is None and config.vllm_enable_sleep_mode
    for bad in (dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None),
                dict(vllm_importance_sampling_clip_min=4.0), dict(vllm_gpu_memory_utilization=0.0),
                dict(vllm_max_num_seqs=0), dict(vllm_importance_sampling_mode="token")):
        with pytest.raises(ConfigError, match="vllm_"):
            TrainConfig(**bad)


# ------------------------------------------------------------------------------------------------
# The engine on a stand-in LLM
# ------------------------------------------------------------------------------------------------

def test_generate_returns_what_the_hf_engine_samples(model, tokenizer):
    """Same per-request seeds: the same completions, log-probs and finish reasons, groups contiguous in index
    order although the stand-in answers in reverse; texts decoded by the tokenizer."""
    llm = FakeLLM(model, tokenizer)
    engine = make_engine(llm, tokenizer)
    sampling = SamplingParams(temperature=0.9, max_tokens=6, seed=1)
    rollout = engine.generate(PROMPTS, 3, sampling)
    hf = HFRolloutEngine(model, tokenizer)
    expected = [hf.generate([prompt], 3, SamplingParams(temperature=0.9, max_tokens=6, seed=seed))
                for prompt, seed in zip(PROMPTS, request_seeds(sampling, len(PROMPTS)))]
    assert rollout.prompt_ids == [p for p in PROMPTS for _ in range(3)]
    assert rollout.completion_ids == [ids for r in expected for ids in r.completion_ids]
    assert rollout.sampler_logp == [lp for r in expected for lp in r.sampler_logp]
    assert rollout.finish_reason == [f for r in expected for f in r.finish_reason]
    assert rollout.texts == tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    assert llm.names() == ["generate", "sleep"]
    llm.calls.clear()
    again = engine.generate(PROMPTS, 3, sampling)
    assert again.completion_ids == rollout.completion_ids
    assert llm.names() == ["wake_up:weights", "wake_up:kv_cache", "generate", "sleep"]


def test_an_eos_drawn_as_the_last_allowed_token_is_a_stop(model, tokenizer):
    """vLLM reports "length" when the EOS is the max_tokens-th token; the completion did end (as the hf engine and
    TRL's completion mask say), so the engine decides from the tokens."""
    llm = FakeLLM(model, tokenizer)
    engine = make_engine(llm, tokenizer, sleep=False)
    eos = tokenizer.eos_token_id

    def sample(index, tokens, logps):
        return SimpleNamespace(index=index, token_ids=tokens, finish_reason="length",
                               logprobs=[{t: SimpleNamespace(logprob=v)} for t, v in zip(tokens, logps)])

    scripted = [SimpleNamespace(outputs=[sample(0, (4, eos), (-1.0, -0.5)), sample(1, (4, 4), (-1.0, -2.0))])]
    llm.generate = lambda *args, **kwargs: scripted
    rollout = engine.generate([[5, 6]], 2, SamplingParams(max_tokens=2))
    assert rollout.finish_reason == ["stop", "length"] and rollout.is_truncated == [False, True]
    assert rollout.sampler_logp == [[-1.0, -0.5], [-1.0, -2.0]]


def test_lora_sync_writes_the_adapter_to_tmpfs_under_a_fresh_id(model, tokenizer):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    llm = FakeLLM(peft_model, tokenizer)
    engine = make_engine(llm, tokenizer, lora=True)
    root = engine._adapter_root
    assert root.is_dir() and (str(root).startswith("/dev/shm/") or not Path("/dev/shm").is_dir())

    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).add_(0.5)
    engine.sync_weights(peft_model)
    engine.generate(PROMPTS[:1], 2, SamplingParams(max_tokens=3, seed=0))
    first = llm.calls[0][1]
    assert first.lora_int_id == 1 and Path(first.lora_path).parent == root
    saved = load_file(Path(first.lora_path) / "adapter_model.safetensors")
    trained = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(saved) == len(trained) and all(
        any(torch.equal(tensor, p.detach()) for p in trained.values()) for tensor in saved.values())

    engine.sync_weights(peft_model)
    engine.generate(PROMPTS[:1], 2, SamplingParams(max_tokens=3, seed=0))
    second = llm.calls[-2][1]
    assert second.lora_int_id == 2 and second.lora_path != first.lora_path
    assert llm.removed_loras == [1] and not Path(first.lora_path).exists()
    assert "load_weights" not in llm.names() and not llm.runner_model.loaded  # the base weights are never copied

    del engine
    gc.collect()
    assert not root.exists()


@pytest.mark.parametrize("sleep", [True, False])
def test_full_sync_loads_every_weight_at_the_next_wake_up(model, tokenizer, sleep):
    llm = FakeLLM(model, tokenizer)
    engine = make_engine(llm, tokenizer, sleep=sleep)
    engine.sync_weights(model)
    assert not llm.runner_model.loaded  # the copy waits for the next rollout (asleep, the weights are on the host)
    engine.generate(PROMPTS[:1], 2, SamplingParams(max_tokens=3, seed=0))
    (loaded,) = llm.runner_model.loaded
    state = model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert llm.names() == ["reset_prefix_cache", "generate"] + (["sleep"] if sleep else [])
    llm.calls.clear()
    engine.sync_weights(model)
    engine.generate(PROMPTS[:1], 2, SamplingParams(max_tokens=3, seed=0))
    assert len(llm.runner_model.loaded) == 2
    if sleep:  # wake the weights, copy into them, reset the prefix cache, then wake the KV cache
        assert llm.names() == ["wake_up:weights", "reset_prefix_cache", "wake_up:kv_cache", "generate", "sleep"]
    else:
        assert llm.names() == ["reset_prefix_cache", "generate"]
    llm.calls.clear()
    engine.generate(PROMPTS[:1], 2, SamplingParams(max_tokens=3, seed=0))  # nothing new to load
    assert len(llm.runner_model.loaded) == 2
    assert llm.names() == (["wake_up:weights", "wake_up:kv_cache", "generate", "sleep"] if sleep else ["generate"])

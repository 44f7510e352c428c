import pytest
import torch
from transformers import LogitsProcessorList

from aha.backends.torch.rollout import HFRolloutEngine, SamplingParams, _warpers
from aha.conformance.tolerances import tolerance

F32 = tolerance("float32")


@pytest.fixture
def prompts(tokenizer):
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("<s>ab", "<s>User: 12+34", "<s>x+y")]


def recomputed_logp(model, prompt, completion, temperature):
    """log_softmax(logits / τ) at the sampled tokens, from one full forward pass (no KV cache)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_groups_shapes_and_finish_reasons(tiny_model, tokenizer, prompts):
    rollout = HFRolloutEngine(tiny_model, tokenizer).generate(prompts, 3, SamplingParams(max_tokens=6, seed=0))
    assert len(rollout) == 9 and rollout.prompt_ids == [p for p in prompts for _ in range(3)]
    for ids, logp, reason in zip(rollout.completion_ids, rollout.sampler_logp, rollout.finish_reason):
        assert 1 <= len(ids) <= 6 and len(logp) == len(ids) and all(lp <= 0 for lp in logp)
        assert reason == ("stop" if ids[-1] == tokenizer.eos_token_id else "length")
        assert reason == "stop" or len(ids) == 6
    assert rollout.texts == tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    assert rollout.is_truncated == [r == "length" for r in rollout.finish_reason]


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0, max_tokens=10),
                                      SamplingParams(temperature=1.0, max_tokens=10, seed=3)])
def test_completion_ends_at_first_eos_inclusive(tiny_model, tokenizer, prompts, sampling):
    """Make a token the model really emits an EOS: each completion must be the EOS-free run's
    tokens up to and including its first occurrence, and flagged truncated only without one."""
    free = HFRolloutEngine(tiny_model, tokenizer).generate(prompts, 2, sampling)
    stop_token = free.completion_ids[0][2]
    tiny_model.generation_config.eos_token_id = stop_token
    engine = HFRolloutEngine(tiny_model, tokenizer)
    assert engine.eos_token_ids == [tokenizer.eos_token_id, stop_token]
    stopped = engine.generate(prompts, 2, sampling)
    for ids, cut, logp, cut_logp, reason in zip(free.completion_ids, stopped.completion_ids, free.sampler_logp,
                                                stopped.sampler_logp, stopped.finish_reason):
        end = next((t + 1 for t, token in enumerate(ids) if token in engine.eos_token_ids), len(ids))
        assert cut == ids[:end] and reason == ("stop" if cut[-1] in engine.eos_token_ids else "length")
        torch.testing.assert_close(torch.tensor(cut_logp), torch.tensor(logp[:end]), rtol=F32.rtol, atol=F32.atol)
    assert stopped.finish_reason[0] == "stop" and len(stopped.completion_ids[0]) <= 3
    assert "length" in stopped.finish_reason  # rows that never emit it stay truncated at max_tokens


def test_seed_makes_sampling_reproducible_without_touching_global_rng(tiny_model, tokenizer, prompts):
    engine = HFRolloutEngine(tiny_model, tokenizer)
    sampling = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=8, seed=11)
    torch.manual_seed(123)
    first = engine.generate(prompts, 2, sampling)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)
    again = engine.generate(prompts, 2, sampling)
    assert again.completion_ids == first.completion_ids and again.sampler_logp == first.sampler_logp
    other = engine.generate(prompts, 2, SamplingParams(temperature=1.0, top_p=0.95, max_tokens=8, seed=12))
    assert other.completion_ids != first.completion_ids


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_sampler_logp_equals_recomputed_log_softmax_at_temperature(tiny_model, tokenizer, prompts, temperature):
    rollout = HFRolloutEngine(tiny_model, tokenizer).generate(
        prompts, 2, SamplingParams(temperature=temperature, max_tokens=8, seed=0))
    for prompt, ids, logp in zip(rollout.prompt_ids, rollout.completion_ids, rollout.sampler_logp):
        torch.testing.assert_close(torch.tensor(logp), recomputed_logp(tiny_model, prompt, ids, temperature),
                                   rtol=F32.rtol, atol=F32.atol)


def test_greedy_takes_the_argmax_and_reports_temperature_one_logp(tiny_model, tokenizer, prompts):
    rollout = HFRolloutEngine(tiny_model, tokenizer).generate(prompts, 1, SamplingParams(temperature=0, max_tokens=6))
    for prompt, ids, logp in zip(rollout.prompt_ids, rollout.completion_ids, rollout.sampler_logp):
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1]
        assert logits.argmax(-1).tolist() == ids
        torch.testing.assert_close(torch.tensor(logp), recomputed_logp(tiny_model, prompt, ids, 1.0),
                                   rtol=F32.rtol, atol=F32.atol)


def test_sampler_logp_equals_output_scores_naive_equivalent_with_truncation_warpers(tiny_model, tokenizer):
    """The recorder's docstring: log_softmax of generate(output_scores=True).scores at the sampled tokens."""
    sampling = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, max_tokens=7, seed=5)
    prompt = [tokenizer("<s>User: 12+34", add_special_tokens=False)["input_ids"]]
    engine = HFRolloutEngine(tiny_model, tokenizer)
    rollout = engine.generate(prompt, 4, sampling)
    config = engine._generation_config(sampling)
    with torch.random.fork_rng():
        torch.manual_seed(sampling.seed)
        out = tiny_model.generate(
            input_ids=torch.tensor(prompt * 4), attention_mask=torch.ones(4, len(prompt[0]), dtype=torch.long),
            generation_config=config, output_scores=True, return_dict_in_generate=True,
            logits_processor=LogitsProcessorList(_warpers(sampling)))
    tokens = out.sequences[:, len(prompt[0]):]
    naive = torch.stack([torch.log_softmax(s, -1).gather(-1, tokens[:, t:t + 1])[:, 0]
                         for t, s in enumerate(out.scores)], 1)
    for i, (ids, logp) in enumerate(zip(rollout.completion_ids, rollout.sampler_logp)):
        assert ids == tokens[i, :len(ids)].tolist()
        torch.testing.assert_close(torch.tensor(logp), naive[i, :len(ids)], rtol=F32.rtol, atol=F32.atol)


def test_left_padding_changes_nothing(tiny_model, tokenizer, prompts):
    engine = HFRolloutEngine(tiny_model, tokenizer)
    greedy = SamplingParams(temperature=0, max_tokens=8)
    alone = engine.generate(prompts[:1], 1, greedy)
    batched = engine.generate(prompts, 1, greedy)
    assert batched.completion_ids[0] == alone.completion_ids[0]
    torch.testing.assert_close(torch.tensor(batched.sampler_logp[0]), torch.tensor(alone.sampler_logp[0]),
                               rtol=F32.rtol, atol=F32.atol)
    chunked = HFRolloutEngine(tiny_model, tokenizer, max_batch_size=2).generate(prompts, 1, greedy)
    assert chunked.completion_ids == batched.completion_ids


# transformers 5 renamed gradient_checkpointing_enable; the old name also works on 4.56, the floor.
@pytest.mark.filterwarnings("ignore:.*checkpointing.*:FutureWarning")
def test_peft_model_with_gradient_checkpointing(tiny_model, tokenizer, prompts):
    peft = pytest.importorskip("peft")
    greedy = SamplingParams(temperature=0, max_tokens=6)
    base = HFRolloutEngine(tiny_model, tokenizer).generate(prompts, 1, greedy)
    model = peft.get_peft_model(tiny_model, peft.LoraConfig(r=4, target_modules="all-linear"))
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    rollout = HFRolloutEngine(model, tokenizer).generate(prompts, 1, greedy)
    assert rollout.completion_ids == base.completion_ids  # LoRA starts as the identity
    assert model.training and torch.is_grad_enabled()


def test_no_pad_token_uses_eos(tiny_model, tokenizer):
    bare = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    bare.pad_token = None
    assert HFRolloutEngine(tiny_model, bare).pad_token_id == bare.eos_token_id


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(min_p=1.0),
                                 dict(max_tokens=0)])
def test_sampling_params_are_validated(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)

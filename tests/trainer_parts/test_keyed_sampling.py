"""Prompt-keyed sampling (SamplingParams.prompt_seeds): exact sampling whose draws do not depend on the other
rows of the batch, so N processes reproduce one (backends/torch/distributed.py)."""

import random

import pytest
import torch

from aha.backends.torch.rollout import HFRolloutEngine, SamplingParams, _hash32, _KeyedGumbelSampler
from aha.conformance.tolerances import tolerance

F32 = tolerance("float32")


def recomputed_logp(model, prompt, completion, temperature):
    """log_softmax(logits / τ) at the sampled tokens, from one full forward pass (as test_rollout.py)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.fixture
def prompts(tokenizer):
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("<s>ab", "<s>User: 12+34", "<s>x+y")]


def keyed(seeds, **values) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.9, "top_k": 20, "max_tokens": 8, "prompt_seeds": tuple(seeds), **values})


def test_a_prompts_completions_do_not_depend_on_the_rest_of_the_batch(tiny_model, tokenizer, prompts):
    engine = HFRolloutEngine(tiny_model, tokenizer)
    together = engine.generate(prompts, 3, keyed([11, 22, 33]))
    alone = engine.generate(prompts[1:2], 3, keyed([22]))
    assert together.completion_ids[3:6] == alone.completion_ids
    for got, expected in zip(together.sampler_logp[3:6], alone.sampler_logp):  # other padding: float rounding
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=F32.rtol, atol=F32.atol)
    engine.max_batch_size = 2  # generate calls that split a group
    assert engine.generate(prompts, 3, keyed([11, 22, 33])).completion_ids == together.completion_ids
    other = engine.generate(prompts, 3, keyed([11, 23, 33])).completion_ids
    assert other[:3] == together.completion_ids[:3] and other[3:6] != together.completion_ids[3:6]
    assert len(set(map(tuple, together.completion_ids[3:6]))) > 1  # a group's completions differ


def test_gumbel_max_draws_from_the_softmax():
    """Frequencies of argmax(z + keyed Gumbel noise) over 40000 keys match softmax(z) (5 standard errors);
    a token the warpers removed (-inf) is never drawn."""
    scores = torch.tensor([1.0, 0.5, -1.0, 2.0, -torch.inf])
    rows = 40_000
    sampler = _KeyedGumbelSampler(list(range(rows)), prompt_width=3)
    drawn = sampler(torch.zeros(rows, 3, dtype=torch.long), scores.expand(rows, -1)).argmax(-1)
    frequencies = torch.bincount(drawn, minlength=5).double() / rows
    expected = torch.softmax(scores.double(), -1)
    assert frequencies[4] == 0
    assert ((frequencies - expected).abs() <= 5 * (expected * (1 - expected) / rows).sqrt()).all(), frequencies


def test_next_position_draws_anew():
    sampler = _KeyedGumbelSampler([7, 8], prompt_width=2)
    scores = torch.zeros(2, 1000)
    first = sampler(torch.zeros(2, 2, dtype=torch.long), scores)
    second = sampler(torch.zeros(2, 3, dtype=torch.long), scores)
    assert not torch.equal(first, second) and not torch.equal(first[0], first[1])


def test_sampler_logp_is_the_warped_distribution_before_the_noise(tiny_model, tokenizer, prompts):
    rollout = HFRolloutEngine(tiny_model, tokenizer).generate(prompts, 2, keyed([1, 2, 3], top_k=0, temperature=0.7))
    for prompt, ids, logp in zip(rollout.prompt_ids, rollout.completion_ids, rollout.sampler_logp):
        torch.testing.assert_close(torch.tensor(logp), recomputed_logp(tiny_model, prompt, ids, 0.7),
                                   rtol=F32.rtol, atol=F32.atol)


def test_hash32_is_lowbias32():
    """The int64 tensor version equals the 32-bit reference on Python ints (no overflow, all bits used)."""
    def reference(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 0xFFFFFFFF, 0x80000000] + [random.Random(0).getrandbits(32) for _ in range(200)]
    assert _hash32(torch.tensor(values, dtype=torch.int64)).tolist() == [reference(v) for v in values]


def test_prompt_seeds_must_match_the_prompts(tiny_model, tokenizer, prompts):
    with pytest.raises(ValueError, match="2 prompt_seeds for 3 prompts"):
        HFRolloutEngine(tiny_model, tokenizer).generate(prompts, 2, keyed([1, 2]))

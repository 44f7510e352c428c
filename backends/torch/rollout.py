"""Rollout engines: prompts (token ids) in, G sampled completions per prompt out.

One small interface (`RolloutEngine`) with two engines: `HFRolloutEngine` here (transformers
`generate`, batched, KV cache) and a vLLM engine that shares memory with training. Completions
follow TRL's transformers path (trl.md §1.3): a completion ends with its first EOS token
(included; anything after it dropped); one without an EOS ran out of `max_tokens` and is
truncated (`finish_reason == "length"`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    """Softmax temperature τ; 0 means greedy decoding (then log-probs are those of τ = 1)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables it."""
    min_p: float = 0.0
    """Drop tokens with probability below min_p × the top probability; 0 disables it."""
    max_tokens: int = 256
    """Completion length limit (TRL: max_completion_length)."""
    seed: int | None = None
    """Seeds the sampler for this call (the trainer passes seed + step); None leaves the RNG alone."""
    prompt_seeds: tuple[int, ...] | None = None
    """One seed per prompt: each completion's draws then depend on its prompt's seed, its index in the
    group and its token position alone, not on which other prompts share the batch, the `generate`
    call or the process (`_KeyedGumbelSampler`); `seed` is not used. None: one stream per call."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Rollout:
    """len(prompts) × n completions; the n completions of one prompt are contiguous (one group)."""

    prompt_ids: list[list[int]]
    """The prompt of each completion (repeated n times), unpadded."""
    completion_ids: list[list[int]]
    """Sampled tokens, unpadded; ends with EOS unless truncated."""
    texts: list[str]
    """Completions decoded with special tokens skipped (what reward functions see)."""
    sampler_logp: list[list[float]] | None
    """Log-probability of each sampled token under the distribution it was sampled from (after
    temperature, top-k, top-p, min-p); None when the engine cannot report it."""
    finish_reason: list[FinishReason]

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def is_truncated(self) -> list[bool]:
        return [reason == "length" for reason in self.finish_reason]


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> Rollout:
        """n completions per prompt, each prompt's n contiguous."""

    def sync_weights(self, model: Any) -> None:
        """Make the engine sample from `model`'s current weights (called after each optimizer step)."""


class HFRolloutEngine:
    """Batched `model.generate` on the training model itself: weights are always current, so
    `sync_weights` only points the engine at the object passed (e.g. the model once peft-wrapped).

    Works with a peft-wrapped model and with gradient checkpointing enabled: generation runs in
    eval mode, without gradients, with the KV cache on, and the training mode is restored after.
    Sampler log-probs equal `log_softmax` of the processed scores transformers samples from (what
    `output_scores=True` returns), gathered one step at a time so the [steps, N, vocab] scores are
    never held.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        """Most sequences per `generate` call (None: all at once)."""
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]

    def sync_weights(self, model: Any) -> None:
        self.model = model

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> Rollout:
        if n < 1 or not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError(f"need n >= 1 and non-empty prompts, got n={n}, {len(prompt_ids)} prompts")
        if sampling.prompt_seeds is not None and len(sampling.prompt_seeds) != len(prompt_ids):
            raise ValueError(f"{len(sampling.prompt_seeds)} prompt_seeds for {len(prompt_ids)} prompts")
        expanded = [list(p) for p in prompt_ids for _ in range(n)]
        keys = None if sampling.prompt_seeds is None else [
            completion_key(seed, index) for seed in sampling.prompt_seeds for index in range(n)]
        step = self.max_batch_size or len(expanded)
        completions, logps = [], []
        with _generation_mode(self.model), _seeded(sampling.seed, self.model.device):
            for start in range(0, len(expanded), step):
                keyed = {} if keys is None else {"keys": keys[start:start + step]}
                ids, logp = self._generate_batch(expanded[start:start + step], sampling, **keyed)
                completions += ids
                logps += logp
        reasons: list[FinishReason] = ["stop" if ids[-1] in self.eos_token_ids else "length" for ids in completions]
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return Rollout(expanded, completions, texts, logps, reasons)

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingParams, keys: list[int] | None = None
                        ) -> tuple[list[list[int]], list[list[float]]]:
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in prompts], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
        recorder = _SampledTokenLogprobs()
        keyed = keys is not None and sampling.temperature > 0
        # Keyed sampling is greedy decoding over scores + keyed Gumbel noise, added after the recorder.
        sampler = [_KeyedGumbelSampler(keys, prompt_width=width)] if keyed else []
        output = self.model.generate(
            input_ids=ids, attention_mask=mask, generation_config=self._generation_config(sampling, greedy=keyed),
            logits_processor=LogitsProcessorList([*_warpers(sampling), recorder, *sampler]))
        new_tokens = output[:, width:]
        logp = recorder.sampled_logprobs(new_tokens)
        completions, logps = [], []
        for row, row_logp in zip(new_tokens.tolist(), logp.tolist()):
            end = next((t + 1 for t, token in enumerate(row) if token in self.eos_token_ids), len(row))
            completions.append(row[:end])
            logps.append(row_logp[:end])
        return completions, logps

    def _generation_config(self, sampling: SamplingParams, *, greedy: bool = False) -> GenerationConfig:
        """greedy=True: argmax decoding even at temperature > 0 (keyed sampling adds its own noise)."""
        # Every field that changes the distribution is set explicitly: generate() fills unset
        # fields from the checkpoint's generation_config.json (e.g. top_k=20, repetition_penalty).
        # The warpers themselves are passed as logits processors (see _warpers) so the recorder
        # runs after them; the config's own are neutral.
        do_sample = sampling.temperature > 0 and not greedy
        neutral_warpers = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                               epsilon_cutoff=0.0, eta_cutoff=0.0) if do_sample else {}
        return GenerationConfig(
            max_new_tokens=sampling.max_tokens, min_new_tokens=0, do_sample=do_sample, num_beams=1,
            repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id, use_cache=True, **neutral_warpers)


def _warpers(sampling: SamplingParams) -> list[LogitsProcessor]:
    """transformers' own sampling warpers, in transformers' order (temperature, top-k, top-p, min-p)."""
    if sampling.temperature == 0:
        return []
    warpers: list[LogitsProcessor] = []
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    if sampling.min_p > 0:
        warpers.append(MinPLogitsWarper(sampling.min_p))
    return warpers


class _SampledTokenLogprobs(LogitsProcessor):
    """Last logits processor: keeps log_softmax of this step's final scores until the next call,
    whose input_ids end with the token sampled from them, so only one [N, vocab] step is held.

    Naive equivalent: torch.stack([torch.log_softmax(s, -1).gather(-1, tokens[:, t:t+1])[:, 0]
    for t, s in enumerate(generate(..., output_scores=True).scores)], 1)
    """

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []
        self.pending: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self.steps.append(self.pending.gather(-1, input_ids[:, -1:])[:, 0])
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def sampled_logprobs(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[N, steps] log-probs of `new_tokens` (the generated part of the output)."""
        last = self.pending.gather(-1, new_tokens[:, -1:])[:, 0]
        return torch.stack([*self.steps, last], dim=1)


class _KeyedGumbelSampler(LogitsProcessor):
    """Last logits processor of keyed sampling: adds Gumbel noise g = -log(-log u) to the final scores,
    with u a hash of (the row's key, the token position, the vocabulary index) alone; greedy decoding
    on top then samples from softmax(scores) exactly (the Gumbel-max trick: argmax(z + g) ~ softmax(z),
    Gumbel 1954; Maddison, Tarlow & Minka 2014), and a row's draws do not depend on the other rows of
    its batch. Tokens the warpers removed (-inf) stay removed.

    Naive equivalent (equal in distribution): torch.multinomial(torch.softmax(scores, -1), 1) with one
    torch.Generator per row, seeded by its key.
    """

    def __init__(self, keys: list[int], *, prompt_width: int) -> None:
        self.keys = torch.tensor(keys, dtype=torch.int64)
        self.prompt_width = prompt_width
        self._vocab_hash: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._vocab_hash is None:
            self._vocab_hash = _hash32(torch.arange(scores.shape[-1], dtype=torch.int64, device=scores.device))
            self.keys = self.keys.to(scores.device)
        position = input_ids.shape[1] - self.prompt_width
        rows = _hash32(self.keys ^ _hash32(torch.tensor(position, dtype=torch.int64, device=scores.device)))
        uniform = (_hash32(rows[:, None] ^ self._vocab_hash).double() + 0.5) / 2**32  # in (0, 1)
        return scores.double() - torch.log(-torch.log(uniform))


def completion_key(prompt_seed: int, index: int) -> int:
    """The 32-bit key of completion `index` of the prompt seeded `prompt_seed` (splitmix64 of both)."""
    return _splitmix64(_splitmix64(prompt_seed) ^ index) & 0xFFFFFFFF


def _splitmix64(x: int) -> int:
    """Steele, Lea & Flood 2014 (SplitMix64's finalizer), on Python ints modulo 2**64."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons, "Prospecting for hash functions", 2018), a bijection of 32-bit integers,
    on int64 tensors holding values in [0, 2**32). Products are taken in 16-bit halves so nothing
    overflows int64."""
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, factor: int) -> torch.Tensor:
    """x * factor mod 2**32 for x in [0, 2**32): (low half + (high half * factor mod 2**16) << 16)."""
    low, high = x & 0xFFFF, x >> 16
    return (low * factor + (((high * factor) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS plus the model's generation_config EOS ids (chat models often end turns
    with a second token, e.g. <|im_end|>)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = model.generation_config.eos_token_id
    for token in [configured] if isinstance(configured, int) else (configured or []):
        if token not in ids:
            ids.append(token)
    if not ids:
        raise ValueError("the tokenizer has no eos_token and the model's generation_config no eos_token_id; "
                         "completions could never stop")
    return ids


@contextlib.contextmanager
def _generation_mode(model: Any) -> Iterator[None]:
    """Eval mode (dropout off, gradient checkpointing inactive) and no autograd, restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for the block without disturbing the caller's RNG stream."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield

"""A stand-in for the part of vLLM 0.26 that VLLMRolloutEngine uses, so its logic runs on a CPU without vLLM.

`FakeLLM` samples with `HFRolloutEngine` on a transformers model and answers in vLLM's output shapes:
`RequestOutput.outputs` of `CompletionOutput(index, token_ids, logprobs=[{token: Logprob}], finish_reason)`,
completions in reverse index order (vLLM does not promise an order) and vLLM's finish rule (an EOS drawn as the
last allowed token is "length"). It records sleep, wake-up, prefix-cache, LoRA and weight-loading calls.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from aha.backends.torch.rollout import HFRolloutEngine, SamplingParams

API = SimpleNamespace(SamplingParams=lambda **kwargs: SimpleNamespace(**kwargs),
                      LoRARequest=lambda **kwargs: SimpleNamespace(**kwargs))
"""What `from_policy` takes from vLLM: `SamplingParams` and `LoRARequest` (attribute bags here)."""


class FakeRunnerModel:
    """`model_runner.model`: records what `load_weights` received."""

    def __init__(self) -> None:
        self.loaded: list[dict[str, torch.Tensor]] = []

    def load_weights(self, weights):
        self.loaded.append({name: tensor.clone() for name, tensor in weights})


class FakeLLM:
    def __init__(self, model, tokenizer, *, logprob_shift: float = 0.0) -> None:
        self.hf = HFRolloutEngine(model, tokenizer)
        self.logprob_shift = logprob_shift
        """Added to every reported log-prob: a known train/inference mismatch."""
        self.calls: list[tuple] = []
        self.removed_loras: list[int] = []
        self.runner_model = FakeRunnerModel()
        executor = SimpleNamespace(driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=self.runner_model)))
        self.llm_engine = SimpleNamespace(model_executor=executor, remove_lora=self._remove_lora)

    def _remove_lora(self, lora_id: int) -> bool:
        self.removed_loras.append(lora_id)
        return True

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        self.calls.append(("generate", lora_request))
        outputs = []
        for prompt, p in zip(prompts, params):
            assert p.logprobs == 0 and p.detokenize is False and not use_tqdm
            sampling = SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=max(p.top_k, 0), min_p=p.min_p,
                                      max_tokens=p.max_tokens, seed=p.seed)
            rollout = self.hf.generate([prompt["prompt_token_ids"]], p.n, sampling)
            samples = []
            for index, (ids, logps) in enumerate(zip(rollout.completion_ids, rollout.sampler_logp)):
                stopped = ids[-1] in p.stop_token_ids and len(ids) < p.max_tokens
                samples.append(SimpleNamespace(
                    index=index, token_ids=tuple(ids), finish_reason="stop" if stopped else "length",
                    logprobs=[{token: SimpleNamespace(logprob=value + self.logprob_shift, rank=1)}
                              for token, value in zip(ids, logps)]))
            outputs.append(SimpleNamespace(outputs=samples[::-1]))
        return outputs

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None) -> None:
        self.calls.append(("wake_up", tuple(tags) if tags else None))

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache",))

    def names(self) -> list[str]:
        """The recorded calls by name."""
        return [call[0] if call[0] != "wake_up" else f"wake_up:{','.join(call[1])}" for call in self.calls]

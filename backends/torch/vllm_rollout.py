"""The vLLM rollout engine: in-process, colocated with training on the same GPU, sharing its memory through
sleep mode, with the policy's weights synced in memory after each optimizer step (TRL's `vllm_mode="colocate"`).

Targets vLLM 0.26 (the build of shared/device/README.md, whose smoke test ran sleep, wake-up and a /dev/shm
LoRARequest on an H200). This engine itself has run only against the stand-in of tests/vllm (no GPU time was left);
bench/rollout.py is its first check on the GPU. Importing this module does not import vLLM;
`VLLMRolloutEngine.from_policy` does, and says how to install it when it is missing.

One training step:
    wake_up() -> generate: n completions per prompt, sampler log-probs, finish reasons -> sleep(level=1)
    -> scoring and update in the memory vLLM released -> optimizer step -> sync_weights(model)
sleep(level=1) drops the KV cache and parks vLLM's weights in host memory; wake_up() maps both back. The
allocator cache of the update is emptied before waking, or vLLM's KV cache would not fit where it was.

Weight sync:
- LoRA: vLLM keeps its own copy of the base weights, never touched. The adapter (a few MB) is written by peft's
  `save_pretrained` into a tmpfs folder (/dev/shm), and the next rollout passes a `LoRARequest` with a fresh id,
  so vLLM loads it anew (an id it has seen would hit its adapter cache). vLLM's LoRARequest takes a path, not
  tensors; on tmpfs that path costs a memory copy and no disk.
- Full fine-tuning: every weight is copied in place through the model's own `load_weights` (Hugging Face names,
  the format vLLM reads checkpoints in) at `llm.llm_engine.model_executor.driver_worker.model_runner.model`,
  reachable because VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps vLLM's engine core in this process. The copy waits
  for the next rollout (asleep, vLLM's weights are in host memory): wake the weights, load, reset the prefix
  cache (its KV came from the old weights), then wake the KV cache.

Sampling is `HFRolloutEngine`'s (rollout.py): the same SamplingParams mapped one to one
(`sampling_params_kwargs`); a completion ends with its first EOS ("stop") or runs out of max_tokens ("length"),
decided from the tokens as the hf engine does; sampler log-probs are vLLM's processed log-probs
(`logprobs_mode="processed_logprobs"`: after temperature and the top-k/top-p/min-p filters, the distribution each
token was drawn from, as TRL asks for them) of the sampled tokens (`logprobs=0`).

Environment: VLLM_ENABLE_V1_MULTIPROCESSING=0 is set here when unset. A vLLM build without FlashInfer also needs
VLLM_USE_FLASHINFER_SAMPLER=0. One process only (vLLM in several training processes would need
`distributed_executor_backend="external_launcher"`, not done here). QLoRA is refused: vLLM would sample from the
unquantized base, a mismatch by construction.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .config import ConfigError
from .rollout import FinishReason, Rollout, SamplingParams, _eos_token_ids

INSTALL_HINT = "rollout='vllm' needs vLLM (0.26), which does not import here: install aha-rl[vllm]"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for max_lora_rank (vllm/config/lora.py); the adapter's rank is rounded up to one."""
HEADROOM = 0.05
"""Fraction of the device left free by the computed vllm_gpu_memory_utilization: allocator fragmentation and
what neither side accounts for (CUDA context, NCCL, cuBLAS workspaces)."""


def sampling_params_kwargs(sampling: SamplingParams, n: int, *, eos_token_ids: list[int],
                           seed: int | None) -> dict[str, Any]:
    """The keyword arguments of `vllm.SamplingParams` that sample exactly what `HFRolloutEngine` samples.

    aha -> vLLM: temperature (0 = greedy in both), top_p, top_k (0 = off -> -1), min_p, max_tokens, n, seed (one
    per request, see `request_seeds`), logprobs=0 (the sampled token's log-prob only), stop at every EOS id
    (the tokenizer's and the generation config's, kept in the output), no other stop, penalty or minimum
    length. Detokenization is skipped: texts are decoded by the tokenizer as in the hf engine.
    """
    return dict(
        n=n, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1, min_p=sampling.min_p, max_tokens=sampling.max_tokens,
        seed=seed, logprobs=0, stop_token_ids=list(eos_token_ids), ignore_eos=False, min_tokens=0,
        repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, detokenize=False,
    )


def request_seeds(sampling: SamplingParams, num_prompts: int) -> list[int | None]:
    """One vLLM seed per prompt (request). vLLM seeds each request's own generator, so one seed shared by every
    prompt would give them all the same random draws: the call's seed is spread over the prompts instead.
    `prompt_seeds` (the trainer's per-prompt seeds) are used as they are."""
    if sampling.prompt_seeds is not None:
        if len(sampling.prompt_seeds) != num_prompts:
            raise ValueError(f"{len(sampling.prompt_seeds)} prompt_seeds for {num_prompts} prompts")
        return list(sampling.prompt_seeds)
    if sampling.seed is None:
        return [None] * num_prompts
    return [(sampling.seed * 1_000_003 + index) % 2**63 for index in range(num_prompts)]


def gpu_memory_utilization(*, free_bytes: int, total_bytes: int, training_state_bytes: int,
                           headroom: float = HEADROOM) -> float:
    """vLLM's `gpu_memory_utilization` when the config leaves it None: the fraction of the whole device vLLM may
    take (its weights, activations and KV cache), rounded down to 0.01.

    Measured after the policy is loaded, so `free_bytes` already excludes the trained weights. While vLLM is
    awake training still holds the gradients and AdamW moments of the trainable weights (`training_state_bytes`,
    allocated at the first step); its activations come and go while vLLM sleeps. vLLM checks at start that
    utilization × total fits in the free memory; this fraction does, by `training_state_bytes` + headroom.
    """
    usable = free_bytes - training_state_bytes - headroom * total_bytes
    return int(100 * usable / total_bytes) / 100


def training_state_bytes(parameters: list[torch.nn.Parameter]) -> int:
    """Gradients and AdamW's two moments of the trainable weights, in their dtype: 3 × their size (an upper
    bound for the 8-bit optimizer)."""
    return 3 * sum(p.numel() * p.element_size() for p in parameters)


class VLLMRolloutEngine:
    """A `RolloutEngine` (rollout.py) on an in-process `vllm.LLM`. Build it with `from_policy`.

    `api` holds vLLM's `SamplingParams` and `LoRARequest` classes (given by `from_policy`, so that the engine's
    own logic runs in tests against a stand-in `llm` without vLLM)."""

    def __init__(self, llm: Any, tokenizer: Any, *, api: Any, eos_token_ids: list[int], pad_token_id: int,
                 lora: bool, sleep: bool) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.api = api
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.lora = lora
        self.sleep_between_rollouts = sleep
        self._lora_request: Any = None
        self._lora_version = 0
        self._adapter_root: Path | None = None
        if lora:  # removed with the engine, or at exit
            self._adapter_root = Path(tempfile.mkdtemp(prefix="aha-lora-", dir=_tmpfs()))
            weakref.finalize(self, shutil.rmtree, self._adapter_root, True)
        self._pending_model: torch.nn.Module | None = None
        self._asleep = False

    @classmethod
    def from_policy(cls, policy: Any, tokenizer: Any, config: Any) -> VLLMRolloutEngine:
        """Start vLLM on the policy's checkpoint (`policy.name_or_path`) in this process: sleep mode on, LoRA on
        when the policy is LoRA (rank rounded up to one vLLM accepts), the policy's dtype, room for
        max_prompt_length + max_completion_length tokens, `vllm_max_num_seqs` sequences at once (None: one
        rollout's), and `vllm_gpu_memory_utilization` (None: `gpu_memory_utilization`)."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError as error:
            raise ConfigError(f"{INSTALL_HINT} ({type(error).__name__}: {error})") from None
        if not torch.cuda.is_available():
            raise ConfigError("rollout='vllm' needs a CUDA GPU; use rollout='hf' on this machine")
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ConfigError("rollout='vllm' runs in one process; with several use rollout='hf'")
        if config.load_in_4bit:
            raise ConfigError("rollout='vllm' with load_in_4bit: vLLM would sample from the unquantized base "
                              "weights; use rollout='hf' for QLoRA")
        utilization = config.vllm_gpu_memory_utilization
        if utilization is None:
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(policy.device)
            utilization = gpu_memory_utilization(
                free_bytes=free, total_bytes=total,
                training_state_bytes=training_state_bytes(policy.trainable_parameters()))
            if utilization < HEADROOM:
                raise ConfigError(
                    f"rollout='vllm': {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB leaves vLLM "
                    f"{utilization:.2f} of the device after training's state; set vllm_gpu_memory_utilization, "
                    "or use LoRA (lora_r > 0) or a smaller model")
        lora_options = {}
        if policy.is_peft:
            lora_options = dict(enable_lora=True, max_loras=1,
                                max_lora_rank=next(r for r in LORA_RANKS if r >= config.lora_r))
        # Token ids in and out (texts are decoded by `tokenizer`), so vLLM loads no tokenizer of its own.
        llm = vllm.LLM(
            model=policy.name_or_path, skip_tokenizer_init=True, dtype=_vllm_dtype(policy.lm_head_weight.dtype),
            seed=config.seed, enable_sleep_mode=config.vllm_enable_sleep_mode,
            gpu_memory_utilization=utilization,
            max_model_len=config.max_prompt_length + config.max_completion_length,
            max_num_seqs=config.vllm_max_num_seqs or config.generation_batch_size,
            logprobs_mode="processed_logprobs", **lora_options)
        eos = _eos_token_ids(policy.model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        api = SimpleNamespace(SamplingParams=vllm.SamplingParams, LoRARequest=LoRARequest)
        return cls(llm, tokenizer, api=api, eos_token_ids=eos, pad_token_id=pad, lora=policy.is_peft,
                   sleep=config.vllm_enable_sleep_mode)  # awake: the first rollout comes next

    # --- RolloutEngine ------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> Rollout:
        if n < 1 or not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError(f"need n >= 1 and non-empty prompts, got n={n}, {len(prompt_ids)} prompts")
        params = [self.api.SamplingParams(**sampling_params_kwargs(sampling, n, eos_token_ids=self.eos_token_ids,
                                                                   seed=seed))
                  for seed in request_seeds(sampling, len(prompt_ids))]
        self._wake_up()
        try:
            outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params,
                                        lora_request=self._lora_request, use_tqdm=False)
        finally:
            self._go_to_sleep()
        completions, logps = [], []
        for output in outputs:
            for sample in sorted(output.outputs, key=lambda s: s.index):
                ids = list(sample.token_ids)
                completions.append(ids)
                logps.append([step[token].logprob for token, step in zip(ids, sample.logprobs)])
        expanded = [list(p) for p in prompt_ids for _ in range(n)]
        reasons: list[FinishReason] = ["stop" if ids and ids[-1] in self.eos_token_ids else "length"
                                       for ids in completions]
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return Rollout(expanded, completions, texts, logps, reasons)

    def sync_weights(self, model: Any) -> None:
        """After an optimizer step: LoRA writes the adapter now (to tmpfs; the next rollout loads it under a new
        id); full fine-tuning keeps a reference to `model` and copies its weights at the next wake-up."""
        if not self.lora:
            self._pending_model = model
            return
        self._lora_version += 1
        folder = self._adapter_root / f"v{self._lora_version}"
        model.save_pretrained(str(folder), safe_serialization=True)
        previous, self._lora_request = self._lora_request, self.api.LoRARequest(
            lora_name=f"aha-v{self._lora_version}", lora_int_id=self._lora_version, lora_path=str(folder))
        if previous is not None:  # drop the previous adapter from vLLM's cache and from tmpfs
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    # --- sleep mode ---------------------------------------------------------------------------------
    def _wake_up(self) -> None:
        if not self._asleep and self._pending_model is None:
            return
        torch.cuda.empty_cache()  # the update's cached blocks, or the KV cache would not fit back
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        if self._pending_model is not None:
            self._load_full_weights(self._pending_model)
            self._pending_model = None
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
        self._asleep = False

    def _go_to_sleep(self) -> None:
        if self.sleep_between_rollouts:
            self.llm.sleep(level=1)
            self._asleep = True

    def _load_full_weights(self, model: torch.nn.Module) -> None:
        """Copy every weight of the Hugging Face model into vLLM's model, in place (vLLM 0.26, in-process)."""
        runner_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        with torch.no_grad():
            runner_model.load_weights((name, tensor.detach()) for name, tensor in model.state_dict().items())
        self.llm.reset_prefix_cache()


def _tmpfs() -> str | None:
    """/dev/shm where it exists (Linux), else the system's temporary folder."""
    return "/dev/shm" if Path("/dev/shm").is_dir() else None


def _vllm_dtype(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]

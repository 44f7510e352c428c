"""The trained policy: a causal LM from `transformers`, LoRA/QLoRA through `peft`, and what the
trainer needs from it: last hidden states (never logits), the LM-head weight, the reference policy.

Memory choices (shared/reference/unsloth.md §1, T12):
- `hidden_states` runs the decoder only and returns the final-norm outputs of the positions that
  predict completion tokens; log-probs come from them and `lm_head_weight` through the fused,
  chunked op in `logprobs.py`, so `[tokens, vocab]` logits are never held.
- The reference policy of LoRA/QLoRA is the same model with the adapter disabled (no copy).
  Full fine-tuning has no adapter to switch off, so a reference costs a frozen copy of the
  weights, made only when asked for (`reference_copy="device"` or `"cpu"`).
- Gradient checkpointing is non-reentrant (`use_reentrant=False`), which lets gradients reach
  LoRA weights inside a layer whose input does not require grad; `enable_input_require_grads`
  is the workaround the reentrant variant needs and is therefore not installed. With
  `offload_activations=True` (CUDA only) each checkpointed layer input waits in pinned host memory
  until the backward recomputes the layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .batch import position_ids_from_mask

DType = Literal["auto", "float32", "bfloat16"]
ReferenceCopy = Literal["none", "device", "cpu"]


class Policy:
    """A causal LM prepared for RL: LoRA/QLoRA adapter or full fine-tuning, with its tokenizer.

    Build it with `load_policy`. The LM head is never adapted: `load_policy` refuses LoRA target
    lists that name it, and peft's "all-linear" leaves the output layer out, so `lm_head_weight`
    is the base (or, with tied embeddings, the input-embedding) matrix, exactly what the model's
    own logits use.
    """

    def __init__(self, model: nn.Module, tokenizer, *, is_peft: bool, name_or_path: str,
                 reference_model: nn.Module | None = None, offload_activations: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.is_peft = is_peft
        self.name_or_path = name_or_path
        causal_lm = model.get_base_model() if is_peft else model
        self._decoder, self._lm_head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
        self._reference_model = reference_model
        self._offload_activations = offload_activations
        self._in_reference = False
        self.sharded = None
        """FSDP2 sharding across processes (sharding.ShardedModel, set by sharding.shard_policy), or None."""

    @property
    def generation_model(self) -> nn.Module:
        """The module to pass to the rollout engine's `generate` (adapter active); when sharded, a view
        whose `generate` runs in step with the other ranks (sharding.py)."""
        return self.model if self.sharded is None else self.sharded.generation_model

    @property
    def device(self) -> torch.device:
        return self._lm_head.weight.device

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H] output projection; the embedding matrix itself when embeddings are tied.
        Inside `reference()` with a full-fine-tuning copy: the copy's head, on this policy's device.
        Sharded: the gathered weight only after a `hidden_states` pass, so read it after that."""
        if self._using_copy:
            return self._reference_model.get_output_embeddings().weight.to(self.device)
        return self._lm_head.weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        """[V] output bias, None for the usual bias-free LM head."""
        if self._using_copy:
            bias = self._reference_model.get_output_embeddings().bias
            return None if bias is None else bias.to(self.device)
        return self._lm_head.bias

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                      *, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, logits_to_keep, H] of the positions that predict the last
        `logits_to_keep` tokens of `input_ids` [B, L] (positions L-k-1 .. L-2).

        Naive equivalent (the test oracle):
            model(input_ids, attention_mask, position_ids=...).logits[:, -k-1:-1]
            == hidden_states(...) @ lm_head_weight.T (+ lm_head_bias)

        position_ids None counts attended tokens (`position_ids_from_mask`), as `generate` and
        vLLM number a left-padded prompt, so scoring sees the positions that sampling saw.
        """
        if not 1 <= logits_to_keep < input_ids.shape[1]:
            raise ValueError(f"logits_to_keep must be in [1, {input_ids.shape[1] - 1}], got {logits_to_keep}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        if self._using_copy:
            decoder, device = self._reference_model.get_decoder(), self._reference_model.device
            with torch.no_grad():
                output = decoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 position_ids=position_ids.to(device), use_cache=False)
            return output.last_hidden_state[:, -logits_to_keep - 1:-1].to(input_ids.device)
        # Inside a checkpointed layer checkpointing's own hooks win; outside, what autograd saves is each
        # layer's input (checkpoint keeps it for the recompute), and save_on_cpu parks it in pinned memory.
        offload = self._offload_activations and torch.is_grad_enabled() and self.model.training
        # Sharded: the decoder runs under the FSDP root's hooks, which also gather the LM head (sharding.py).
        decoder = self._decoder if self.sharded is None else self.sharded.run(self._decoder)
        with torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext():
            output = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False)
        return output.last_hidden_state[:, -logits_to_keep - 1:-1]

    @contextlib.contextmanager
    def reference(self) -> Iterator[Policy]:
        """Within the block this policy *is* the reference π_ref: `hidden_states`, `lm_head_weight`
        and `lm_head_bias` answer for it (read the head inside the block).

        LoRA/QLoRA: the adapter is disabled for the duration (no copy, no memory).
        Full fine-tuning: the frozen copy made at load time (no gradient); with
        `reference_copy="cpu"` it runs on the CPU and its outputs are moved to this policy's device.
        """
        if self._in_reference:
            raise RuntimeError("reference() is already active")
        if not self.is_peft and self._reference_model is None:
            raise RuntimeError(
                "full fine-tuning keeps no reference model: load with reference_copy='device' or 'cpu' "
                "(a frozen copy of all weights) or train without a reference (beta=0)")
        self._in_reference = True
        try:
            with self.model.disable_adapter() if self.is_peft else contextlib.nullcontext():
                yield self
        finally:
            self._in_reference = False

    @property
    def _using_copy(self) -> bool:
        return self._in_reference and self._reference_model is not None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def save_adapter(self, path: str | Path) -> None:
        """peft format (`adapter_config.json` + `adapter_model.safetensors`), loadable by
        `PeftModel.from_pretrained`, transformers' `load_adapter` and vLLM's `LoRARequest`."""
        if not self.is_peft:
            raise ValueError("save_adapter needs a LoRA policy; use save_full for full fine-tuning")
        self.model.save_pretrained(str(path), safe_serialization=True)

    def save_full(self, path: str | Path) -> None:
        """All weights with config in safetensors (`from_pretrained` / vLLM format)."""
        if self.is_peft:
            raise ValueError("save_full is for full fine-tuning; a LoRA policy saves its adapter (save_adapter)")
        self.model.save_pretrained(str(path), safe_serialization=True)

    def load_trained_weights(self, path: str | Path) -> None:
        """Load what `save_adapter`/`save_full` wrote into this model in place, so optimizer
        state keyed to these parameters stays valid."""
        from safetensors.torch import load_file

        path = Path(path)
        if self.is_peft:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.model, load_file(path / "adapter_model.safetensors"))
            if result.unexpected_keys:
                raise ValueError(f"adapter in {path} does not fit this model: {result.unexpected_keys[:5]}")
            return
        state = {}
        for file in sorted(path.glob("*.safetensors")):
            state.update(load_file(file))
        current = self.model.state_dict()
        result = self.model.load_state_dict(state, strict=False)
        loaded = {current[name].data_ptr() for name in state if name in current}
        untied_missing = [k for k in result.missing_keys if current[k].data_ptr() not in loaded]
        if result.unexpected_keys or untied_missing:
            raise ValueError(f"weights in {path} do not fit this model: missing {untied_missing[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")


def load_policy(model_name_or_path: str, *, dtype: DType = "auto", lora_r: int = 16, lora_alpha: int = 32,
                lora_dropout: float = 0.0, lora_target_modules: str | list[str] = "all-linear",
                load_in_4bit: bool = False, gradient_checkpointing: bool = True,
                offload_activations: bool = False, reference_copy: ReferenceCopy = "none",
                device: str | torch.device | None = None) -> Policy:
    """Load a causal LM for RL training.

    lora_r=0 is full fine-tuning (every parameter trains; no free reference, see `reference_copy`).
    load_in_4bit is QLoRA: bitsandbytes nf4 base weights with double quantization and bf16
    compute; LoRA weights stay float32 (peft's autocast_adapter_dtype).
    dtype: "auto" takes the checkpoint's dtype; it applies to the non-quantized weights.
    reference_copy: full fine-tuning only; where to keep the frozen reference copy ("none": no
    reference, `Policy.reference()` raises).
    offload_activations: CUDA with checkpointing only; each layer's input waits in pinned host
    memory between forward and backward (unsloth.md T12): frees layers × tokens × hidden × 2 bytes
    of GPU memory (bf16) for one device-to-host copy in forward and one back in backward.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if lora_r < 0:
        raise ValueError(f"lora_r must be >= 0 (0 = full fine-tuning), got {lora_r}")
    if load_in_4bit and lora_r == 0:
        raise ValueError("load_in_4bit (QLoRA) needs lora_r > 0: 4-bit base weights cannot be trained")
    if reference_copy != "none" and lora_r > 0:
        raise ValueError("reference_copy is for full fine-tuning; LoRA's reference is the adapter switched off")
    if offload_activations and (device.type != "cuda" or not gradient_checkpointing):
        raise ValueError("offload_activations needs gradient_checkpointing on a CUDA device")

    kwargs: dict = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype), "device_map": {"": device}}
    if load_in_4bit:
        kwargs["quantization_config"] = _nf4_config(device)
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if tokenizer.pad_token is None:  # batching needs one; EOS is the usual stand-in (TRL does the same)
        tokenizer.pad_token = tokenizer.eos_token

    reference_model = None
    if reference_copy != "none":  # loaded again rather than deep-copied: no transient second copy on the device
        kwargs["device_map"] = {"": "cpu" if reference_copy == "cpu" else device}
        reference_model = AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)
        reference_model.eval().requires_grad_(False)

    if load_in_4bit and device.type == "cpu":
        _disable_cpu_inference_packing(model)
    if gradient_checkpointing:
        non_reentrant = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # newer transformers' name; the old one warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)

    if lora_r == 0:
        return Policy(model, tokenizer, is_peft=False, name_or_path=model_name_or_path,
                      reference_model=reference_model, offload_activations=offload_activations)

    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules if isinstance(lora_target_modules, str) else list(lora_target_modules)
    head_name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    if not isinstance(targets, str) and any(t == head_name or t.endswith("." + head_name) for t in targets):
        raise ValueError(f"LoRA on the LM head ({head_name!r}) is not supported: log-probs read the head's "
                         "weight directly, so an adapter there would be ignored")
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM")
    return Policy(get_peft_model(model, lora), tokenizer, is_peft=True, name_or_path=model_name_or_path,
                  offload_activations=offload_activations)


def _disable_cpu_inference_packing(model: nn.Module) -> None:
    """bitsandbytes (0.49-0.50) repacks a Linear4bit weight in place for an AVX512-BF16 kernel the
    first time it runs on the CPU in eval mode without grad; the packed weight then takes an
    inference-only path in every later call, training included (no gradient to the layer input,
    an in-place bias add that raises under autograd). Scoring runs exactly like that, so the
    repacking is switched off: CPU QLoRA stays on the differentiable dequantize-and-matmul path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _nf4_config(device: torch.device):
    """QLoRA quantization (Dettmers et al. 2023, §3): NF4, double quantization, bf16 compute.

    Probes the installed bitsandbytes on `device` first, so an unsupported combination (old
    bitsandbytes on CPU, say) fails here with a clear message rather than deep inside loading.
    """
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise RuntimeError("load_in_4bit needs bitsandbytes (the torch extra of aha-rl)") from error
    try:
        probe = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=True)
        probe.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
        probe.to(device)(torch.randn(2, 64, dtype=torch.bfloat16, device=device))
    except Exception as error:  # whatever the backend raises, the message below says what to do
        raise RuntimeError(f"load_in_4bit: bitsandbytes {bnb.__version__} cannot run 4-bit nf4 layers on "
                           f"{device.type} ({type(error).__name__}: {error}); install bitsandbytes >= 0.46 "
                           "for CPU support, or train with plain LoRA (load_in_4bit=False)") from error
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)

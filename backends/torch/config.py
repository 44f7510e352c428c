"""TrainConfig: every knob of a training run, with TRL's field names where the meaning is the same.

A run is configured from three layers, later ones winning: the defaults below, a YAML file
(`aha train --config run.yaml`, parsed with `yaml.safe_load`), and command-line flags. Unknown keys
are an error that names the key and suggests the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from aha.algos.mismatch import check_correction

Algo = Literal["grpo", "rloo", "ppo", "online_dpo"]
LOSS_TYPES: dict[str, tuple[str, ...]] = {
    "grpo": ("grpo", "bnpo", "dr_grpo", "dapo", "cispo"), "rloo": (), "ppo": (), "online_dpo": ("sigmoid", "ipo")}
"""The loss_type values each algorithm accepts (None: the algorithm's default)."""


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key."""


@dataclass(frozen=True)
class TrainConfig:
    # --- what to train -------------------------------------------------------------------------
    algo: Algo = "grpo"
    """Algorithm; what differs between them lives in backends/torch/algorithms.py."""
    model: str | None = None
    """Local path or hub id loaded with `from_pretrained`; None builds the embedded demo model."""
    dataset: str | None = None
    """JSONL, CSV, Parquet or a `datasets` folder; None uses the embedded demo task."""
    eval_dataset: str | None = None
    """Held-out rows with answers, scored by greedy decoding before and after training (optional)."""
    eval_samples: int = 200
    """How many held-out rows to evaluate (demo: generated, others: the first rows)."""
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    skip_bad_rows: bool = False
    """Skip and count malformed dataset rows instead of stopping at the first."""
    system_prompt: str | None = None
    chat_template: str = "auto"
    """"auto" (the tokenizer's, else built-in "plain"), "plain" or "chatml"."""

    # --- rewards -------------------------------------------------------------------------------
    reward_funcs: tuple[str, ...] = ("exact_answer", "think_answer_format")
    """Built-in names, `module:function` or `path.py:function` (TRL's signature)."""
    reward_weights: tuple[float, ...] | None = None
    """One weight per reward function; None means all 1.0."""
    reward_timeout: float | None = None
    """Seconds one reward function may take for a generation batch; past it the run stops with an
    error naming the function (None: no limit). The code_execution reward limits each sample itself."""

    # --- rollout (TRL GRPOConfig names) ----------------------------------------------------------
    rollout: Literal["hf", "vllm"] = "hf"
    num_generations: int = 8
    max_prompt_length: int = 256
    truncate_prompts: Literal["left", "error"] = "left"
    """A prompt longer than max_prompt_length: keep its last tokens and count it (metric
    truncated_prompts), or stop with an error naming the dataset row."""
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    mask_truncated_completions: bool = False
    sampling_seed: Literal["step", "prompt"] | None = None
    """"step": one seeded stream per rollout; "prompt": each prompt's completions drawn from a seed of
    (seed, step, the prompt's place in the step's global batch), so samples do not depend on how prompts
    are split across processes or batched (rollout.SamplingParams.prompt_seeds; hf rollout only). None:
    "step" in one process, "prompt" across several (a stream seeded alike on every rank would correlate them)."""

    # --- vLLM rollout (rollout="vllm"; backends/torch/vllm_rollout.py, spec/grpo.md §2.5; TRL names) ---
    vllm_gpu_memory_utilization: float | None = None
    """Fraction of the device's memory vLLM may take (its weights, activations and KV cache). None: computed at
    start from the free memory, less the gradients and AdamW moments training keeps while vLLM is awake and a
    5% headroom (vllm_rollout.gpu_memory_utilization). TRL's default is 0.3."""
    vllm_max_num_seqs: int | None = None
    """Most sequences vLLM decodes at once; None: one rollout's completions (prompts × num_generations)."""
    vllm_enable_sleep_mode: bool = True
    """Sleep after each rollout (level 1: KV cache dropped, weights parked in host memory) and wake before the
    next, so training has the memory in between. TRL's default is False (its colocate mode then shares less)."""
    vllm_importance_sampling_correction: bool = True
    """GRPO with rollout="vllm": weight each token's policy loss by the sampler-to-trainer ratio (spec/grpo.md
    §2.5; scores π_old before the update, one more forward pass). RLOO, PPO and Online DPO ignore it."""
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate",
                                           "sequence_mask"] = "sequence_mask"
    """Token or sequence ratios, truncated (clamped) or masked (zeroed) outside the bounds (spec/grpo.md eq. 12)."""
    vllm_importance_sampling_clip_min: float | None = None
    """C_min of the ratio; None = no lower bound."""
    vllm_importance_sampling_clip_max: float | None = 3.0
    """C_max of the ratio; None = no upper bound (a truncate mode needs at least one bound)."""

    # --- loss (TRL names; meaning in spec/) -------------------------------------------------------
    beta: float | None = None
    """KL coefficient; None takes the algorithm's default: GRPO 0.0, RLOO 0.05, PPO 0.05 (TRL's `kl_coef`,
    the per-token penalty in the reward), Online DPO 0.1 (DPO's β)."""
    epsilon: float = 0.2
    """Lower clip range of the ratio (PPO: TRL's `cliprange`)."""
    epsilon_high: float | None = None
    delta: float | None = None
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sigmoid", "ipo"] | None = None
    """GRPO: aggregation (default "dapo"); Online DPO: "sigmoid" (default) or "ipo"; RLOO and PPO have one loss
    (leave None). None takes the algorithm's default; a value of another algorithm is an error."""
    missing_eos_penalty: float | None = None
    """Subtracted from the combined reward of completions without EOS before advantages or pair selection
    (TRL's Online DPO and PPO field; here for every algorithm; spec/common.md §6). None = off."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    importance_sampling_level: Literal["token", "sequence"] = "token"
    kl_in: Literal["reward", "loss"] = "reward"
    """RLOO only: KL folded into the reward (k1, TRL) or added to the loss (k3) (spec/rloo.md)."""
    num_iterations: int = 1
    """Optimizer steps per generation batch (μ in the GRPO paper; PPO: TRL's `num_ppo_epochs`, each a pass
    over the whole generation batch in `gradient_accumulation_steps` micro-batches, TRL's num_mini_batches=1)."""

    # --- PPO (TRL PPOConfig names; spec/ppo.md) ----------------------------------------------------
    kl_estimator: Literal["k1", "k3"] = "k1"
    """PPO: estimator of the per-token KL penalty in the reward (spec/ppo.md eq. 3)."""
    gamma: float = 1.0
    """PPO: discount of GAE."""
    lam: float = 0.95
    """PPO: λ of GAE."""
    vf_coef: float = 0.1
    """PPO: weight of the value loss."""
    cliprange_value: float = 0.2
    """PPO: clip range of the value predictions around the rollout values."""
    whiten_rewards: bool = False
    """PPO: scale the token rewards before GAE (spec/ppo.md eq. 4)."""
    value_head_trains_backbone: bool = False
    """PPO: let the value loss's gradient into the policy's trainable weights (a shared trunk); False trains
    the value head alone on detached hidden states (backends/torch/value_head.py)."""
    value_head_learning_rate: float | None = None
    """PPO: learning rate of the value head (a zero-initialized linear probe usually wants more than LoRA);
    None = learning_rate. Same schedule."""

    # --- optimisation ---------------------------------------------------------------------------
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float = 1.0
    optim: Literal["adamw", "adamw_8bit"] = "adamw"
    per_device_train_batch_size: int = 8
    """Completions per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; a generation batch holds batch × accumulation completions."""
    max_steps: int = 100
    """Optimizer steps."""
    seed: int = 42
    max_bad_steps: int = 5
    """A step with a non-finite loss or gradient is skipped (no weights change); this many in a row stop the run."""

    # --- model ----------------------------------------------------------------------------------
    lora_r: int = 16
    """LoRA rank; 0 means full fine-tuning."""
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    load_in_4bit: bool = False
    """QLoRA: bitsandbytes nf4 with double quantization and bf16 compute."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    gradient_checkpointing: bool = True

    # --- several processes (torchrun; backends/torch/distributed.py) ------------------------------
    fsdp: bool = False
    """Full fine-tuning (lora_r=0) across processes with weights, gradients and optimizer state sharded by
    FSDP2 (`torch.distributed.fsdp.fully_shard`), for models whose training state does not fit one device.
    False replicates the trainable weights on every process and all-reduces their gradients."""
    ddp_timeout: float = 1800.0
    """Seconds a collective may wait for the other processes (TRL/transformers' name); past it, or as soon
    as a process is seen to have died, the others stop with an error instead of hanging."""

    # --- bookkeeping ----------------------------------------------------------------------------
    output_dir: str = "runs/aha"
    logging_steps: int = 1
    save_steps: int = 0
    """Checkpoint every N optimizer steps (0: only at the end and on Ctrl-C)."""
    save_total_limit: int | None = None
    log_completions_steps: int = 10
    resume: str | None = None
    """A run folder or checkpoint folder to continue from."""

    def __post_init__(self) -> None:
        _check_literals(self)
        positive = ("num_generations", "max_prompt_length", "max_completion_length", "num_iterations",
                    "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "logging_steps",
                    "max_bad_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.reward_timeout is not None and self.reward_timeout <= 0:
            raise ConfigError(f"reward_timeout must be > 0 seconds or None, got {self.reward_timeout}")
        if not 0 < self.temperature < math.inf:
            raise ConfigError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0 (0 = full fine-tuning), got {self.lora_r}")
        if self.load_in_4bit and self.lora_r == 0:
            raise ConfigError("load_in_4bit trains LoRA adapters on a frozen 4-bit base: set lora_r > 0")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit must be >= 1 or None, got {self.save_total_limit}")
        if self.num_generations < 2 and self.algo != "ppo":
            raise ConfigError(f"num_generations must be >= 2 for {self.algo}, got {self.num_generations}")
        if self.loss_type is not None and self.loss_type not in LOSS_TYPES[self.algo]:
            choices = f"one of {list(LOSS_TYPES[self.algo])}" if LOSS_TYPES[self.algo] else "no loss_type (None)"
            raise ConfigError(f"loss_type '{self.loss_type}' does not apply to {self.algo}, which takes {choices}")
        if self.algo == "online_dpo" and self.per_device_train_batch_size % self.num_generations:
            raise ConfigError(f"per_device_train_batch_size = {self.per_device_train_batch_size} must be a multiple "
                              f"of num_generations = {self.num_generations} for online_dpo: a pair's group "
                              "shares a micro-batch")
        if self.generation_batch_size % self.num_generations:
            raise ConfigError(
                f"per_device_train_batch_size × gradient_accumulation_steps = {self.generation_batch_size} "
                f"must be a multiple of num_generations = {self.num_generations}")
        if self.fsdp and (self.lora_r != 0 or self.algo == "ppo"):
            raise ConfigError("fsdp shards full fine-tuning (lora_r=0) of grpo, rloo or online_dpo; LoRA's "
                              "trainable weights are small enough to replicate (fsdp=False), and PPO's value "
                              f"head is not sharded (got lora_r={self.lora_r}, algo={self.algo})")
        if self.ddp_timeout <= 0:
            raise ConfigError(f"ddp_timeout must be > 0 seconds, got {self.ddp_timeout}")
        if self.vllm_gpu_memory_utilization is not None and not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm_gpu_memory_utilization must be in (0, 1] or None, got "
                              f"{self.vllm_gpu_memory_utilization}")
        if self.vllm_max_num_seqs is not None and self.vllm_max_num_seqs < 1:
            raise ConfigError(f"vllm_max_num_seqs must be >= 1 or None, got {self.vllm_max_num_seqs}")
        try:
            check_correction(self.vllm_importance_sampling_mode, self.vllm_importance_sampling_clip_min,
                             self.vllm_importance_sampling_clip_max)
        except ValueError as error:
            raise ConfigError(f"vllm_importance_sampling_{error}") from None
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} entries for "
                              f"{len(self.reward_funcs)} reward_funcs")

    @property
    def generation_batch_size(self) -> int:
        """Completions generated per rollout: one optimizer step's worth (TRL's default)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def prompts_per_step(self) -> int:
        return self.generation_batch_size // self.num_generations

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from plain values (YAML or flags), rejecting unknown keys with a suggestion."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        hints = get_type_hints(cls)
        clean = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"unknown key '{key}' in {source}{hint}")
            clean[name] = _coerce(name, value, hints[name])
        return cls(**clean)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        return cls.from_dict({**cls.read_yaml(path), **(overrides or {})}, source=str(path))

    @staticmethod
    def read_yaml(path: str | Path) -> dict[str, Any]:
        """The mapping in a YAML file (safe loader: no Python objects from files)."""
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        return values

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _check_literals(config: TrainConfig) -> None:
    for name, hint in get_type_hints(type(config)).items():
        allowed = _literal_values(hint)
        value = getattr(config, name)
        if allowed and value not in allowed and value is not None:
            raise ConfigError(f"{name} must be one of {sorted(map(str, allowed))}, got {value!r}")


def _literal_values(hint: Any) -> tuple:
    if get_origin(hint) is Literal:
        return get_args(hint)
    for arg in get_args(hint):
        if get_origin(arg) is Literal:
            return get_args(arg)
    return ()


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """A YAML value or a command-line string, converted by the field's type; errors name the field.

    "none"/"null" is None where the field allows it; tuples convert item by item; integers reject
    non-integral numbers (a 4.0 is 4, a 2.5 is an error)."""
    members = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) in (Union, UnionType) else [hint]
    optional = get_origin(hint) in (Union, UnionType) and type(None) in get_args(hint)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional or value is None:
            return None
    base = members[0]
    if get_origin(base) is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(name, item, get_args(base)[0]) for item in items)
    if get_origin(base) is Literal:
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return text in ("true", "1", "yes", "on")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if base is int:
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not number.is_integer():
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(number)
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{name} must be a number, got {value!r}") from error
    if base is str:
        return str(value)
    return value

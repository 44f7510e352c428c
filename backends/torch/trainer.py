"""One training loop for every algorithm (the adapter in algorithms.py holds what differs).

One optimizer step (TRL's semantics, spec/common.md "Batching"):
    every `num_iterations` steps: sample prompts -> rollout G each -> rewards -> advantages
                                  -> old / reference log-probs when the algorithm needs them
    then: shuffle the generation batch, split it into `gradient_accumulation_steps` micro-batches,
          hidden states -> fused log-probs -> aha.algos loss -> backward; clip; optimizer step.
The model is never asked for logits: log-probs come from the decoder's last hidden states and
the LM-head weight through the fused chunked operation (backends/torch/logprobs.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .algorithms import make_algorithm
from .batch import RolloutBatch, collate_rollout
from .chat import render_prompt
from .config import TrainConfig
from .data import PromptDataset, load_prompt_dataset
from .logprobs import token_logprobs
from .models import load_policy
from .rewards import compute_rewards, load_reward_function, reward_names
from .rollout import HFRolloutEngine, SamplingParams
from .tracking import MetricsLogger, StepTimer, peak_memory_gib, plot_run


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient; the message names the step and micro-batch."""


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        _seed_everything(config.seed)
        self.run_dir = Path(config.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        model_path, self.dataset, self.eval_rows = _resolve_task(config)
        self.policy = load_policy(model_path, dtype=config.dtype, lora_r=config.lora_r,
                                  lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                  lora_target_modules=_targets(config.lora_target_modules),
                                  load_in_4bit=config.load_in_4bit,
                                  gradient_checkpointing=config.gradient_checkpointing)
        self.tokenizer = self.policy.tokenizer
        self.reward_fns = [load_reward_function(spec) for spec in config.reward_funcs]
        self.reward_names = reward_names(self.reward_fns)
        self.algorithm = make_algorithm(config, len(self.reward_fns), hidden_size=self.policy.lm_head_weight.shape[1],
                                        device=self.policy.device)
        self.engine = _make_engine(config, self.policy, self.tokenizer)
        self.sampling = SamplingParams(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                                       min_p=config.min_p, max_tokens=config.max_completion_length,
                                       seed=config.seed)
        # The policy's trainable weights and the adapter's extra modules (PPO's value head) train together.
        extra_groups = self.algorithm.param_groups()
        self.trainable = [*self.policy.trainable_parameters(), *(p for group in extra_groups for p in group["params"])]
        self.optimizer = _make_optimizer(config, [{"params": self.policy.trainable_parameters()}, *extra_groups])
        self.scheduler = _make_scheduler(config, self.optimizer)
        self.logger = MetricsLogger(self.run_dir, logging_steps=config.logging_steps, total_steps=config.max_steps)
        self.step = 0
        self.batch: RolloutBatch | None = None
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self._stop_requested = False
        if config.resume:
            self._resume(config.resume)

    # --- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        config = self.config
        (self.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        before = self.evaluate() if self.eval_rows and self.step == 0 else None
        previous = signal.signal(signal.SIGINT, self._request_stop)
        try:
            while self.step < config.max_steps and not self._stop_requested:
                metrics = self.train_step()
                self.step += 1
                self.logger.log(self.step, metrics)
                if config.save_steps and self.step % config.save_steps == 0:
                    self.save()
        finally:
            signal.signal(signal.SIGINT, previous)
        self.save()
        self.logger.close()
        plot = plot_run(self.run_dir)
        summary = {"steps": self.step, "plot": str(plot)}
        if self.eval_rows:
            after = self.evaluate()
            summary.update({"accuracy_after": after})
            if before is not None:
                summary["accuracy_before"] = before
                print(f"held-out accuracy: {100 * before:.1f}% -> {100 * after:.1f}%")
            else:
                print(f"held-out accuracy: {100 * after:.1f}%")
        print(f"curves: {plot}")
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def train_step(self) -> dict[str, float]:
        config = self.config
        timer = StepTimer()
        metrics: dict[str, float] = {}
        if self.batch is None or self.step % config.num_iterations == 0:
            with timer("rollout"):
                self.batch, rollout_metrics = self._rollout()
            with timer("score"):
                rollout_metrics.update(self._score(self.batch))
                rollout_metrics.update(self.algorithm.prepare(self.batch, self.batch.extras["rewards_per_func"]))
            self._rollout_metrics = rollout_metrics
        metrics.update(self._rollout_metrics)
        with timer("update"):
            metrics.update(self._update(self.batch))
        metrics.update(timer.metrics())
        metrics["learning_rate"] = self.scheduler.get_last_lr()[0]
        metrics["peak_memory_gib"] = peak_memory_gib()
        rollout_time, update_time = timer.seconds("rollout"), timer.seconds("update")
        tokens = float(self.batch.mask.sum().item())
        if rollout_time:
            metrics["tokens_per_s/rollout"] = float(self.batch.completion_lengths.sum()) / rollout_time
        metrics["tokens_per_s/train"] = tokens / max(update_time, 1e-9)
        return metrics

    # --- phases -----------------------------------------------------------------------------------
    def _rollout(self) -> tuple[RolloutBatch, dict[str, float]]:
        config = self.config
        rows = self.dataset.next_batch(config.prompts_per_step)
        texts = [render_prompt(self.tokenizer, row["prompt"], system_prompt=config.system_prompt,
                               chat_template=config.chat_template) for row in rows]
        prompt_ids = [self._encode_prompt(text) for text in texts]
        # A seed per step: different samples every step, the same ones after a resume.
        sampling = dataclasses.replace(self.sampling, seed=config.seed * 1_000_003 + self.step)
        rollout = self.engine.generate(prompt_ids, config.num_generations, sampling)
        batch = collate_rollout(rollout.prompt_ids, rollout.completion_ids, rollout.is_truncated,
                                pad_token_id=self.tokenizer.pad_token_id,
                                mask_truncated_completions=config.mask_truncated_completions)
        expanded_rows = [row for row in rows for _ in range(config.num_generations)]
        prompts = [text for text in texts for _ in range(config.num_generations)]
        rewards = compute_rewards(self.reward_fns, config.reward_weights, prompts, rollout.texts, expanded_rows,
                                  completion_ids=rollout.completion_ids)
        rewards_t = torch.as_tensor(rewards, dtype=torch.float64)
        metrics = {f"reward/{name}": float(np.nanmean(rewards[:, k])) if np.isfinite(rewards[:, k]).any()
                   else float("nan") for k, name in enumerate(self.reward_names)}
        lengths = batch.completion_lengths.float()
        metrics.update({"completion_length/mean": lengths.mean().item(),
                        "completion_length/min": lengths.min().item(),
                        "completion_length/max": lengths.max().item(),
                        "frac_truncated": batch.truncated.float().mean().item()})
        batch.extras["rewards_per_func"] = rewards_t
        if config.log_completions_steps and self.step % config.log_completions_steps == 0:
            self.logger.log_samples(self.step, prompts, rollout.texts, rewards_t.nansum(1).tolist())
        return batch, metrics

    def _encode_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.config.max_prompt_length:
            ids = ids[-self.config.max_prompt_length:]  # keep the end, where the question is (TRL)
        return ids

    @torch.no_grad()
    def _score(self, batch: RolloutBatch) -> dict[str, float]:
        """Log-probs of the sampling policy (when updates go off-policy) and of the reference."""
        metrics: dict[str, float] = {}
        if self.algorithm.needs_old_logp:
            batch.extras["old_logp"] = self._logprobs(batch, reference=False)
        if self.algorithm.needs_ref_logp:
            batch.extras["ref_logp"] = self._logprobs(batch, reference=True)
        return metrics

    def _logprobs(self, batch: RolloutBatch, *, reference: bool) -> torch.Tensor:
        """Log-probs [B, T] at the algorithm's temperature; the policy pass also stores what the algorithm
        reads off the same hidden states (`Algorithm.score`) in batch.extras."""
        out, scored = [], []
        size = self.config.per_device_train_batch_size
        for start in range(0, len(batch), size):
            part = batch.select(torch.arange(start, min(start + size, len(batch))))
            with self.policy.reference() if reference else nullcontext():
                hidden = self._hidden(part)
            if not reference:
                scored.append({name: value.cpu() for name, value in self.algorithm.score(hidden, part).items()})
            weight, bias = self.policy.lm_head_weight, self.policy.lm_head_bias
            logp = token_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight,
                                  part.completion_ids.reshape(-1).to(hidden.device), bias=bias,
                                  temperature=self.algorithm.temperature)
            out.append(logp.view(part.completion_ids.shape).cpu())
        for name in scored[0] if scored else ():
            batch.extras[name] = torch.cat([part[name] for part in scored])
        return torch.cat(out)

    def _hidden(self, batch: RolloutBatch) -> torch.Tensor:
        device = self.policy.device
        return self.policy.hidden_states(batch.input_ids.to(device), batch.attention_mask.to(device),
                                         batch.completion_width, position_ids=batch.position_ids.to(device))

    def _update(self, batch: RolloutBatch) -> dict[str, float]:
        config = self.config
        accumulation = config.gradient_accumulation_steps
        order = _shuffle_in_units(len(batch), self.algorithm.micro_batch_unit, self.shuffle)
        micro = len(batch) // accumulation
        num_items = int(batch.mask.sum().item())
        sums: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        self.policy.model.train()
        for index in range(accumulation):
            part = batch.select(order[index * micro:(index + 1) * micro]).to(self.policy.device)
            hidden = self._hidden(part)
            loss, metrics = self.algorithm.loss(hidden, self.policy.lm_head_weight, self.policy.lm_head_bias,
                                                part, num_items_in_batch=num_items,
                                                gradient_accumulation_steps=accumulation)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"non-finite loss {loss.item()} at step {self.step + 1}, "
                                         f"micro-batch {index + 1}/{accumulation}")
            loss.backward()
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value) / accumulation
        params = [p for p in self.trainable if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise NonFiniteLossError(f"non-finite gradient norm at step {self.step + 1}")
        self.optimizer.step()
        self.scheduler.step()
        sums["grad_norm"] = grad_norm.item()
        return sums

    # --- evaluation, checkpoints ------------------------------------------------------------------
    def evaluate(self) -> float:
        """Greedy accuracy on the held-out rows (exact answer match)."""
        from .demo.evaluate import evaluate_accuracy

        return evaluate_accuracy(self.policy.generation_model, self.tokenizer, self.eval_rows,
                                 max_new_tokens=self.config.max_completion_length,
                                 system_prompt=self.config.system_prompt, chat_template=self.config.chat_template)

    def save(self) -> Path:
        state = {"step": self.step, "data": self.dataset.state_dict(),
                 "shuffle_rng": self.shuffle.get_state().tolist(), "config": self.config.to_dict()}
        return ckpt.save_checkpoint(self.run_dir, self.step, policy=self.policy, optimizer=self.optimizer,
                                    extra_modules=self.algorithm.modules,
                                    scheduler=self.scheduler, trainer_state=state,
                                    save_total_limit=self.config.save_total_limit)

    def _resume(self, where: str) -> None:
        path = Path(where)
        found = ckpt.latest_checkpoint(path) if not (path / "trainer_state.json").exists() else path
        if found is None:
            raise FileNotFoundError(f"--resume {where}: no checkpoint-* folder found there")
        state = ckpt.load_checkpoint(found, policy=self.policy, optimizer=self.optimizer, scheduler=self.scheduler,
                                     extra_modules=self.algorithm.modules)
        self.step = state["step"]
        self.dataset.load_state_dict(state["data"])
        self.shuffle.set_state(torch.tensor(state["shuffle_rng"], dtype=torch.uint8))

    def _request_stop(self, signum, frame) -> None:
        print("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to abort)")
        self._stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _resolve_task(config: TrainConfig):
    """Model path, training dataset and held-out rows; the embedded demo fills what is not given."""
    from . import demo

    model_path = config.model or str(demo.build_demo_model())
    if config.dataset:
        dataset = load_prompt_dataset(config.dataset, prompt_field=config.prompt_field,
                                      answer_field=config.answer_field, skip_bad_rows=config.skip_bad_rows,
                                      seed=config.seed)
    else:
        dataset = PromptDataset(demo.demo_dataset("train", demo.TRAIN_ROWS, seed=config.seed), source="demo",
                                seed=config.seed)
    if config.eval_dataset:
        eval_rows = load_prompt_dataset(config.eval_dataset, prompt_field=config.prompt_field,
                                        answer_field=config.answer_field).rows[:config.eval_samples]
    elif not config.dataset:
        eval_rows = demo.demo_dataset("test", config.eval_samples, seed=config.seed)
    else:
        eval_rows = []
    return model_path, dataset, eval_rows


def _make_engine(config: TrainConfig, policy, tokenizer):
    if config.rollout == "vllm":
        from .vllm_rollout import VLLMRolloutEngine
        return VLLMRolloutEngine.from_policy(policy, tokenizer, config)
    return HFRolloutEngine(policy.generation_model, tokenizer)


def _shuffle_in_units(rows: int, unit: int, generator: torch.Generator) -> torch.Tensor:
    """A random order of `rows` rows that keeps blocks of `unit` contiguous rows together and in order
    (unit 1 is exactly `torch.randperm(rows)`)."""
    blocks = torch.randperm(rows // unit, generator=generator)
    return (blocks[:, None] * unit + torch.arange(unit)).flatten()


def _make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    params = list(params)
    if config.optim == "adamw_8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def _make_scheduler(config: TrainConfig, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total = config.warmup_steps, config.max_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if config.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        if config.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _targets(modules: tuple[str, ...]) -> str | list[str]:
    return "all-linear" if tuple(modules) == ("all-linear",) else list(modules)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

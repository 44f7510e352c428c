"""One training loop for every algorithm (the adapter in algorithms.py holds what differs; setup.py
builds what the loop starts from).

One optimizer step (TRL's semantics, spec/common.md "Batching"):
    every `num_iterations` steps: sample prompts -> rollout G each -> rewards -> advantages
                                  -> old / reference log-probs when the algorithm needs them
    then: shuffle the generation batch, split it into `gradient_accumulation_steps` micro-batches,
          hidden states -> fused log-probs -> aha.algos loss -> backward; clip; optimizer step.
The model is never asked for logits: log-probs come from the decoder's last hidden states and
the LM-head weight through the fused chunked operation (backends/torch/logprobs.py).

Faults (docs/failure_behaviour.md lists each with its test): a non-finite loss or gradient skips the
optimizer step and `max_bad_steps` in a row stop the run; out of memory retries the phase with half
as many sequences per pass; SIGINT/SIGTERM finish the step, save and return.

Several processes (torchrun): each rank rolls out its share of the step's prompts and the gradients are
averaged; distributed.py says how the step stays the single-process step on the union.

Over 500 lines on purpose: the step, its fault handling (skip, OOM retry, signals) and the
distributed hooks share the step's state; split apart they would pass that state around.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import signal
import threading
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed, setup, sharding
from .algorithms import make_algorithm
from .batch import RolloutBatch, collate_rollout, pad_rows, shuffle_in_units
from .chat import render_prompt
from .config import TrainConfig
from .data import DatasetError
from .logprobs import token_logprobs
from .models import load_policy
from .rewards import ReportsMetrics, compute_rewards, load_reward_function, reward_names
from .rollout import HFRolloutEngine, SamplingParams
from .tracking import MetricsLogger, StepTimer, peak_memory_gib, plot_run


class NonFiniteLossError(RuntimeError):
    """`max_bad_steps` optimizer steps in a row had a non-finite loss or gradient; the message names
    the last step and micro-batch."""


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        setup.seed_everything(config.seed)
        self.run_dir = Path(config.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        model_path, self.dataset, self.eval_rows = setup.resolve_task(config)
        if self.dataset.skipped_rows:
            label, reason = self.dataset.skipped_rows[0]
            warnings.warn(f"{self.dataset.source}: skipped {len(self.dataset.skipped_rows)} malformed rows "
                          f"(skip_bad_rows); the first, {label}: {reason}", RuntimeWarning, stacklevel=2)
        distributed.init_from_env(timeout=config.ddp_timeout)
        self.policy = load_policy(model_path, dtype=config.dtype, lora_r=config.lora_r,
                                  lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                  lora_target_modules=setup.lora_targets(config.lora_target_modules),
                                  load_in_4bit=config.load_in_4bit,
                                  gradient_checkpointing=config.gradient_checkpointing,
                                  reference_copy=setup.reference_copy(config), device=distributed.device())
        if config.fsdp and distributed.world_size() > 1:
            sharding.shard_policy(self.policy, needs_reference=setup.reference_copy(config) != "none")
        self.tokenizer = self.policy.tokenizer
        self.reward_fns = [load_reward_function(spec) for spec in config.reward_funcs]
        self.reward_names = reward_names(self.reward_fns)
        self.algorithm = make_algorithm(config, len(self.reward_fns), hidden_size=self.policy.lm_head_weight.shape[1],
                                        device=self.policy.device)
        self.engine = setup.make_engine(config, self.policy, self.tokenizer)
        self.sampling = SamplingParams(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                                       min_p=config.min_p, max_tokens=config.max_completion_length,
                                       seed=config.seed)
        # The policy's trainable weights and the adapter's extra modules (PPO's value head) train together.
        extra_groups = self.algorithm.param_groups()
        self.trainable = [*self.policy.trainable_parameters(), *(p for group in extra_groups for p in group["params"])]
        if self.policy.sharded is None:  # replicated weights start alike on every process
            distributed.broadcast_parameters(self.trainable)
        self.optimizer = setup.make_optimizer(config, [{"params": self.policy.trainable_parameters()}, *extra_groups])
        self.scheduler = setup.make_scheduler(config, self.optimizer)
        self.logger = (MetricsLogger(self.run_dir, logging_steps=config.logging_steps, total_steps=config.max_steps)
                       if distributed.is_main() else distributed.NullLogger())
        self._global_prompts_per_step = config.prompts_per_step * distributed.world_size()
        self._seed_per_prompt = config.sampling_seed == "prompt" or (config.sampling_seed is None
                                                                      and distributed.world_size() > 1)
        self.step = 0
        self.batch: RolloutBatch | None = None
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self._stop_requested = False
        self.skipped_steps = 0
        """Optimizer steps skipped for a non-finite loss or gradient, over the whole run (metric skipped_steps)."""
        self._bad_in_a_row = 0
        self._oom_retries = 0
        if config.resume:
            self._resume(config.resume)

    # --- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        config = self.config
        if distributed.is_main():
            (self.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        before = self.evaluate() if self.eval_rows and self.step == 0 else None
        # Signal handlers can only be installed from the main thread; elsewhere the caller handles signals.
        handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
        previous = {signum: signal.signal(signum, self._request_stop) for signum in handled}
        try:
            # Checkpoints and stops fall on generation-cycle boundaries (step % num_iterations == 0): the
            # generation batch is not saved, so a resume mid-cycle could not continue it exactly.
            save_due = False
            while self.step < config.max_steps:
                at_boundary = self.step % config.num_iterations == 0
                if at_boundary and distributed.any_rank(self._stop_requested):
                    break
                metrics = distributed.combine_metrics(self.train_step())
                self.step += 1
                self.logger.log(self.step, metrics)
                save_due |= bool(config.save_steps) and self.step % config.save_steps == 0
                if save_due and self.step % config.num_iterations == 0:
                    self.save()
                    save_due = False
            self.save()  # still under the handlers: a signal now only asks for what is already happening
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self.logger.close()
        plot = plot_run(self.run_dir) if distributed.is_main() else self.run_dir / "curves.png"
        summary = {"steps": self.step, "plot": str(plot)}
        if self.step < config.max_steps:  # stopped by a signal: the checkpoint matters, not the evaluation
            summary["stopped_early"] = True
            _announce(f"stopped at step {self.step} of {config.max_steps}; continue with --resume {self.run_dir}")
        elif self.eval_rows:
            after = self.evaluate()
            summary.update({"accuracy_after": after})
            if before is not None:
                summary["accuracy_before"] = before
                _announce(f"held-out accuracy: {100 * before:.1f}% -> {100 * after:.1f}%")
            else:
                _announce(f"held-out accuracy: {100 * after:.1f}%")
        _announce(f"curves: {plot}")
        if distributed.is_main():
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def train_step(self) -> dict[str, float]:
        config = self.config
        timer = StepTimer()
        metrics: dict[str, float] = {}
        self._oom_retries = 0
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
        metrics["oom_retries"] = float(self._oom_retries)
        metrics["skipped_steps"] = float(self.skipped_steps)
        rollout_time, update_time = timer.seconds("rollout"), timer.seconds("update")
        tokens = float(self.batch.mask.sum().item())
        if rollout_time:
            metrics["tokens_per_s/rollout"] = float(self.batch.completion_lengths.sum()) / rollout_time
        metrics["tokens_per_s/train"] = tokens / max(update_time, 1e-9)
        return metrics

    # --- phases -----------------------------------------------------------------------------------
    def _rollout(self) -> tuple[RolloutBatch, dict[str, float]]:
        config = self.config
        # Every process draws the step's global prompt list and keeps its share (whole groups).
        rows, prompt_indices = distributed.shard_prompts(self.dataset.next_batch(self._global_prompts_per_step))
        texts = [render_prompt(self.tokenizer, row["prompt"], system_prompt=config.system_prompt,
                               chat_template=config.chat_template) for row in rows]
        prompt_ids, truncated_prompts = self._encode_prompts(texts, rows)
        # A seed per step: different samples every step, the same ones after a resume.
        step_seed = (config.seed + distributed.rank()) * 1_000_003 + self.step
        sampling = dataclasses.replace(self.sampling, seed=step_seed)
        if self._seed_per_prompt:  # (seed, step, place in the global list): the same samples on any number of processes
            sampling = dataclasses.replace(sampling, prompt_seeds=tuple(
                (config.seed * 1_000_003 + self.step) * 1_000_003 + index for index in prompt_indices))
        rollout = self._generate(prompt_ids, sampling)
        batch = collate_rollout(rollout.prompt_ids, rollout.completion_ids, rollout.is_truncated,
                                pad_token_id=self.engine.pad_token_id,
                                mask_truncated_completions=config.mask_truncated_completions)
        if self.algorithm.corrects_mismatch:  # spec/grpo.md §2.5
            batch.extras["sampler_logp"] = pad_rows(rollout.sampler_logp, batch.completion_width)
        expanded_rows = [row for row in rows for _ in range(config.num_generations)]
        # Reward functions get the dataset's prompt as is (text or chat messages), as in TRL.
        prompts = [row["prompt"] for row in expanded_rows]
        rewards = compute_rewards(self.reward_fns, config.reward_weights, prompts, rollout.texts, expanded_rows,
                                  timeout=config.reward_timeout, completion_ids=rollout.completion_ids)
        rewards_t = torch.as_tensor(rewards, dtype=torch.float64)
        metrics = {f"reward/{name}": float(np.nanmean(rewards[:, k])) if np.isfinite(rewards[:, k]).any()
                   else float("nan") for k, name in enumerate(self.reward_names)}
        for k, (fn, name) in enumerate(zip(self.reward_fns, self.reward_names)):
            metrics[f"reward/{name}/unscorable"] = float(np.isnan(rewards[:, k]).sum())  # None, NaN or ±inf
            if isinstance(fn, ReportsMetrics):
                metrics.update({f"reward/{name}/{key}": value for key, value in fn.pop_metrics().items()})
        metrics["truncated_prompts"] = float(truncated_prompts)
        lengths = batch.completion_lengths.float()
        metrics.update({"completion_length/mean": lengths.mean().item(),
                        "completion_length/min": lengths.min().item(),
                        "completion_length/max": lengths.max().item(),
                        "frac_truncated": batch.truncated.float().mean().item()})
        batch.extras["rewards_per_func"] = rewards_t
        if config.log_completions_steps and self.step % config.log_completions_steps == 0:
            rendered = [text for text in texts for _ in range(config.num_generations)]
            self.logger.log_samples(self.step, rendered, rollout.texts, rewards_t.nansum(1).tolist())
        return batch, metrics

    def _encode_prompts(self, texts: list[str], rows: list[dict]) -> tuple[list[list[int]], int]:
        """Token ids of each rendered prompt, and how many were longer than max_prompt_length: cut from
        the left, keeping the end where the question is (TRL), or an error naming the row."""
        limit = self.config.max_prompt_length
        encoded = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        too_long = [i for i, ids in enumerate(encoded) if len(ids) > limit]
        if too_long and self.config.truncate_prompts == "error":
            i = too_long[0]
            index = next(n for n, row in enumerate(self.dataset.rows) if row is rows[i])
            raise DatasetError(f"{self.dataset.source}, row index {index} (prompt {texts[i][:60]!r}...): "
                               f"{len(encoded[i])} tokens after the chat template, more than max_prompt_length="
                               f"{limit}; raise max_prompt_length, shorten or drop the row, or set "
                               "truncate_prompts='left' to keep its last tokens")
        return [ids[-limit:] for ids in encoded], len(too_long)

    def _generate(self, prompt_ids: list[list[int]], sampling: SamplingParams):
        """The rollout; out of memory makes the hf engine retry with half as many sequences per
        `generate` call (kept for the rest of the run)."""
        n = self.config.num_generations
        if not isinstance(self.engine, HFRolloutEngine):
            return self.engine.generate(prompt_ids, n, sampling)

        def attempt(size: int):
            self.engine.max_batch_size = size
            return self.engine.generate(prompt_ids, n, sampling)

        return self._halving_on_oom("rollout", self.engine.max_batch_size or len(prompt_ids) * n, attempt,
                                    unit="sequences per generate call")

    @torch.no_grad()
    def _score(self, batch: RolloutBatch) -> dict[str, float]:
        """Log-probs of the sampling policy (when updates go off-policy) and of the reference, in eval
        mode (no dropout), as the sampler saw the policy; the training mode is restored after."""
        metrics: dict[str, float] = {}
        size = self.config.per_device_train_batch_size
        training = self.policy.model.training
        self.policy.model.eval()
        try:
            self._score_into(batch, size)
        finally:
            self.policy.model.train(training)
        return metrics

    def _score_into(self, batch: RolloutBatch, size: int) -> None:
        if self.algorithm.needs_old_logp:
            batch.extras["old_logp"] = self._halving_on_oom(
                "scoring", size, lambda rows: self._logprobs(batch, reference=False, size=rows),
                unit="completions per pass")
        if self.algorithm.needs_ref_logp:
            batch.extras["ref_logp"] = self._halving_on_oom(
                "scoring", size, lambda rows: self._logprobs(batch, reference=True, size=rows),
                unit="completions per pass")

    def _logprobs(self, batch: RolloutBatch, *, reference: bool, size: int) -> torch.Tensor:
        """Log-probs [B, T] at the algorithm's temperature; the policy pass also stores what the algorithm
        reads off the same hidden states (`Algorithm.score`) in batch.extras."""
        out, scored = [], []
        for start in range(0, len(batch), size):
            part = batch.select(torch.arange(start, min(start + size, len(batch))))
            with self.policy.reference() if reference else nullcontext():
                hidden = self._hidden(part)
                # Inside the block: under full fine-tuning the reference has its own (frozen) LM head.
                weight, bias = self.policy.lm_head_weight, self.policy.lm_head_bias
            if not reference:
                scored.append({name: value.cpu() for name, value in self.algorithm.score(hidden, part).items()})
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
        """One optimizer step on `batch`, recovering from two faults:

        Out of memory: the step starts over (gradients zeroed, dropout's random numbers replayed) with
        the decoder run on half as many rows per pass, then a quarter, ... (`_backward_micro_batch`:
        the loss still sees each micro-batch whole, so the step is the same up to float rounding).
        Non-finite loss or gradient: the step is skipped (the remaining micro-batches are not run,
        gradients are zeroed, no optimizer step: no weight or optimizer moment changes) and counted;
        `max_bad_steps` in a row stop the run. A skipped step still counts as a step: its rollout is
        spent, and `self.step` and the learning-rate schedule advance, so the schedule stays a
        function of the step number (as after a resume).
        """
        config = self.config
        order = shuffle_in_units(len(batch), self.algorithm.micro_batch_unit, self.shuffle)
        random_state = _rng_states()

        # N of dapo/cispo: the active tokens of the whole step, on every process (spec/common.md eq. 6).
        num_items = int(distributed.sum_over_ranks(batch.mask.sum().item()))

        def attempt(rows_per_pass: int) -> tuple[dict[str, float], str | None]:
            _set_rng_states(random_state)
            return self._accumulate(batch, order, rows_per_pass, num_items)

        sums, fault = self._halving_on_oom("update", len(batch) // config.gradient_accumulation_steps, attempt,
                                           unit="completions per decoder pass")
        if distributed.any_rank(fault is not None) and fault is None:  # every process skips the step, or none
            fault = "a non-finite loss or gradient on another process"
        if fault is None:
            distributed.average_gradients(self.trainable)  # replicated weights; FSDP reduced its shards in backward
            params = [p for p in self.trainable if p.grad is not None]
            sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm).item()
            if not math.isfinite(sums["grad_norm"]):
                fault = "a gradient norm that overflowed"
        if fault is None:
            self.optimizer.step()
            self.engine.sync_weights(self.policy.generation_model)  # vLLM keeps its own copy of the weights
            self._bad_in_a_row = 0
        else:
            sums = {"loss": sums["loss"], "grad_norm": float("nan")}
            self._skip_step(fault)
        with warnings.catch_warnings():  # a skipped first step calls the scheduler before any optimizer step
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        return sums

    def _accumulate(self, batch: RolloutBatch, order: torch.Tensor, rows_per_pass: int,
                    num_items: int) -> tuple[dict[str, float], str | None]:
        """Gradients of every micro-batch summed into .grad; the summed metrics, and where a loss or
        gradient first turned non-finite (None if none did; the micro-batches after it are not run)."""
        accumulation = self.config.gradient_accumulation_steps
        micro = len(batch) // accumulation
        sums: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        self.policy.model.train()
        for index in range(accumulation):
            part = batch.select(order[index * micro:(index + 1) * micro]).to(self.policy.device)
            loss, metrics = self._backward_micro_batch(part, rows_per_pass, num_items_in_batch=num_items,
                                                       gradient_accumulation_steps=accumulation)
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value) / accumulation
            where = f"micro-batch {index + 1}/{accumulation}"
            if not self._agreed(finite_loss := math.isfinite(sums["loss"])):
                return sums, (f"a non-finite loss ({loss.item()}) in {where}" if not finite_loss
                              else f"a non-finite loss in {where} of another process")
            if not self._agreed(finite_gradient := _gradients_finite(self.trainable)):
                return sums, f"a non-finite gradient in {where}" + (" of another process" if finite_gradient else "")
        return sums, None

    def _backward_micro_batch(self, part: RolloutBatch, rows_per_pass: int,
                              **loss_kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and metrics of one micro-batch, back-propagated into .grad unless the loss is non-finite.

        With fewer rows per pass than the micro-batch has (after running out of memory), the decoder
        runs on slices of rows: first without autograd, to give the loss the whole micro-batch's hidden
        states (a leaf), then slice by slice with autograd, each slice back-propagating its rows of
        d loss / d hidden. The loss is the same function of the same hidden states, so the gradient
        equals the one-pass gradient up to float rounding for every algorithm (no per-loss rescaling
        of the pieces), for one more decoder forward. Dropout draws are replayed per slice.
        """
        if rows_per_pass >= len(part):
            hidden = self._hidden(part)  # before reading the head: sharded, the pass gathers it (sharding.py)
            loss, metrics = self.algorithm.loss(hidden, self.policy.lm_head_weight, self.policy.lm_head_bias, part,
                                                **loss_kwargs)
            if self._agreed(bool(torch.isfinite(loss))):
                loss.backward()
            return loss, metrics
        weight, bias = self.policy.lm_head_weight, self.policy.lm_head_bias
        slices = [(start, min(start + rows_per_pass, len(part))) for start in range(0, len(part), rows_per_pass)]
        states, pieces = [], []
        with torch.no_grad():
            for start, stop in slices:
                states.append(_rng_states())
                pieces.append(self._hidden(part.select(torch.arange(start, stop))))
        hidden = torch.cat(pieces).requires_grad_()
        del pieces
        loss, metrics = self.algorithm.loss(hidden, weight, bias, part, **loss_kwargs)
        if not torch.isfinite(loss):
            return loss, metrics
        loss.backward()
        for (start, stop), state in zip(slices, states):
            _set_rng_states(state)
            self._hidden(part.select(torch.arange(start, stop))).backward(hidden.grad[start:stop])
        return loss, metrics

    def _agreed(self, ok: bool) -> bool:
        """Whether a loss or gradient is finite. Sharded weights: every process must run the same passes,
        so all decide together, at once; replicated, each decides alone and `_update` agrees once per step."""
        return ok if self.policy.sharded is None else not distributed.any_rank(not ok)

    def _skip_step(self, fault: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self._bad_in_a_row += 1
        step, limit = self.step + 1, self.config.max_bad_steps
        message = (f"step {step}: {fault}; optimizer step skipped (no weights changed), "
                   f"{self._bad_in_a_row} in a row (max_bad_steps={limit})")
        if self._bad_in_a_row >= limit:
            raise NonFiniteLossError(
                f"{message}: stopping. The weights are unchanged since step {step - self._bad_in_a_row}; "
                f"checkpoints are in {self.run_dir}. Lower learning_rate or max_grad_norm, check the reward "
                "functions and the data, train in float32 or bfloat16 rather than float16, or raise max_bad_steps")
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _halving_on_oom(self, phase: str, size: int, attempt, *, unit: str):
        """attempt(size); after an out-of-memory error, free what it held and attempt(size // 2), down to
        1, then fail with advice. Each retry is counted (metric oom_retries) and announced."""
        while True:
            try:
                return attempt(size)
            except torch.OutOfMemoryError as error:
                if self.policy.sharded is not None:  # the other processes wait inside FSDP's collectives: no retry
                    raise
                reason = (str(error).splitlines() or ["out of memory"])[0]
            # Outside the except block, so the traceback and the tensors its frames held are released.
            self.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if size <= 1:
                raise torch.OutOfMemoryError(
                    f"out of memory in the {phase} at step {self.step + 1} even with 1 {unit} ({reason}). "
                    "Lower per_device_train_batch_size, max_prompt_length or max_completion_length, or use LoRA (lora_r > 0), load_in_4bit and "
                    "gradient_checkpointing")
            size //= 2
            self._oom_retries += 1
            warnings.warn(f"step {self.step + 1}: out of memory in the {phase} ({reason}); retrying with {size} "
                          f"{unit}", RuntimeWarning, stacklevel=3)

    # --- evaluation, checkpoints ------------------------------------------------------------------
    def evaluate(self) -> float:
        """Greedy accuracy on the held-out rows (exact answer match)."""
        from .demo.evaluate import evaluate_accuracy

        return evaluate_accuracy(self.policy.generation_model, self.tokenizer, self.eval_rows,
                                 max_new_tokens=self.config.max_completion_length,
                                 system_prompt=self.config.system_prompt, chat_template=self.config.chat_template)

    def save(self) -> Path:
        """Rank 0 writes the checkpoint (sharded weights gathered to it first, by every process); the data
        cursor counts the global batch's prompts, so it resumes on any number of processes."""
        state = {"step": self.step, "data": self.dataset.state_dict(),
                 "shuffle_rng": self.shuffle.get_state().tolist(), "config": self.config.to_dict(),
                 "skipped_steps": self.skipped_steps, "world_size": distributed.world_size(),
                 "global_prompts_per_step": self._global_prompts_per_step}
        policy, optimizer = self.policy, self.optimizer
        if self.policy.sharded is not None:  # the full weights and optimizer state, gathered by every process
            policy = optimizer = sharding.CheckpointView(self.policy, self.optimizer, gather=True)
        path = self.run_dir / f"checkpoint-{self.step}"
        if distributed.is_main():
            path = ckpt.save_checkpoint(self.run_dir, self.step, policy=policy, optimizer=optimizer,
                                        extra_modules=self.algorithm.modules,
                                        scheduler=self.scheduler, trainer_state=state,
                                        save_total_limit=self.config.save_total_limit)
        distributed.barrier()  # no process goes on before the checkpoint exists
        return path

    def _resume(self, where: str) -> None:
        path = Path(where)
        found = ckpt.latest_checkpoint(path) if not (path / "trainer_state.json").exists() else path
        if found is None:
            raise FileNotFoundError(f"--resume {where}: no checkpoint-* folder found there")
        policy, optimizer = self.policy, self.optimizer
        if self.policy.sharded is not None:  # every process reads the full files and keeps its shards
            policy = optimizer = sharding.CheckpointView(self.policy, self.optimizer, gather=False)
        try:
            state = ckpt.load_checkpoint(found, policy=policy, optimizer=optimizer,
                                         scheduler=self.scheduler, extra_modules=self.algorithm.modules)
        except ckpt.CheckpointError as error:
            step = int(found.name.rpartition("-")[2])
            earlier = [p for p in ckpt.list_checkpoints(found.parent) if int(p.name.rpartition("-")[2]) < step]
            hint = f"; resume from the one before instead: --resume {earlier[-1]}" if earlier else ""
            raise ckpt.CheckpointError(f"{error}{hint}") from None
        self.step = state["step"]
        if self.step % self.config.num_iterations:
            _announce(f"resuming at step {self.step}, inside a generation cycle of num_iterations="
                      f"{self.config.num_iterations}: a new generation batch starts here, so the run differs "
                      "from an uninterrupted one (periodic and signal checkpoints fall on cycle boundaries)")
        self.skipped_steps = state["skipped_steps"]
        self.dataset.load_state_dict(state["data"])
        self.shuffle.set_state(torch.tensor(state["shuffle_rng"], dtype=torch.uint8))
        self.engine.sync_weights(self.policy.generation_model)  # the restored weights, not the checkpoint's base
        # Checkpoints from before multi-process training have neither field: one process, this config's batch.
        saved_on = state.get("world_size", 1)
        saved_prompts = state.get("global_prompts_per_step", self.config.prompts_per_step)
        if (saved_on, saved_prompts) != (distributed.world_size(), self._global_prompts_per_step):
            _announce(f"resuming on {distributed.world_size()} processes a run saved on {saved_on}: "
                      f"{self._global_prompts_per_step} prompts per step (was {saved_prompts}); the data cursor "
                      "counts prompts of the global batch, so it continues where it stopped")

    def _request_stop(self, signum, frame) -> None:
        """SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption): finish this step, save, return.
        The same signal again acts at once, as it would by default."""
        name = signal.Signals(signum).name
        _announce(f"\n{name}: saving a checkpoint after this step ({name} again to abort)")
        self._stop_requested = True
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)


def _announce(message: str) -> None:
    """Print once per run: on rank 0 (the only process in a single-process run)."""
    if distributed.is_main():
        print(message, flush=True)


def _gradients_finite(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())


def _rng_states() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """torch's CPU and CUDA generator states (what dropout draws from)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def _set_rng_states(states: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    torch.set_rng_state(states[0])
    if states[1]:
        torch.cuda.set_rng_state_all(states[1])

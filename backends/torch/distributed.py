"""Training on several processes, one per device: torch.distributed, launched by torchrun.

    torchrun --nproc-per-node 2 -m aha.cli train --config run.yaml       # one node, two GPUs
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m aha.cli train ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; `init_from_env` joins the process
group (NCCL on CUDA, gloo on CPU). Without WORLD_SIZE > 1 nothing is initialized and every helper here is
what one process does, so single-process training is unchanged.

What is split, and why the step stays the single-process step on the union (P processes, this one rank r):
- Prompts: every rank draws the step's global prompt list (P x prompts_per_step) from the same seeded
  cursor and keeps prompts r, r + P, r + 2P, ... (`shard_prompts`). A prompt's G completions stay on its
  rank, so group statistics (GRPO's group mean and std, RLOO's baselines, Online DPO's pairs) are local
  and exact. The cursor counts global prompts: a checkpoint resumes on any number of processes.
- Sampling: each prompt's completions are seeded from (seed, step, its index in the global list)
  (config.sampling_seed "prompt", rollout.SamplingParams.prompt_seeds), so they do not depend on P.
- scale_rewards="batch": the batch std needs every rank's rewards, so the GRPO adapter gathers them (NaN
  included, `gather_rows`) and keeps its own rows' advantages.
- Loss scaling (spec/common.md eq. 7): gradients are averaged over ranks (a mean, as DDP); each micro-batch
  loss is scaled by c = 1/GA, or by c = P for dapo/cispo, whose N = num_items_in_batch is summed over ranks
  (`sum_over_ranks`) to the step's whole token count: (1/P) sum_p sum_b P sum(m l)/N = sum_all(m l)/N.
- Gradients: replicated weights (LoRA, QLoRA, full fine-tuning that fits) are all-reduced once per optimizer
  step, after accumulation (`average_gradients`), rather than by wrapping the model in DDP: one flat
  all-reduce per step needs no no_sync bookkeeping across micro-batches, nor across the out-of-memory
  fallback's extra backward passes, and nothing of peft's frozen base. FSDP2 (config.fsdp, sharding.py)
  reduce-scatters its sharded gradients itself during backward, with the same mean.
- Faults: a step one rank skips (non-finite loss or gradient) every rank skips (`any_rank`). A rank that
  dies or hangs makes the others raise `RankLostError`: gloo sees a closed connection at once, otherwise
  the process-group timeout (config.ddp_timeout) fires; torchrun's agent also stops the survivors when one
  process exits with an error.
- Output: metrics are combined over ranks (`combine_metrics`); only rank 0 writes metrics (samples: its
  own share), plots, checkpoints, summaries and prints. Every rank evaluates the same held-out rows (under
  FSDP generation is collective) and rank 0 reports.

Known difference from one process: PPO whitens advantages (and whiten_rewards) over each rank's rows, as
TRL does per process; torch's RNG (dropout) is seeded alike on every rank.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

Row = TypeVar("Row")


class RankLostError(RuntimeError):
    """Another process of the run died or stopped answering; the message names what was being waited for."""


def init_from_env(*, timeout: float) -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    NCCL with one GPU per process (cuda:LOCAL_RANK), gloo on CPU. A no-op in one process or when the
    caller already initialized torch.distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def device() -> torch.device | None:
    """This process's device when several share a node's GPUs (cuda:LOCAL_RANK); None otherwise (the default)."""
    return torch.device("cuda", local_rank()) if world_size() > 1 and torch.cuda.is_available() else None


def shard_prompts(rows: Sequence[Row]) -> tuple[list[Row], list[int]]:
    """This rank's prompts of the step's global list, r, r + P, r + 2P, ..., and their global indices."""
    indices = list(range(rank(), len(rows), world_size()))
    return [rows[i] for i in indices], indices


def sum_over_ranks(value: float) -> float:
    """value summed over every rank (float64: exact for token counts)."""
    if world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    with _collective("summing the token count over ranks"):
        dist.all_reduce(total)
    return total.item()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any."""
    if world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=_comm_device())
    with _collective("agreeing on a fault or a stop request"):
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x [B, ...] (B equal on all ranks) concatenated in rank order: [P·B, ...]."""
    if world_size() == 1:
        return x
    local = x.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size())]
    with _collective("gathering rewards"):
        dist.all_gather(parts, local)
    return torch.cat(parts).to(x.device)


def own_rows(gathered: torch.Tensor) -> torch.Tensor:
    """This rank's block of a `gather_rows` result."""
    size = gathered.shape[0] // world_size()
    return gathered[rank() * size:(rank() + 1) * size]


BUCKET_ELEMENTS = 1 << 26
"""Most gradient elements per all-reduce (256 MiB of float32): one flat buffer per bucket, so LoRA's adapter
goes in one call and full fine-tuning never holds a second copy of every gradient."""


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Replace the gradient of every replicated parameter by its mean over ranks, in flat all-reduces of
    parameters of one dtype (up to BUCKET_ELEMENTS each). Sharded (DTensor) parameters are left alone: FSDP
    reduced them during backward. A parameter without a gradient on some ranks counts as 0 there; one
    without a gradient anywhere keeps None."""
    if world_size() == 1:
        return
    from torch.distributed.tensor import DTensor

    replicated = [p for p in params if not isinstance(p, DTensor)]
    has_grad = torch.tensor([p.grad is not None for p in replicated], dtype=torch.uint8, device=_comm_device())
    with _collective("averaging gradients"):
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    active = [p for p, flag in zip(replicated, has_grad.tolist()) if flag]
    for p in active:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for group in _buckets(active):
        flat = torch.cat([p.grad.reshape(-1).to(_comm_device()) for p in group])
        with _collective("averaging gradients"):
            dist.all_reduce(flat)
        flat /= world_size()
        for p, piece in zip(group, flat.split([p.numel() for p in group])):
            p.grad.copy_(piece.view_as(p.grad))


def _buckets(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Parameters of one gradient dtype in order, at most BUCKET_ELEMENTS per bucket (or one parameter)."""
    buckets = []
    for dtype in dict.fromkeys(p.grad.dtype for p in params):
        bucket, size = [], 0
        for p in (p for p in params if p.grad.dtype == dtype):
            if bucket and size + p.numel() > BUCKET_ELEMENTS:
                buckets.append(bucket)
                bucket, size = [], 0
            bucket.append(p)
            size += p.numel()
        buckets.append(bucket)
    return buckets


def broadcast_parameters(params: Sequence[torch.Tensor]) -> None:
    """Copy rank 0's values of replicated parameters to every rank (same start, whatever each rank's RNG did)."""
    if world_size() == 1:
        return
    with torch.no_grad(), _collective("broadcasting the initial weights"):
        for p in params:
            buffer = p.data.to(_comm_device())
            dist.broadcast(buffer, src=0)
            p.data.copy_(buffer)


def shutdown() -> None:
    """Leave the process group at the end of a run (NCCL warns about a process that exits without)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        with _collective("waiting for the other ranks"):
            dist.barrier()


def combine_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """One step's metrics over all ranks, on every rank: min of */min, max of */max, max_abs, time/* (the
    slowest rank sets the pace) and peak memory; sums of counts (unscorable, truncated_prompts, oom_retries)
    and of throughputs (tokens_per_s/*); the mean otherwise (ranks hold equally many rows, so means of means
    are the global means; standard deviations are averaged, not pooled)."""
    if world_size() == 1:
        return metrics
    everyone: list[Any] = [None] * world_size()
    with _collective("combining metrics"):
        dist.all_gather_object(everyone, metrics)
    combined = {}
    for name in dict.fromkeys(k for m in everyone for k in m):
        values = [float(m[name]) for m in everyone if name in m]
        combined[name] = _combine(name, values)
    return combined


def _combine(name: str, values: list[float]) -> float:
    if name.endswith(("/min", "_min")):
        return min(values)
    if name.endswith(("/max", "_max", "max_abs")) or name.startswith("time/") or name == "peak_memory_gib":
        return max(values)
    if name.endswith("unscorable") or name in ("truncated_prompts", "oom_retries") or name.startswith("tokens_per_s/"):
        return sum(values)
    return sum(values) / len(values)


class NullLogger:
    """What ranks other than 0 log to: nothing (MetricsLogger's interface)."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_samples(self, step: int, prompts, completions, rewards) -> None:
        pass

    def close(self) -> None:
        pass


def _comm_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as error:  # DistBackendError, gloo's closed connection, the process-group timeout
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise RankLostError(
            f"rank {rank()} of {world_size()}: {what} failed: another process of the run died or stopped "
            f"answering ({reason}). Its own output says why; restart from the last checkpoint with --resume "
            "(on any number of processes)") from error

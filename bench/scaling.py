#!/usr/bin/env python3
"""GRPO step time and throughput on 1 vs N processes (one GPU each), launched with torchrun.

Setting: Qwen2.5-1.5B shape with random weights (bench/grpo_step.py builds it), LoRA r=16 on all linear
layers in bfloat16, hf rollout, beta=0; per process 4 prompts x 8 generations in 4 micro-batches of 8, 256
prompt tokens, up to 768 completion tokens (a random model rarely samples EOS, so completions run to the
limit). Weak scaling by default: every process keeps its batch, so N processes take an N times larger
global batch per step and ideal throughput grows N-fold (`--scaling strong` divides the accumulation by N
instead, keeping the global batch). The first step is a warm-up; the table is over the rest.

    python bench/scaling.py --size real --processes 1 2     # GPUs (NCCL)
    python bench/scaling.py --size tiny --processes 1 2     # CPU smoke test (gloo, one thread per process)

Run from the repository root. Each N is one `torchrun --standalone --nproc-per-node N bench/scaling.py
--worker ...`; rank 0 writes its steps, and this script prints a table and writes $OUT/scaling.json (or
--out) after every N.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from grpo_step import SHAPES, build_model  # bench/ is on sys.path: it holds this script

RUNS = {
    "real": dict(prompt_len=256, completion_len=768, steps=3, dtype="bfloat16"),
    "tiny": dict(prompt_len=32, completion_len=16, steps=3, dtype="float32"),
}
COLUMNS = ["processes", "step_s", "rollout_s", "update_s", "completions", "tokens_per_s", "tokens_per_s_per_process",
           "efficiency"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=SHAPES, default="real")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--scaling", choices=["weak", "strong"], default="weak")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run, the first a warm-up")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON of the run, set by the launcher
    args = parser.parse_args()
    if args.worker:
        return _worker(json.loads(args.worker))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"aha-scaling-{args.size}"
    run = {**RUNS[args.size], "steps": args.steps or RUNS[args.size]["steps"]}
    model_dir, data = work / "model", work / "prompts.jsonl"
    if not (model_dir / "config.json").exists():
        build_model(model_dir, SHAPES[args.size])
    rng = random.Random(0)
    data.write_text("".join(json.dumps({"prompt": "".join(rng.choice("0123456789") for _ in range(run["prompt_len"]))})
                            + "\n" for _ in range(256)))
    record = {"benchmark": "scaling", "setting": f"Qwen2.5-1.5B shape ({args.size}), random weights, LoRA r=16 "
              f"all-linear, per process 4 prompts x 8 generations, {run['prompt_len']} + {run['completion_len']} "
              f"tokens, hf rollout, beta=0, {args.scaling} scaling", "size": args.size,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "gpus_visible": torch.cuda.device_count(), "torch": torch.__version__,
              "command": "python " + " ".join(sys.argv), "runs": [], "table": []}
    for processes in args.processes:
        accumulation = 4 if args.scaling == "weak" else max(1, 4 // processes)
        job = dict(model=str(model_dir), dataset=str(data), output_dir=str(work / f"run-{processes}"),
                   result=str(work / f"result-{processes}.json"), steps=run["steps"], dtype=run["dtype"],
                   prompt_len=run["prompt_len"], completion_len=run["completion_len"], accumulation=accumulation)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   str(Path(__file__).resolve()), "--size", args.size, "--worker", json.dumps(job)]
        tic = time.time()
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        steps = json.loads(Path(job["result"]).read_text())
        record["runs"].append({"processes": processes, "accumulation": accumulation, "wall_s": time.time() - tic,
                               "steps": steps})
        record["table"].append(_summary(processes, steps, record["table"][0] if record["table"] else None))
        (out / "scaling.json").write_text(json.dumps(record, indent=1))
    print(f"\n{record['setting']} on {record['device']}")
    widths = [max(len(c), 9) for c in COLUMNS]
    print("  ".join(f"{c:>{w}}" for c, w in zip(COLUMNS, widths)))
    for row in record["table"]:
        print("  ".join(f"{row[c]:>{w}.3f}" if isinstance(row[c], float) else f"{row[c]:>{w}}"
                        for c, w in zip(COLUMNS, widths)))
    print(f"\nwrote {out / 'scaling.json'}")
    return 0


def _summary(processes: int, steps: list[dict], single: dict | None) -> dict:
    """Means over the measured steps (all but the first). Throughput: completion tokens of the global batch
    per second of step; efficiency: throughput / (N x the one-process throughput)."""
    measured = steps[1:] or steps

    def mean(key: str) -> float:
        return sum(step[key] for step in measured) / len(measured)

    row = {"processes": processes, "step_s": mean("wall_s"), "rollout_s": mean("time/rollout"),
           "update_s": mean("time/update"), "completions": int(measured[0]["completions"]),
           "tokens_per_s": mean("completion_tokens") / mean("wall_s")}
    row["tokens_per_s_per_process"] = row["tokens_per_s"] / processes
    row["efficiency"] = row["tokens_per_s_per_process"] / single["tokens_per_s_per_process"] if single else 1.0
    return row


def _worker(job: dict) -> int:
    """One process of a run (under torchrun): train `steps` steps, rank 0 writes each step's metrics."""
    from aha.backends.torch import TrainConfig, distributed
    from aha.backends.torch.trainer import Trainer

    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    config = TrainConfig(
        model=job["model"], dataset=job["dataset"], output_dir=job["output_dir"], dtype=job["dtype"], lora_r=16,
        lora_alpha=32, num_generations=8, per_device_train_batch_size=8, gradient_accumulation_steps=job["accumulation"],
        max_prompt_length=job["prompt_len"], max_completion_length=job["completion_len"], max_steps=job["steps"],
        learning_rate=1e-5, beta=0.0, reward_funcs=("bench/rewards.py:hash_reward",), log_completions_steps=0,
        chat_template="plain", seed=0)
    trainer = Trainer(config)
    steps = []
    for _ in range(config.max_steps):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        tic = time.time()
        metrics = distributed.combine_metrics(trainer.train_step())  # waits for every process
        trainer.step += 1
        metrics["wall_s"] = time.time() - tic
        metrics["completions"] = distributed.sum_over_ranks(float(len(trainer.batch)))
        metrics["completion_tokens"] = distributed.sum_over_ranks(float(trainer.batch.completion_lengths.sum()))
        steps.append(metrics)
        if distributed.is_main():
            print(f"{distributed.world_size()} processes, step {len(steps)}: {metrics['wall_s']:.2f} s, "
                  f"{metrics['completion_tokens'] / metrics['wall_s']:.0f} completion tokens/s", flush=True)
    if distributed.is_main():
        Path(job["result"]).write_text(json.dumps(steps, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The embedded demo task trained with each algorithm: held-out accuracy before and after, and wall time.

Each run is exactly `aha train --algo <algo>`: no model and no dataset, so the embedded demo (two-digit
addition; the tiny pre-trained Llama answers greedily right about 30% of the time) at the demo preset
(backends/torch/demo/preset.py: 16 prompts × 8 samples a step, LoRA r=16, lr 3e-4, 20 steps), with each
algorithm's own defaults for what the preset leaves open (KL coefficient, loss type, PPO's value head).
Accuracy is greedy exact match on the held-out problems, measured by the trainer before and after.

    python bench/demo_algorithms.py                  # all four; prints a table
    python bench/demo_algorithms.py --algos ppo --steps 5

Writes bench/results/demo_algorithms-cpu.json (or --out) after every algorithm, so a cut-off run keeps
what finished. Wall time is the whole run (model load, both evaluations, training) and depends on how
busy the CPU is: each row records the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from aha.backends.torch import TrainConfig, Trainer
from aha.backends.torch.demo.preset import with_demo_defaults

ALGORITHMS = ("grpo", "rloo", "ppo", "online_dpo")


def run(algo: str, args: argparse.Namespace, work: Path) -> dict:
    values = {"algo": algo, "output_dir": str(work / algo), "seed": args.seed, "log_completions_steps": 0}
    if args.steps:
        values["max_steps"] = args.steps
    config = TrainConfig.from_dict(with_demo_defaults(values))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    summary = Trainer(config).train()
    seconds = time.perf_counter() - started
    return {"algo": algo, "accuracy_before": summary["accuracy_before"], "accuracy_after": summary["accuracy_after"],
            "steps": summary["steps"], "wall_seconds": round(seconds, 1),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)], "config": config.to_dict()}


def table(rows: list[dict]) -> str:
    lines = [f"{'algo':<11} {'accuracy before':>15} {'accuracy after':>14} {'steps':>5} {'wall time (s)':>13}"]
    for row in rows:
        lines.append(f"{row['algo']:<11} {100 * row['accuracy_before']:>14.1f}% {100 * row['accuracy_after']:>13.1f}% "
                     f"{row['steps']:>5} {row['wall_seconds']:>13.1f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo preset's)")
    parser.add_argument("--seed", type=int, default=42, help="TrainConfig's default seed, as `aha train`")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: these matrices are too small to gain from more on a shared CPU)")
    parser.add_argument("--out", default="bench/results/demo_algorithms-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/demo_algorithms.py --algos " + " ".join(args.algos) + (
        f" --steps {args.steps}" if args.steps else "") + f" --seed {args.seed} --threads {args.threads}"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="aha-demo-algorithms-") as work:
        for algo in args.algos:
            rows.append(run(algo, args, Path(work)))
            report = {"benchmark": "demo_algorithms", "device": "cpu",
                      "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                      "torch": torch.__version__, "torch_threads": args.threads,
                      "command": command, "results": rows}
            out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

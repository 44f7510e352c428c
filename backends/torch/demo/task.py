"""The demo task: two-digit addition with a column-by-column <think> trace.

    prompt:  "47+85"
    careful: <think>7+5=12 4+8+1=13</think><answer>132</answer>
    sloppy:  <think>7+5=2 4+8=2</think><answer>22</answer>

Why this makes a good RL demo on a CPU: the pre-training (SFT) data works a fraction
`careful_fraction` (< 1/2) of the problems with the careful column method and the rest with a
sloppy one that forgets every carry. Sloppy answers are right exactly when no column carries
(24% of problems), so the pre-trained model answers greedily about a quarter right, while
sampling at temperature 1 takes the careful path often enough for GRPO to see rewarded samples in
most groups. RL then only has to make a behaviour the model already knows (carrying) the
preferred one, which LoRA learns in a few dozen steps, instead of teaching arithmetic from scratch.

Train and test problems are disjoint: a fixed hash of the problem sends 1 in 5 of the 8,100
pairs to "test".
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Literal

Split = Literal["train", "test"]
OPERANDS_LOW, OPERANDS_HIGH = 10, 99
"""Two-digit operands."""
TRAIN_ROWS = 4096
"""Rows of the demo's RL training set (`demo_dataset("train", TRAIN_ROWS, seed)`), drawn from the
6,413 training pairs; 16 prompts a step for 256 steps is one epoch."""


def is_test_pair(a: int, b: int) -> bool:
    """The held-out pairs: a fixed hash of the problem text, so the split never depends on a seed.
    (Not a linear hash: (c1·a + c2·b) mod 5 would hold out exactly the sums divisible by 5.)"""
    return hashlib.blake2b(prompt_text(a, b).encode(), digest_size=8).digest()[0] % 5 == 0


def sample_problem(rng: random.Random, split: Split) -> tuple[int, int]:
    """Uniform operands (a, b), redrawn until the pair belongs to `split`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    while True:
        a, b = rng.randint(OPERANDS_LOW, OPERANDS_HIGH), rng.randint(OPERANDS_LOW, OPERANDS_HIGH)
        if is_test_pair(a, b) == (split == "test"):
            return a, b


def prompt_text(a: int, b: int) -> str:
    return f"{a}+{b}"


def solution_text(a: int, b: int, *, careful: bool) -> str:
    """The completion text (without EOS): column sums right to left, then the answer.

    careful=False forgets every carry: each column keeps only its last digit and adds no carry-in.
    """
    columns, carry, digits = [], 0, ""
    for x, y in ((a % 10, b % 10), (a // 10, b // 10)):
        total = x + y + (carry if careful else 0)
        addends = f"{x}+{y}" + ("+1" if careful and carry else "")
        columns.append(f"{addends}={total if careful else total % 10}")
        carry = total // 10
        digits = str(total % 10) + digits
    answer = (str(carry) if careful and carry else "") + digits
    return f"<think>{' '.join(columns)}</think><answer>{int(answer)}</answer>"


def demo_dataset(split: Split, n: int, seed: int = 0) -> list[dict[str, str]]:
    """n rows {"prompt", "answer"} of the split, a pure function of (split, n, seed)."""
    rng = random.Random(f"{split}-{seed}")
    return [{"prompt": prompt_text(a, b), "answer": str(a + b)}
            for a, b in (sample_problem(rng, split) for _ in range(n))]


def write_jsonl(rows: list[dict[str, str]], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def sft_examples(n: int, *, careful_fraction: float, seed: int) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from the train split, careful with probability careful_fraction."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        a, b = sample_problem(rng, "train")
        examples.append((prompt_text(a, b), solution_text(a, b, careful=rng.random() < careful_fraction)))
    return examples

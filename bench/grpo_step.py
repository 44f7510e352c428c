#!/usr/bin/env python3
"""One full GRPO step (rollout + scoring + update) through aha's trainer on a random-weight model.

Setting (a) of the project's benchmarks: Qwen2.5-1.5B shape from its config (random weights,
saved and loaded with from_pretrained), QLoRA (nf4, double quant, bf16 compute) r=16 on all
linear layers, 4 prompts × 8 generations, 256 prompt tokens, up to 768 completion tokens (a
random model almost never samples EOS, so completions run to the limit), hf rollout, beta=0.
Prints a table and writes $OUT/grpo_step.json after every step, so a cut-off run keeps its data.

    python bench/grpo_step.py --size real   # GPU
    python bench/grpo_step.py --size tiny   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from aha.backends.torch import TrainConfig, Trainer
from aha.backends.torch.demo.tokenizer import build_tokenizer

SHAPES = {
    "real": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
RUNS = {
    "real": dict(prompt_len=256, completion_len=768, steps=2),
    "tiny": dict(prompt_len=32, completion_len=16, steps=2),
}


def build_model(folder: Path, shape: dict) -> None:
    tokenizer = build_tokenizer()
    config = Qwen2Config(**shape, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
                         rms_norm_eps=1e-6, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=SHAPES, default="real")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 2)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"aha-grpo-step-{args.size}"
    run = RUNS[args.size]
    model_dir, data = work / "model", work / "prompts.jsonl"
    started = time.time()
    if not (model_dir / "config.json").exists():
        build_model(model_dir, SHAPES[args.size])
    rng = random.Random(0)
    work.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"prompt": "".join(rng.choice("0123456789") for _ in range(run["prompt_len"]))})
                            + "\n" for _ in range(64)))
    config = TrainConfig(
        model=str(model_dir), dataset=str(data), output_dir=str(work / "run"), load_in_4bit=args.load_in_4bit,
        dtype="bfloat16", lora_r=16, lora_alpha=32, num_generations=8, per_device_train_batch_size=8,
        gradient_accumulation_steps=4, max_prompt_length=run["prompt_len"], max_completion_length=run["completion_len"],
        max_steps=args.steps or run["steps"], learning_rate=1e-5, beta=0.0, reward_funcs=("bench/rewards.py:hash_reward",),
        log_completions_steps=0, chat_template="plain", seed=0)
    trainer = Trainer(config)
    setup_s = time.time() - started
    record = {"setting": "(a) Qwen2.5-1.5B shape, random weights, " + ("QLoRA nf4" if args.load_in_4bit else "LoRA bf16")
              + " r=16 all-linear, 4 prompts x 8 generations, 256 + 768 tokens, hf rollout, beta=0",
              "size": args.size, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "setup_s": setup_s, "config": config.to_dict(), "steps": []}
    for step in range(config.max_steps):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        tic = time.time()
        metrics = trainer.train_step()
        trainer.step += 1
        metrics["wall_s"] = time.time() - tic
        record["steps"].append(metrics)
        (out / "grpo_step.json").write_text(json.dumps(record, indent=1))
        print(f"step {step + 1}: {metrics['wall_s']:.2f} s (rollout {metrics['time/rollout']:.2f} s, update "
              f"{metrics['time/update']:.2f} s), peak {metrics['peak_memory_gib']:.2f} GiB, completion length "
              f"{metrics['completion_length/mean']:.0f}", flush=True)
    keys = ["wall_s", "time/rollout", "time/score", "time/update", "peak_memory_gib", "completion_length/mean",
            "tokens_per_s/rollout", "tokens_per_s/train"]
    print(f"\n{'step':>4} " + " ".join(f"{k:>22}" for k in keys))
    for index, metrics in enumerate(record["steps"], 1):
        print(f"{index:>4} " + " ".join(f"{metrics[k]:>22.3f}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build (once, cached) the demo policy: a tiny Llama model pre-trained on the demo task's SFT data.

The result is an ordinary `save_pretrained` folder (model + tokenizer), so the trainer loads it
through `from_pretrained` like any other model. (Llama rather than Qwen2: for model_type "qwen2",
transformers' AutoTokenizer substitutes its Qwen2 tokenizer class for the saved one, which would
re-split this character-level vocabulary.) The folder name carries a hash of the recipe
and of the task code version, so a changed recipe builds afresh and an unchanged one is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ..chat import render_prompt
from .evaluate import evaluate_accuracy
from .task import demo_dataset, sft_examples
from .tokenizer import build_tokenizer

TASK_VERSION = "addition-2digit-llama-v1"
"""Bump when task.py or tokenizer.py change what the model is trained on."""
BUILD_INFO = "demo_build.json"


@dataclass(frozen=True)
class DemoRecipe:
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    sft_steps: int = 500
    """AdamW steps of SFT: enough to learn both methods, not to converge."""
    batch_size: int = 64
    learning_rate: float = 3e-3
    careful_fraction: float = 0.4
    """Share of SFT examples worked with carries (task.py explains why not all)."""
    seed: int = 0
    eval_rows: int = 200
    """Held-out rows scored after the build (written to demo_build.json)."""

    def fingerprint(self) -> str:
        text = json.dumps({"task": TASK_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_cache_root() -> Path:
    return Path(os.environ.get("AHA_CACHE") or Path.home() / ".cache" / "aha")


def build_demo_model(cache_dir: str | Path | None = None, *, force: bool = False,
                     recipe: DemoRecipe = DemoRecipe()) -> Path:
    """The folder of the built demo model, building it first unless a finished build is cached.

    `cache_dir` is the parent folder (default `$AHA_CACHE`, else ~/.cache/aha); the model lands in
    `<cache_dir>/demo-<recipe hash>`. A build is written to a temporary sibling and renamed into
    place, so an interrupted or concurrent build never leaves a half-written model behind.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    target = root / f"demo-{recipe.fingerprint()}"
    if (target / BUILD_INFO).is_file() and not force:
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    threads = torch.get_num_threads()
    # One thread: these matrices are too small to gain from a second, and on a shared machine a
    # parallel region waits for its slowest thread (measured 5-10x slower with 2 threads under load).
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():  # the build seeds torch; the caller's RNG stream is left as it was
            _build(staging, recipe)
        if force and target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:  # a concurrent build finished first; keep its result
            if not (target / BUILD_INFO).is_file():
                raise
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_info(model_dir: str | Path) -> dict:
    """What the build recorded: recipe, seconds taken, held-out greedy accuracy."""
    return json.loads((Path(model_dir) / BUILD_INFO).read_text())


def _build(folder: Path, recipe: DemoRecipe) -> None:
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers, num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_attention_heads, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    _supervised_finetune(model, tokenizer, recipe)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    build_seconds = time.perf_counter() - start
    # Scored through the Auto classes, exactly as the trainer will load it.
    accuracy = evaluate_accuracy(AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                                 demo_dataset("test", recipe.eval_rows, seed=0))
    info = {"recipe": dataclasses.asdict(recipe), "task_version": TASK_VERSION,
            "build_seconds": round(build_seconds, 1), "heldout_greedy_accuracy": accuracy,
            "heldout_rows": recipe.eval_rows}
    (folder / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _supervised_finetune(model: LlamaForCausalLM, tokenizer, recipe: DemoRecipe) -> None:
    """Next-token cross-entropy on completion tokens only (prompt tokens masked), plain AdamW,
    linear warm-up then cosine decay."""
    examples = sft_examples(recipe.sft_steps * recipe.batch_size, careful_fraction=recipe.careful_fraction,
                            seed=recipe.seed)
    prompt_cache: dict[str, list[int]] = {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01)
    warmup = max(1, recipe.sft_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * step / recipe.sft_steps)))
    model.train()
    for step in range(recipe.sft_steps):
        batch = examples[step * recipe.batch_size:(step + 1) * recipe.batch_size]
        input_ids, labels = _collate(batch, tokenizer, prompt_cache)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def _collate(batch: list[tuple[str, str]], tokenizer, prompt_cache: dict[str, list[int]]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (-100 on prompt and padding)."""
    rows = []
    for prompt, completion in batch:
        if prompt not in prompt_cache:
            prompt_cache[prompt] = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((prompt_cache[prompt], completion_ids))
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (p, c) in enumerate(rows):
        input_ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
    return input_ids, labels

#!/usr/bin/env python3
"""Rollout engines side by side: tokens/s and peak device memory of aha's hf engine, aha's vLLM engine and plain vLLM.

Setting: Qwen2.5-1.5B shape with random weights (bf16, saved once and loaded with from_pretrained; plain vLLM uses
load_format="dummy"), 64 prompts of 256 random tokens × 8 samples × 256 new tokens at temperature 1 (a random model
all but never samples EOS, so every completion runs to the limit), LoRA r=16 on all linear layers for aha's
engines. aha's vLLM engine runs as the trainer runs it: in-process, sleep mode, woken before and put to sleep after
each rollout, sampler log-probs on. Also measured there: one LoRA sync (adapter to /dev/shm) and the first rollout
with the new adapter, and the train/inference mismatch of its samples (spec/grpo.md eq. 14) against the trainer's
own log-probs. Each row runs in its own process (clean memory statistics, one vLLM instance per process); a row
that fails keeps its error and the others run. Prints a table; writes $OUT/rollout.json (OUT defaults to
./bench-out) after every row.

    python bench/rollout.py               # GPU with vLLM 0.26 (shared/device/README.md)
    python bench/rollout.py --size tiny   # CPU smoke test: the hf row; vLLM rows say why they are skipped
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

SHAPES = {
    "real": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
RUNS = {"real": dict(prompts=64, samples=8, prompt_len=256, new_tokens=256),
        "tiny": dict(prompts=4, samples=2, prompt_len=16, new_tokens=8)}
ROWS = ("hf", "aha-vllm", "vllm")


class DevicePeak:
    """The most device memory in use (total - free, every allocator and process) while the block runs, polled
    every 10 ms from a thread: vLLM's memory lives outside torch's allocator statistics. None on a CPU."""

    def __enter__(self) -> DevicePeak:
        self.peak_gib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if torch.cuda.is_available() else None
        if self._thread:
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            free, total = torch.cuda.mem_get_info()
            self.peak_gib = max(self.peak_gib or 0.0, (total - free) / 2**30)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


def build_model(folder: Path, shape: dict) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    from aha.backends.torch.demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(**shape, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
                         rms_norm_eps=1e-6, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def prompts(run: dict, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(10, vocab, (run["prompts"], run["prompt_len"]), generator=generator).tolist()


def train_config(model_dir: Path, run: dict):
    from aha.backends.torch import TrainConfig

    return TrainConfig(model=str(model_dir), rollout="vllm", lora_r=16, lora_alpha=32, dtype="bfloat16",
                       num_generations=run["samples"], per_device_train_batch_size=run["prompts"] * run["samples"],
                       max_prompt_length=run["prompt_len"], max_completion_length=run["new_tokens"], seed=0)


def timed_rollout(engine, ids: list[list[int]], run: dict, seed: int) -> dict:
    from aha.backends.torch.rollout import SamplingParams

    sampling = SamplingParams(temperature=1.0, max_tokens=run["new_tokens"], seed=seed)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    with DevicePeak() as peak:
        tic = time.perf_counter()
        rollout = engine.generate(ids, run["samples"], sampling)
        seconds = time.perf_counter() - tic
    tokens = sum(map(len, rollout.completion_ids))
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "peak_device_gib": peak.peak_gib,
            "rollout": rollout}


def row_hf(model_dir: Path, run: dict, vocab: int) -> dict:
    from aha.backends.torch.models import load_policy
    from aha.backends.torch.rollout import HFRolloutEngine

    policy = load_policy(str(model_dir), dtype="bfloat16", lora_r=16, lora_alpha=32)
    engine = HFRolloutEngine(policy.generation_model, policy.tokenizer)
    ids = prompts(run, vocab)
    reps = []
    for rep in range(2):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        result = timed_rollout(engine, ids, run, seed=rep)
        result.pop("rollout")
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        reps.append(result)
    return {"reps": reps}


def row_aha_vllm(model_dir: Path, run: dict, vocab: int) -> dict:
    from aha.algos import mismatch
    from aha.backends.torch.batch import collate_rollout
    from aha.backends.torch.losses import completion_logprobs
    from aha.backends.torch.models import load_policy
    from aha.backends.torch.vllm_rollout import VLLMRolloutEngine

    policy = load_policy(str(model_dir), dtype="bfloat16", lora_r=16, lora_alpha=32)
    tic = time.perf_counter()
    engine = VLLMRolloutEngine.from_policy(policy, policy.tokenizer, train_config(model_dir, run))
    out: dict = {"engine_start_s": time.perf_counter() - tic, "reps": []}
    ids = prompts(run, vocab)
    for rep in range(2):
        result = timed_rollout(engine, ids, run, seed=rep)
        rollout = result.pop("rollout")
        out["reps"].append(result)
    with torch.no_grad():  # a LoRA update that changes the samples, then one sync
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=1e-3)
    tic = time.perf_counter()
    engine.sync_weights(policy.generation_model)
    out["lora_sync_s"] = time.perf_counter() - tic
    out["first_rollout_after_sync"] = {k: v for k, v in timed_rollout(engine, ids, run, seed=2).items()
                                       if k != "rollout"}
    # Mismatch of the last rollout before the update: the trainer's log-probs of 8 groups, as GRPO scores π_old.
    with torch.no_grad(), policy.model.disable_adapter():
        rows = range(min(len(rollout), 8 * run["samples"]))
        batch = collate_rollout([rollout.prompt_ids[i] for i in rows], [rollout.completion_ids[i] for i in rows],
                                [rollout.is_truncated[i] for i in rows], pad_token_id=engine.pad_token_id)
        device = policy.device
        hidden = policy.hidden_states(batch.input_ids.to(device), batch.attention_mask.to(device),
                                      batch.completion_width, position_ids=batch.position_ids.to(device))
        old = completion_logprobs(hidden, policy.lm_head_weight, batch.completion_ids.to(device), temperature=1.0).cpu()
    sampler = torch.zeros_like(old)
    for index, row in enumerate(rows):
        sampler[index, :len(rollout.sampler_logp[row])] = torch.tensor(rollout.sampler_logp[row])
    ratio = mismatch.importance_sampling_ratio(old, sampler, batch.mask)
    out["mismatch"] = {k: v.item() for k, v in mismatch.mismatch_metrics(old, sampler, batch.mask, ratio).items()}
    return out


def row_vllm(model_dir: Path, run: dict, vocab: int) -> dict:
    import vllm

    from aha.backends.torch.vllm_rollout import gpu_memory_utilization

    free, total = torch.cuda.mem_get_info()
    tic = time.perf_counter()
    llm = vllm.LLM(model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
                   gpu_memory_utilization=gpu_memory_utilization(free_bytes=free, total_bytes=total,
                                                                 training_state_bytes=0),
                   max_model_len=run["prompt_len"] + run["new_tokens"], max_num_seqs=run["prompts"] * run["samples"])
    out: dict = {"engine_start_s": time.perf_counter() - tic, "reps": []}
    params = vllm.SamplingParams(n=run["samples"], temperature=1.0, max_tokens=run["new_tokens"], ignore_eos=True,
                                 logprobs=0, detokenize=False, seed=0)
    requests = [{"prompt_token_ids": p} for p in prompts(run, vocab)]
    for _ in range(2):
        torch.cuda.synchronize()
        with DevicePeak() as peak:
            tic = time.perf_counter()
            outputs = llm.generate(requests, params, use_tqdm=False)
            seconds = time.perf_counter() - tic
        tokens = sum(len(sample.token_ids) for output in outputs for sample in output.outputs)
        out["reps"].append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                            "peak_device_gib": peak.peak_gib})
    return out


def skip_reason(row: str) -> str | None:
    if row == "hf":
        return None
    if importlib.util.find_spec("vllm") is None:
        return "vllm not installed"
    if not torch.cuda.is_available():
        return "vllm needs a CUDA GPU"
    return None


def run_row(row: str, size: str, work: Path) -> int:
    """One row in this process: prints its JSON as the last line of stdout."""
    run = RUNS[size]
    result = {"hf": row_hf, "aha-vllm": row_aha_vllm, "vllm": row_vllm}[row](work / "model", run,
                                                                            SHAPES[size]["vocab_size"])
    print(json.dumps(result), flush=True)
    return 0


def table(record: dict) -> str:
    lines = [f"{'engine':<10} {'status':<28} {'tokens/s':>10} {'seconds':>8} {'peak GiB':>9} {'start s':>8}"]
    for row, result in record["rows"].items():
        rep = result.get("reps", [{}])[-1]  # the warm repetition
        peak = rep.get("peak_device_gib") or rep.get("peak_allocated_gib")
        lines.append(f"{row:<10} {result['status'][:28]:<28} {rep.get('tokens_per_s', float('nan')):>10.0f} "
                     f"{rep.get('seconds', float('nan')):>8.2f} {peak if peak is not None else float('nan'):>9.2f} "
                     f"{result.get('engine_start_s', float('nan')):>8.1f}")
    aha = record["rows"].get("aha-vllm", {})
    if "lora_sync_s" in aha:
        lines.append(f"LoRA sync {aha['lora_sync_s'] * 1e3:.1f} ms; first rollout after it "
                     f"{aha['first_rollout_after_sync']['seconds']:.2f} s; mismatch |Δ log-prob| mean "
                     f"{aha['mismatch']['sampling/sampling_logp_difference/mean']:.2e}, "
                     f"KL {aha['mismatch']['sampling/kl']:.2e}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SHAPES, default="real")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # internal: run one row here
    args = parser.parse_args()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"aha-rollout-{args.size}"
    if args.row:
        return run_row(args.row, args.size, work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (work / "model" / "config.json").exists():
        build_model(work / "model", SHAPES[args.size])
    record = {"setting": f"{args.size}: {RUNS[args.size]}, Qwen2.5-1.5B shape" if args.size == "real" else
              f"{args.size}: {RUNS[args.size]}", "size": args.size,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "rows": {}}
    for row in args.rows:
        reason = skip_reason(row)
        if reason:
            record["rows"][row] = {"status": f"skipped: {reason}"}
        else:
            done = subprocess.run([sys.executable, __file__, "--row", row, "--size", args.size],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                record["rows"][row] = {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}
            else:
                record["rows"][row] = {"status": "error", "stderr": done.stderr[-4000:]}
                print(done.stderr[-2000:], file=sys.stderr)
        (out / "rollout.json").write_text(json.dumps(record, indent=1))
        print(f"{row}: {record['rows'][row]['status']}", flush=True)
    print(table(record))
    return 0 if all(r["status"] != "error" for r in record["rows"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Fused log-probs on one GPU: naive torch vs chunked torch vs Triton, forward + backward.

For each N (tokens) at H=4096, V=128256, bf16: median fwd+bwd time (CUDA events, after warm-up), peak extra
memory (max_memory_allocated minus inputs, outputs and gradients), and the ratio to the "4-GEMM floor"
(4 × the time of one [N, H]·[H, V] bf16 GEMM measured in the same run: logits, their recompute, grad-hidden,
grad-weight). Before timing, it checks triton and chunked torch against the naive expression in float64 on a
small odd-sized case and prints the largest errors. Every row is caught on its own (OOM or error), so one
failure never loses the others. Prints a table; writes JSON to $OUT/logprobs.json (OUT defaults to ./bench-out).

    python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 bench/logprobs.py
    python3 bench/logprobs.py --sweep          # also time Triton tile configurations and backward chunks
    python3 bench/logprobs.py --tokens 512 --hidden 64 --vocab 1000   # CPU smoke run (torch rows only)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

from aha.backends.torch.logprobs import token_logprobs, triton_available


def naive(hidden, weight, targets, bias=None, temperature=1.0, return_entropy=False):
    """The docstring's naive equivalent: full [N, V] logits."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logp_all = torch.log_softmax(logits.float() / temperature, -1)
    logp = logp_all.gather(-1, targets[:, None])[:, 0]
    if return_entropy:
        return logp, -(logp_all.exp() * logp_all).sum(-1)
    return logp


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def median_seconds(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _error(exc) -> dict:
    oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
    return {"status": "OOM" if oom else "error", "error": repr(exc)[:400],
            **({} if oom else {"traceback": traceback.format_exc()[-1500:]})}


def measure(name, fn, hidden, weight, targets, device, args, entropy=False):
    """fwd+bwd median ms and peak extra MiB of ``fn(h, W, t) -> logp`` (or (logp, entropy))."""
    cot = torch.randn(2, hidden.shape[0], device=device) if entropy else None
    outputs = {}

    def step():
        hidden.grad = weight.grad = None
        out = fn(hidden, weight, targets)
        if entropy:
            (out[0] * cot[0] + out[1] * cot[1]).sum().backward()
            outputs["bytes"] = 2 * out[0].numel() * 4
        else:
            out.sum().backward()
            outputs["bytes"] = out.numel() * 4

    row = {"name": name}
    try:
        row["median_ms"] = round(median_seconds(step, device, args.warmup, args.repeats) * 1e3, 3)
        if device.type == "cuda":
            hidden.grad = weight.grad = None
            _free(device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            _sync(device)
            grads = sum(p.grad.numel() * p.grad.element_size() for p in (hidden, weight) if p.grad is not None)
            extra = torch.cuda.max_memory_allocated() - base - grads - outputs["bytes"]
            row["peak_extra_MiB"] = round(extra / 2**20, 1)
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 -- one failing row must not end the run
        row.update(_error(exc))
    finally:
        hidden.grad = weight.grad = None
        _free(device)
    print(f"  {name:<34} {row.get('status'):>6} {row.get('median_ms', '-'):>10} ms  "
          f"{row.get('peak_extra_MiB', '-'):>9} MiB extra", flush=True)
    return row


def accuracy_check(device, implementations) -> dict:
    """Largest |error| against naive float64 on an odd-sized case, values and gradients, bf16 and fp32.

    Chunks of 1000 columns (narrower than the 1024-column epilogue tile) and row blocks of 256 rows (the element
    budgets shrunk for the check), so that the online softmax and the gradient accumulations cross chunk and
    row-block boundaries.
    """
    from aha.backends.torch import logprobs

    n, width, vocab, temperature = 777, 256, 5003, 0.7
    small_budget = 256 * 1024
    saved_budget = logprobs._TORCH_BLOCK_ELEMENTS
    logprobs._TORCH_BLOCK_ELEMENTS = small_budget
    if "triton" in implementations:
        from aha.backends.torch import triton_logprobs

        saved_budget, triton_logprobs.BLOCK_ELEMENTS = (saved_budget, triton_logprobs.BLOCK_ELEMENTS), small_budget
    report = {}
    for dtype in (torch.bfloat16, torch.float32):
        gen = torch.Generator(device="cpu").manual_seed(1)
        h = torch.randn(n, width, generator=gen).to(device, dtype)
        w = (torch.randn(vocab, width, generator=gen) * 2 / width**0.5).to(device, dtype)
        b = torch.randn(vocab, generator=gen).to(device, dtype)
        t = torch.randint(0, vocab, (n,), generator=gen).to(device)
        cot = torch.randn(2, n, generator=gen, dtype=torch.float64).to(device)

        def run(fn, h, w, b):
            h, w, b = (x.detach().clone().requires_grad_() for x in (h, w, b))
            logp, ent = fn(h, w, t, bias=b, temperature=temperature, return_entropy=True)
            ((logp.double() * cot[0]).sum() + (ent.double() * cot[1]).sum()).backward()
            return [x.detach().double() for x in (logp, ent, h.grad, w.grad, b.grad)]

        reference = run(naive, h.double(), w.double(), b.double())
        same_dtype = run(naive, h, w, b)
        names = ("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias")
        for impl in ("naive-same-dtype", *implementations):
            key = f"{impl}/{str(dtype).removeprefix('torch.')}"
            try:
                got = same_dtype if impl == "naive-same-dtype" else run(
                    lambda *a, **k: token_logprobs(*a, **k, chunk_size=1000, implementation=impl), h, w, b)
                report[key] = {
                    name: {"max_abs": float((g - r).abs().max()),
                           "max_rel_to_max": float((g - r).abs().max() / r.abs().max())}
                    for name, g, r in zip(names, got, reference)
                }
                summary = "  ".join(f"{k}={v['max_abs']:.2e}" for k, v in report[key].items())
                print(f"  {key:<28} {summary}", flush=True)
            except Exception as exc:  # noqa: BLE001
                report[key] = _error(exc)
                print(f"  {key:<28} {report[key]['status']}: {report[key]['error']}", flush=True)
            _free(device)
    if "triton" in implementations:
        logprobs._TORCH_BLOCK_ELEMENTS, triton_logprobs.BLOCK_ELEMENTS = saved_budget
    else:
        logprobs._TORCH_BLOCK_ELEMENTS = saved_budget
    return report


def forward_only(h, w, t, floor_ms, device, args) -> dict:
    """Scoring pass (old/reference log-probs): no_grad forward, one GEMM's worth of work."""
    row = {"N": h.shape[0], "name": "triton forward only (no_grad)", "floor_ms": round(floor_ms, 3)}
    try:
        with torch.no_grad():
            ms = median_seconds(lambda: token_logprobs(h, w, t), device, args.warmup, args.repeats) * 1e3
        row.update(status="ok", median_ms=round(ms, 3), x_floor=round(ms / floor_ms, 3))
    except Exception as exc:  # noqa: BLE001
        row.update(_error(exc))
    print(f"  {row['name']:<34} {row['status']:>6} {row.get('median_ms', '-'):>10} ms", flush=True)
    return row


def gemm_ms(n, width, vocab, device, args) -> float:
    a = torch.randn(n, width, device=device, dtype=torch.bfloat16)
    b = torch.randn(vocab, width, device=device, dtype=torch.bfloat16)
    ms = median_seconds(lambda: a @ b.T, device, args.warmup, args.repeats) * 1e3
    del a, b
    _free(device)
    return ms


def sweep(n, width, vocab, device, args) -> list[dict]:
    """Epilogue tiles, backward chunk sizes, and two ways to accumulate grad_hidden in float32."""
    from aha.backends.torch import triton_logprobs as tri

    rows = []
    h = torch.randn(n, width, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, width, device=device, dtype=torch.bfloat16) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (n,), device=device)
    default = tri._TILES
    for tiles in [dict(BLOCK_M=8, BLOCK_N=1024, num_warps=8), dict(BLOCK_M=4, BLOCK_N=2048, num_warps=8),
                  dict(BLOCK_M=16, BLOCK_N=512, num_warps=8), dict(BLOCK_M=8, BLOCK_N=1024, num_warps=4),
                  dict(BLOCK_M=2, BLOCK_N=4096, num_warps=8)]:
        tri._TILES = tiles
        rows.append({"sweep": "tiles", "tiles": tiles, **measure(f"tiles {tuple(tiles.values())}", lambda h, w, t: (
            token_logprobs(h, w, t, implementation="triton")), h, w, t, device, args)})
    tri._TILES = default
    for chunk in (4096, 16384, 32768):
        rows.append({"sweep": "chunk", "chunk": chunk, **measure(f"chunk {chunk}", lambda h, w, t: token_logprobs(
            h, w, t, chunk_size=chunk, implementation="triton"), h, w, t, device, args)})
    del h, w
    _free(device)
    r, c = 4096, 8192
    g = torch.randn(r, c, device=device, dtype=torch.bfloat16)
    wc = torch.randn(c, width, device=device, dtype=torch.bfloat16)
    acc = torch.zeros(r, width, device=device)
    exact = g.double() @ wc.double()
    for name, fn in [("add_(g @ w)", lambda: acc.add_(g @ wc)),
                     ("addmm out_dtype=float32", lambda: torch.addmm(acc, g, wc, out_dtype=torch.float32, out=acc))]:
        try:
            acc.zero_()
            fn()
            err = float((acc.double() - exact).abs().max() / exact.abs().max())
            ms = median_seconds(fn, device, 2, 10) * 1e3
            rows.append({"sweep": "accumulate", "name": name, "ms": round(ms, 4), "max_rel_err": err})
        except Exception as exc:  # noqa: BLE001
            rows.append({"sweep": "accumulate", "name": name, **_error(exc)})
        print(f"  accumulate {name}: {rows[-1].get('ms', rows[-1].get('error'))} ms "
              f"err {rows[-1].get('max_rel_err')}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="16384,32768", help="comma-separated N values")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweep", action="store_true", help="also time Triton tile configs and backward chunks")
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    out_dir = os.environ.get("OUT", "./bench-out")
    os.makedirs(out_dir, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_triton = device.type == "cuda" and triton_available()
    implementations = ("torch", "triton") if use_triton else ("torch",)
    result = {
        "env": {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(device),
                "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
        "config": {"H": args.hidden, "V": args.vocab, "dtype": "bfloat16", "warmup": args.warmup,
                   "repeats": args.repeats, "loss": "logp.sum() (entropy rows: random cotangent on logp and entropy)"},
    }
    if use_triton:
        import triton

        result["env"]["triton"] = triton.__version__
    print(f"env: {result['env']}", flush=True)
    started = time.time()

    print("accuracy vs naive float64 (N=777, H=256, V=5003, bias, temperature 0.7, logp+entropy cotangents,"
          " 1000-column chunks, 256-row blocks):")
    result["accuracy"] = accuracy_check(device, implementations)

    rows = []
    for n in (int(x) for x in args.tokens.split(",")):
        torch.manual_seed(0)
        print(f"N={n} H={args.hidden} V={args.vocab}:", flush=True)
        try:
            floor_ms = 4 * gemm_ms(n, args.hidden, args.vocab, device, args)
        except Exception as exc:  # noqa: BLE001
            rows.append({"N": n, "name": "gemm", **_error(exc)})
            continue
        rate = 2 * n * args.hidden * args.vocab / (floor_ms / 4 * 1e-3) / 1e12
        print(f"  [N,H]x[H,V] bf16 GEMM {floor_ms / 4:.3f} ms ({rate:.0f} TFLOP/s) -> 4-GEMM floor {floor_ms:.2f} ms")
        h = torch.randn(n, args.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(args.vocab, args.hidden, device=device, dtype=torch.bfloat16) * 0.02).requires_grad_()
        t = torch.randint(0, args.vocab, (n,), device=device)
        candidates = [] if args.skip_naive else [("naive (full logits)", naive, False)]
        candidates.append(("chunked torch", lambda h, w, t: token_logprobs(h, w, t, implementation="torch"), False))
        if use_triton:
            candidates += [
                ("triton", lambda h, w, t: token_logprobs(h, w, t, implementation="triton"), False),
                ("triton +entropy", lambda h, w, t: token_logprobs(
                    h, w, t, return_entropy=True, implementation="triton"), True),
            ]
        for name, fn, entropy in candidates:
            row = {"N": n, "gemm_TFLOPs": round(rate, 1), "floor_ms": round(floor_ms, 3),
                   **measure(name, fn, h, w, t, device, args, entropy=entropy)}
            if "median_ms" in row:
                row["x_floor"] = round(row["median_ms"] / floor_ms, 3)
            rows.append(row)
        if use_triton:  # LoRA case: the LM head is frozen, only grad_hidden (3 GEMMs)
            w.requires_grad_(False)
            row = measure("triton, frozen weight", lambda h, w, t: token_logprobs(h, w, t), h, w, t, device, args)
            rows.append({"N": n, "floor_ms": round(floor_ms * 3 / 4, 3), **row, "note": "floor = 3 GEMMs"})
            if "median_ms" in row:
                rows[-1]["x_floor"] = round(row["median_ms"] / (floor_ms * 3 / 4), 3)
            rows.append(forward_only(h, w, t, floor_ms / 4, device, args))
        del h, w, t
        _free(device)
    result["rows"] = rows
    if args.sweep and use_triton:
        print("sweep at the first N:", flush=True)
        result["sweep"] = sweep(int(args.tokens.split(",")[0]), args.hidden, args.vocab, device, args)
    result["wall_s"] = round(time.time() - started, 1)

    print(f"\n{'N':>6}  {'implementation':<34} {'fwd+bwd ms':>11} {'x floor':>8} {'extra MiB':>10}  status")
    for r in rows:
        print(f"{r['N']:>6}  {r['name']:<34} {r.get('median_ms', '-'):>11} {r.get('x_floor', '-'):>8} "
              f"{r.get('peak_extra_MiB', '-'):>10}  {r.get('status')}")
    path = os.path.join(out_dir, "logprobs.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

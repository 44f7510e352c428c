"""Per-token log-probabilities (and entropies) straight from hidden states, without [N, V] logits.

One public function, ``token_logprobs``, one autograd Function and one loop over row blocks × vocabulary
chunks. Per block, a GEMM (cuBLAS on GPU) writes the [rows, chunk] logits in the input dtype into a reused
buffer, exactly as the naive ``hidden @ weight.T`` rounds them, and an epilogue consumes them:

* forward: fold the block into each row's online-softmax state (running max, Σ e^(z-max), Σ e^(z-max)(z-max),
  target logit; Milakov & Gimelshein 2018, "Online normalizer calculation for softmax", alg. 3);
* backward: recompute the block, overwrite it with ∂/∂logits, and hand it to two more GEMMs.

The epilogues come in two implementations: ``torch`` (a few float32 temporaries per block; CPU and fallback)
and ``triton`` (``triton_logprobs.py``: one fused pass over the block, reading it once). The forward saves only
the [N] log-sum-exp (and the [N] entropy). Memory beyond inputs, outputs and gradients: one [rows, chunk] block
(plus the torch epilogue's float32 temporaries of that size) and a float32 [rows, H] grad-hidden accumulator.

The math, with z = (h·Wᵀ + b) / τ in float32, lse = log Σ_v exp z_v, p = exp(z - lse):
    logp_i   = z_{t_i} - lse
    H        = lse - Σ_v p_v z_v = log s - Σ_v e_v (z_v - m) / s     (m = max z, e = exp(z - m), s = Σ e)
    ∂logp/∂z = onehot(t) - p
    ∂H/∂z_v  = -p_v (z_v - Σ_u p_u z_u) = -p_v (logp_v + H)
and ∂/∂(h·Wᵀ + b) = ∂/∂z / τ. The entropy is accumulated relative to the running max (second form above), so
it does not cancel two numbers of the size of the logits.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Implementation = Literal["auto", "torch", "triton"]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TORCH_CHUNK = 4096
"""Default vocabulary chunk of the torch implementation."""
_TORCH_BLOCK_ELEMENTS = 1 << 22
"""rows × max(chunk, H) bound of the torch implementation: each float32 temporary of a block is <= 16 MiB."""


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    implementation: Implementation = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token (and the entropy of each row's distribution), logits never whole.

    Shapes: hidden [N, H] (float32, bfloat16, float16; float64 with the torch implementation), weight [V, H] and
    bias [V] of hidden's dtype, targets [N] int64 in [0, V). Returns logp [N] float32 (float64 for float64
    input), and entropy [N] of the same dtype when ``return_entropy``.

    Naive equivalent (the test oracle):
        z = (hidden @ weight.T + bias).float() / temperature
        logp = torch.log_softmax(z, -1).gather(-1, targets[:, None])[:, 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1)  with logp_all = torch.log_softmax(z, -1)
    The temperature divides the logits exactly as in sampling. Gradients flow to hidden, weight and bias (those
    that require grad) through both outputs; the backward recomputes the logits chunk by chunk.

    ``chunk_size``: vocabulary columns per block (default 4096 for torch, 8192 for triton); the row block is
    sized so that one block (and the [rows, H] float32 accumulator) stays at most 16 MiB (torch: float32
    temporaries) or 32M elements (triton: 64 MiB in bf16). ``implementation``: "auto" is triton on CUDA when
    Triton imports (and the dtype is not float64), torch otherwise; "triton" on CPU tensors needs
    ``TRITON_INTERPRET=1``. Logits must be finite (no -inf bias entries).
    """
    _check_inputs(hidden, weight, targets, bias, temperature, chunk_size)
    impl = _resolve(implementation, hidden)
    out = _TokenLogprobs.apply(hidden, weight, bias, targets, float(temperature), return_entropy, impl, chunk_size)
    return out if return_entropy else out[0]


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, return_entropy, impl, chunk_size):
        # The epilogues index per-row and per-column vectors densely; hidden and weight only meet GEMMs.
        targets = targets.contiguous()
        bias = None if bias is None else bias.contiguous()
        plan = _plan(impl, hidden, weight, chunk_size)
        logp, entropy, lse = chunked_forward(hidden, weight, bias, targets, temperature, return_entropy, plan)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.plan = temperature, plan
        ctx.set_materialize_grads(False)
        return (logp, entropy) if return_entropy else (logp,)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None or not any(needs):
            return None, None, None, None, None, None, None, None
        # A loss like logp.sum() hands back an expanded (stride-0) cotangent; kernels index it densely.
        grad_logp = None if grad_logp is None else grad_logp.contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.contiguous()
        grads = chunked_backward(
            hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
            temperature=ctx.temperature, plan=ctx.plan, needs=needs,
        )
        return (*grads, None, None, None, None, None)


# --------------------------------------------------------------------------------------------------------------
# The chunk loops, shared by both implementations
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Block sizes and the two per-block epilogues of one implementation."""

    rows: int
    chunk: int
    online_update: Callable[..., None]
    grad_logits: Callable[..., None]


def _plan(impl: str, hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int | None) -> _Plan:
    if impl == "torch":
        default_chunk, block_elements = _TORCH_CHUNK, _TORCH_BLOCK_ELEMENTS
        online_update, grad_logits = _torch_online_update, _torch_grad_logits
    else:
        tri = _triton()
        default_chunk, block_elements = tri.TRITON_CHUNK, tri.BLOCK_ELEMENTS
        online_update, grad_logits = tri.online_update, tri.grad_logits
    chunk = min(chunk_size or default_chunk, weight.shape[0])
    # The [rows, H] float32 grad-hidden accumulator obeys the same bound as the [rows, chunk] block.
    rows = max(1, min(hidden.shape[0], block_elements // max(chunk, hidden.shape[1])))
    return _Plan(rows, chunk, online_update, grad_logits)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_logits(hidden: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """hidden · weightᵀ into the front of ``buffer`` (a cuBLAS GEMM on GPU, rounded to the input dtype)."""
    out = buffer[: hidden.shape[0] * weight.shape[0]].view(hidden.shape[0], weight.shape[0])
    return torch.mm(hidden, weight.T, out=out)


def chunked_forward(hidden, weight, bias, targets, temperature, want_entropy, plan: _Plan):
    """(logp, entropy or None, lse), each [N]: one online-softmax state per row, updated chunk by chunk."""
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = _accumulation_dtype(hidden.dtype)
    # Per row: running max m, Σ e^(z-m), Σ e^(z-m)(z-m), target logit.
    state = torch.zeros(4, n, dtype=acc, device=hidden.device)
    state[0] = float("-inf")
    buffer = torch.empty(plan.rows * plan.chunk, dtype=hidden.dtype, device=hidden.device)
    for r0 in range(0, n, plan.rows):
        r1 = min(r0 + plan.rows, n)
        for c0 in range(0, vocab, plan.chunk):
            c1 = min(c0 + plan.chunk, vocab)
            logits = _block_logits(hidden[r0:r1], weight[c0:c1], buffer)
            plan.online_update(
                logits, None if bias is None else bias[c0:c1], targets[r0:r1], c0, state[:, r0:r1], temperature,
                want_entropy,
            )
    running_max, exp_sum, shifted_sum, target_logit = state
    log_sum = torch.log(exp_sum)
    lse = running_max + log_sum
    entropy = log_sum - shifted_sum / exp_sum if want_entropy else None
    return target_logit - lse, entropy, lse


def chunked_backward(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, *, temperature, plan, needs):
    """Gradients w.r.t. (hidden, weight, bias); None where ``needs`` is False.

    Row blocks outside, vocabulary chunks inside. Per block the logits are recomputed and overwritten in place
    by G = ∂/∂(h·Wᵀ + b) in the input dtype (the naive backward casts ∂/∂logits to it too), then
        grad_hidden[rows] += G·W[chunk]   (float32 accumulator of [rows, H])
        grad_weight[chunk] += Gᵀ·h[rows]  (in weight's dtype: one rounding per row block, one block when N is small)
        grad_bias[chunk] += Σ_rows G      (float32)
    """
    need_h, need_w, need_b = needs
    n, width = hidden.shape
    vocab = weight.shape[0]
    acc = _accumulation_dtype(hidden.dtype)
    grad_hidden = torch.empty_like(hidden) if need_h else None
    grad_weight = (torch.empty_like(weight) if n else torch.zeros_like(weight)) if need_w else None
    grad_bias = torch.zeros(vocab, dtype=acc, device=hidden.device) if need_b else None
    buffer = torch.empty(plan.rows * plan.chunk, dtype=hidden.dtype, device=hidden.device)
    accumulator = torch.empty(plan.rows, width, dtype=acc, device=hidden.device) if need_h else None
    for r0 in range(0, n, plan.rows):
        r1 = min(r0 + plan.rows, n)
        h = hidden[r0:r1]
        row_args = [None if x is None else x[r0:r1] for x in (targets, lse, entropy, grad_logp, grad_entropy)]
        if need_h:
            accumulator.zero_()
        for c0 in range(0, vocab, plan.chunk):
            c1 = min(c0 + plan.chunk, vocab)
            w = weight[c0:c1]
            g = _block_logits(h, w, buffer)
            plan.grad_logits(g, None if bias is None else bias[c0:c1], row_args[0], c0, *row_args[1:], temperature)
            if need_h:
                _add_product(accumulator[: r1 - r0], g, w)
            if need_w:
                grad_weight[c0:c1].addmm_(g.T, h, beta=0.0 if r0 == 0 else 1.0)  # beta=0 ignores the empty memory
            if need_b:
                grad_bias[c0:c1] += g.sum(0, dtype=acc)
        if need_h:
            grad_hidden[r0:r1] = accumulator[: r1 - r0]
    return grad_hidden, grad_weight, None if grad_bias is None else grad_bias.to(bias.dtype)


_MM_OUT_DTYPE = torch.torch_version.TorchVersion(torch.__version__) >= "2.8"
"""torch >= 2.8 has cuBLAS bf16/fp16 products with a float32 output on CUDA (``out_dtype``)."""


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a·b with acc in float32 (float64) and a, b in the input dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _MM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)  # accumulates in cuBLAS's float32 epilogue
    else:
        acc.add_(a @ b)  # one product rounded to the input dtype: about the error of the final rounding


# --------------------------------------------------------------------------------------------------------------
# torch epilogues
# --------------------------------------------------------------------------------------------------------------


def _scaled_logits(logits, bias, temperature, acc_dtype):
    """z = (x + b).float() / τ, rounded exactly as the naive expression rounds it."""
    return (logits if bias is None else logits + bias).to(acc_dtype) / temperature


def _torch_online_update(logits, bias, targets, col0, state, temperature, want_entropy):
    """Fold one [rows, chunk] block into the rows' online-softmax state (Milakov & Gimelshein, alg. 3)."""
    running_max, exp_sum, shifted_sum, target_logit = state
    z = _scaled_logits(logits, bias, temperature, state.dtype)
    new_max = torch.maximum(running_max, z.amax(-1))
    rescale = torch.exp(running_max - new_max)
    shifted = z - new_max[:, None]
    e = torch.exp(shifted)
    if want_entropy:
        # Σ e^(z-m_old)(z-m_old) re-expressed around m_new; nothing to carry while the sum is still empty.
        max_shift = torch.where(exp_sum > 0, running_max - new_max, 0.0)
        shifted_sum.copy_(rescale * (shifted_sum + max_shift * exp_sum) + (e * shifted).sum(-1))
    exp_sum.copy_(rescale * exp_sum + e.sum(-1))
    running_max.copy_(new_max)
    local = targets - col0
    inside = (local >= 0) & (local < z.shape[1])
    picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0]
    target_logit.add_(torch.where(inside, picked, 0.0))


def _torch_grad_logits(logits, bias, targets, col0, lse, entropy, grad_logp, grad_entropy, temperature):
    """Overwrite one block of logits with ∂(Σ g_logp·logp + g_H·H)/∂(h·Wᵀ + b) (float32 math)."""
    z = _scaled_logits(logits, bias, temperature, lse.dtype)
    logp_all = z - lse[:, None]
    p = torch.exp(logp_all)
    g = torch.zeros_like(z)
    if grad_logp is not None:
        g -= grad_logp[:, None] * p
        local = targets - col0
        inside = (local >= 0) & (local < z.shape[1])
        g.scatter_add_(1, local.clamp(0, z.shape[1] - 1)[:, None], torch.where(inside, grad_logp, 0.0)[:, None])
    if grad_entropy is not None:
        g -= grad_entropy[:, None] * p * (logp_all + entropy[:, None])
    logits.copy_(g / temperature)


# --------------------------------------------------------------------------------------------------------------
# dispatch and input checks
# --------------------------------------------------------------------------------------------------------------


def _triton():
    from . import triton_logprobs

    return triton_logprobs


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _resolve(implementation: str, hidden: torch.Tensor) -> str:
    if implementation == "auto":
        return "triton" if hidden.is_cuda and hidden.dtype != torch.float64 and triton_available() else "torch"
    if implementation == "torch":
        return "torch"
    if implementation != "triton":
        raise ValueError(f"implementation: expected 'auto', 'torch' or 'triton', got {implementation!r}")
    if not triton_available():
        raise ValueError("implementation='triton': triton is not installed")
    if not (hidden.is_cuda or _interpreting()):
        raise ValueError(f"implementation='triton': needs CUDA tensors or TRITON_INTERPRET=1, got {hidden.device}")
    if hidden.dtype == torch.float64:
        raise ValueError("implementation='triton': float64 is supported by implementation='torch' only")
    return "triton"


def _check_inputs(hidden, weight, targets, bias, temperature, chunk_size) -> None:
    if hidden.ndim != 2:
        raise ValueError(f"hidden: expected [N, H], got shape {tuple(hidden.shape)}")
    n, width = hidden.shape
    if hidden.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"hidden: dtype {hidden.dtype} not supported (float32, bfloat16, float16, float64)")
    if weight.ndim != 2 or weight.shape[1] != width:
        raise ValueError(f"weight: expected [V, {width}] to match hidden [N, H], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight: the vocabulary is empty (V = 0)")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if targets.shape != (n,):
        raise ValueError(f"targets: expected [{n}] to match hidden [N, H], got shape {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets: expected int64 token ids, got {targets.dtype}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: expected [{weight.shape[0]}] to match weight [V, H], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias: dtype {bias.dtype} differs from weight's {weight.dtype}")
    for name, tensor in (("weight", weight), ("targets", targets), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name}: on {tensor.device}, hidden on {hidden.device}")
    if isinstance(temperature, torch.Tensor) or not float(temperature) > 0 or temperature == float("inf"):
        raise ValueError(f"temperature: expected a finite float > 0, got {temperature!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    if n:
        low, high = torch.stack(torch.aminmax(targets)).tolist()  # one device sync
        if low < 0 or high >= weight.shape[0]:
            raise ValueError(f"targets: ids must lie in [0, {weight.shape[0]}), got min {low}, max {high}")

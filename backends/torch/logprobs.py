"""Per-token log-probabilities (and entropies) straight from hidden states, without [N, V] logits.

One public function, ``token_logprobs``. Two implementations behind it, sharing one autograd Function:

* ``torch``: a loop over row blocks × vocabulary chunks with an online log-sum-exp (Milakov & Gimelshein
  2018, "Online normalizer calculation for softmax", alg. 3), accumulating in float32 (float64 for float64 input).
* ``triton`` (``triton_logprobs.py``): a fused Triton forward; the backward recomputes one grad-logits chunk
  in a Triton kernel and hands it to cuBLAS for the two weight-sized products.

Both save only the [N] log-sum-exp (and the [N] entropy) for the backward, which recomputes the logits chunk by
chunk. Memory beyond inputs, outputs and gradients: one [rows, chunk] block of logits (torch: a few float32
temporaries of that size; triton: one bf16 grad-logits buffer) plus a float32 [rows, H] grad-hidden accumulator.

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
from typing import Literal

import torch

Implementation = Literal["auto", "torch", "triton"]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TORCH_CHUNK = 4096
"""Default vocabulary chunk of the torch implementation."""
_CHUNK_ELEMENTS = 1 << 22
"""rows × chunk elements of one logits block (16 MiB in float32); the row block is derived from it."""


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
    sized so that one block of logits stays small. ``implementation``: "auto" is triton on CUDA when Triton
    imports, torch otherwise; "triton" on CPU tensors needs ``TRITON_INTERPRET=1``.
    """
    _check_inputs(hidden, weight, targets, bias, temperature, chunk_size)
    impl = _resolve(implementation, hidden)
    out = _TokenLogprobs.apply(hidden, weight, bias, targets, float(temperature), return_entropy, impl, chunk_size)
    return out if return_entropy else out[0]


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, return_entropy, impl, chunk_size):
        forward_fn = _chunked_forward if impl == "torch" else _triton().forward
        logp, entropy, lse = forward_fn(hidden, weight, bias, targets, temperature, return_entropy, chunk_size)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.impl, ctx.chunk_size = temperature, impl, chunk_size
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
            temperature=ctx.temperature, impl=ctx.impl, chunk_size=ctx.chunk_size, needs=needs,
        )
        return (*grads, None, None, None, None, None)


# --------------------------------------------------------------------------------------------------------------
# torch implementation
# --------------------------------------------------------------------------------------------------------------


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_block(num_rows: int, chunk: int, chunk_elements: int) -> int:
    return max(1, min(num_rows, chunk_elements // chunk))


def _logits(hidden, weight, bias, temperature, acc_dtype):
    """One block of z = (h·Wᵀ + b).float() / τ, rounded exactly as the naive expression rounds it."""
    x = hidden @ weight.T
    if bias is not None:
        x = x + bias
    return x.to(acc_dtype) / temperature


def _chunked_forward(hidden, weight, bias, targets, temperature, want_entropy, chunk_size):
    """Online log-sum-exp over vocabulary chunks; per row block keeps (max m, Σ e^(z-m), Σ e^(z-m)(z-m), z_t)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    chunk = min(chunk_size or _TORCH_CHUNK, vocab)
    rows = _row_block(n, chunk, _CHUNK_ELEMENTS)
    acc = _accumulation_dtype(hidden.dtype)
    lse = torch.empty(n, dtype=acc, device=hidden.device)
    logp = torch.empty_like(lse)
    entropy = torch.empty_like(lse) if want_entropy else None
    for r0 in range(0, n, rows):
        h, t = hidden[r0 : r0 + rows], targets[r0 : r0 + rows]
        # A finite start for the running max keeps (m_old - m_new)·s = 0 on the first chunk (s = 0 there).
        m = torch.full((h.shape[0],), torch.finfo(acc).min, dtype=acc, device=h.device)
        s, a, z_target = torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
        for c0 in range(0, vocab, chunk):
            z = _logits(h, weight[c0 : c0 + chunk], None if bias is None else bias[c0 : c0 + chunk], temperature, acc)
            m_new = torch.maximum(m, z.amax(-1))
            rescale = torch.exp(m - m_new)
            shifted = z - m_new[:, None]
            e = torch.exp(shifted)
            if want_entropy:
                a = rescale * (a + (m - m_new) * s) + (e * shifted).sum(-1)
            s = rescale * s + e.sum(-1)
            m = m_new
            inside = (t >= c0) & (t < c0 + z.shape[1])
            picked = z.gather(1, (t - c0).clamp(0, z.shape[1] - 1)[:, None])[:, 0]
            z_target = torch.where(inside, picked, z_target)
        log_s = torch.log(s)
        lse[r0 : r0 + rows] = m + log_s
        logp[r0 : r0 + rows] = z_target - (m + log_s)
        if want_entropy:
            entropy[r0 : r0 + rows] = log_s - a / s
    return logp, entropy, lse


def _torch_grad_logits(h, w, b, t, col0, lse, entropy, grad_logp, grad_entropy, temperature, out):
    """out[:] = ∂(Σ g_logp·logp + g_H·H)/∂(h·Wᵀ + b) for one block, in out's dtype (float32 math)."""
    z = _logits(h, w, b, temperature, lse.dtype)
    logp_all = z - lse[:, None]
    p = torch.exp(logp_all)
    g = torch.zeros_like(z)
    if grad_logp is not None:
        g -= grad_logp[:, None] * p
        inside = (t >= col0) & (t < col0 + z.shape[1])
        local = (t - col0).clamp(0, z.shape[1] - 1)[:, None]
        g.scatter_add_(1, local, torch.where(inside, grad_logp, 0.0).to(g.dtype)[:, None])
    if grad_entropy is not None:
        g -= grad_entropy[:, None] * p * (logp_all + entropy[:, None])
    out.copy_(g / temperature)


def chunked_backward(
    hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, *, temperature, impl, chunk_size, needs
):
    """Gradients w.r.t. (hidden, weight, bias); None where ``needs`` is False.

    Row blocks outside, vocabulary chunks inside. Per block, the grad-logits G [rows, chunk] is recomputed in
    the input dtype (the naive backward casts ∂/∂logits to it too), then
        grad_hidden[rows] += G·W[chunk]   (float32 accumulator of [rows, H])
        grad_weight[chunk] += Gᵀ·h[rows]  (in weight's dtype; a single product when all rows fit one block)
        grad_bias[chunk] += Σ_rows G      (float32)
    """
    need_h, need_w, need_b = needs
    n, width = hidden.shape
    vocab = weight.shape[0]
    acc = _accumulation_dtype(hidden.dtype)
    if impl == "torch":
        chunk = min(chunk_size or _TORCH_CHUNK, vocab)
        rows = _row_block(n, chunk, _CHUNK_ELEMENTS)
        grad_logits_fn = _torch_grad_logits
    else:
        tri = _triton()
        chunk, rows = tri.backward_blocks(n, vocab, chunk_size)
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        grad_logits_fn = tri.grad_logits
    grad_hidden = torch.empty_like(hidden) if need_h else None
    grad_weight = torch.empty_like(weight) if need_w else None
    grad_bias = torch.zeros(vocab, dtype=acc, device=hidden.device) if need_b else None
    buffer = torch.empty(min(rows, n), chunk, dtype=hidden.dtype, device=hidden.device)
    accumulator = torch.empty(min(rows, n), width, dtype=acc, device=hidden.device) if need_h else None
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        h, t = hidden[r0:r1], targets[r0:r1]
        row_args = (
            lse[r0:r1],
            None if entropy is None else entropy[r0:r1],
            None if grad_logp is None else grad_logp[r0:r1],
            None if grad_entropy is None else grad_entropy[r0:r1],
        )
        gh = accumulator[: r1 - r0].zero_() if need_h else None
        for c0 in range(0, vocab, chunk):
            c1 = min(c0 + chunk, vocab)
            w, b = weight[c0:c1], None if bias is None else bias[c0:c1]
            g = buffer[: r1 - r0, : c1 - c0]
            grad_logits_fn(h, w, b, t, c0, *row_args, temperature, g)
            if need_h:
                # One product rounded to the input dtype, summed in float32: the error of one final rounding.
                gh.add_(g @ w)
            if need_w:
                grad_weight[c0:c1].addmm_(g.T, h, beta=0.0 if r0 == 0 else 1.0)
            if need_b:
                grad_bias[c0:c1] += g.sum(0, dtype=acc)
        if need_h:
            grad_hidden[r0:r1] = gh
    if n == 0:
        grad_weight = grad_weight.zero_() if need_w else None
    return grad_hidden, grad_weight, None if grad_bias is None else grad_bias.to(bias.dtype)


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
        return "triton" if hidden.is_cuda and triton_available() else "torch"
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
    if n and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(
            f"targets: ids must lie in [0, {weight.shape[0]}), got min {int(targets.min())}, max {int(targets.max())}"
        )

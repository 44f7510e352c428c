"""Triton epilogues of ``token_logprobs(..., implementation="triton")`` (logprobs.py states the math and the loop).

The four GEMMs of the op (logits, their recompute, grad-hidden, grad-weight) run in cuBLAS; these kernels fuse
everything between them into one pass over each [rows, chunk] block of logits:

* ``online_update`` reads the block once and folds it into each row's online-softmax state;
* ``grad_logits`` reads the block once and overwrites it with
      G = (g_logp·(onehot(t) - p) - g_H·p·(logp_v + H)) / τ,   p = exp(z - lse), z = (x + b) / τ.

Why not fuse the GEMMs too: on an H200 (Triton 3.6, torch 2.11) a Triton ``tl.dot`` forward with the online
softmax in its epilogue ran the N=16384, H=4096, V=128256 logits in 36 ms and the grad-logits recompute in 49 ms,
against 25 ms for the cuBLAS GEMM; the extra pass over the block costs ~1 ms per direction (bench/logprobs.py).

Each program owns BLOCK_M rows and walks the block's columns in BLOCK_N tiles, so per-row values (state, lse,
entropy, cotangents, target) are loaded once. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors
with small tiles (the tests' path).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .logprobs import _interpreting

TRITON_CHUNK = 8192
"""Default vocabulary chunk: with H = 4096, a 4096 × 8192 bf16 block (64 MiB) per GEMM."""
BLOCK_ELEMENTS = 1 << 25
"""rows × max(chunk, H) bound: the bf16 block stays at or under 64 MiB, the float32 accumulator under 128 MiB."""

_TILES = dict(BLOCK_M=8, BLOCK_N=1024, num_warps=8)
_INTERPRETER_TILES = dict(BLOCK_M=16, BLOCK_N=64, num_warps=1)


def _tiles() -> dict:
    return _INTERPRETER_TILES if _interpreting() else _TILES


@triton.jit
def _load_scaled_logits(logits_ptr, bias_ptr, rows, cols, col_ok, stride_logits, temperature,
                        HAS_BIAS: tl.constexpr):
    """z = (x + b) / τ in float32 for one [BLOCK_M, BLOCK_N] tile; -inf outside the block's columns."""
    x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_logits + cols[None, :],
                mask=col_ok[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], x / temperature, float("-inf"))


@triton.jit
def _online_update_kernel(
    logits_ptr, bias_ptr, targets_ptr, state_ptr,
    n_rows, n_cols, col0, stride_logits, stride_state, temperature,
    HAS_BIAS: tl.constexpr, WANT_ENTROPY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, 0)
    running_max = tl.load(state_ptr + rows)
    exp_sum = tl.load(state_ptr + stride_state + rows)
    shifted_sum = tl.load(state_ptr + 2 * stride_state + rows)  # Σ e^(z-max)·(z-max), for the entropy
    target_logit = tl.load(state_ptr + 3 * stride_state + rows)
    local_target = tl.load(targets_ptr + rows) - col0
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        z = _load_scaled_logits(logits_ptr, bias_ptr, rows, cols, col_ok, stride_logits, temperature, HAS_BIAS)
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        rescale = tl.exp(running_max - new_max)
        shifted = tl.where(col_ok[None, :], z - new_max[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)
        if WANT_ENTROPY:
            # Σ e^(z-m_old)(z-m_old) re-expressed around m_new; nothing to carry while the sum is still empty.
            max_shift = tl.where(exp_sum > 0, running_max - new_max, 0.0)
            shifted_sum = rescale * (shifted_sum + max_shift * exp_sum) + tl.sum(e * shifted, axis=1)
        exp_sum = rescale * exp_sum + tl.sum(e, axis=1)
        running_max = new_max
        # col_ok: a target in a later chunk has a local index past this block's columns, inside the tile
        is_target = (cols[None, :] == local_target[:, None]) & col_ok[None, :]
        target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)
    tl.store(state_ptr + rows, running_max, mask=row_ok)
    tl.store(state_ptr + stride_state + rows, exp_sum, mask=row_ok)
    if WANT_ENTROPY:
        tl.store(state_ptr + 2 * stride_state + rows, shifted_sum, mask=row_ok)
    tl.store(state_ptr + 3 * stride_state + rows, target_logit, mask=row_ok)


@triton.jit
def _grad_logits_kernel(
    logits_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    n_rows, n_cols, col0, stride_logits, temperature,
    HAS_BIAS: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, 0)
    lse = tl.load(lse_ptr + rows)
    if HAS_GRAD_LOGP:
        grad_logp = tl.load(grad_logp_ptr + rows)
        local_target = tl.load(targets_ptr + rows) - col0
    if HAS_GRAD_ENTROPY:
        grad_entropy = tl.load(grad_entropy_ptr + rows)
        entropy = tl.load(entropy_ptr + rows)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        z = _load_scaled_logits(logits_ptr, bias_ptr, rows, cols, col_ok, stride_logits, temperature, HAS_BIAS)
        logp = z - lse[:, None]
        p = tl.exp(logp)
        g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_GRAD_LOGP:
            onehot = tl.where((cols[None, :] == local_target[:, None]) & col_ok[None, :], 1.0, 0.0)
            g += grad_logp[:, None] * (onehot - p)
        if HAS_GRAD_ENTROPY:
            g -= grad_entropy[:, None] * p * tl.where(col_ok[None, :], logp + entropy[:, None], 0.0)
        out_ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_logits + cols[None, :]
        tl.store(out_ptrs, (g / temperature).to(logits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def online_update(logits, bias, targets, col0, state, temperature, want_entropy):
    """Fold logits [rows, chunk] (columns col0.. of the vocabulary) into state [4, rows] in place."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    tiles = _tiles()
    _online_update_kernel[(triton.cdiv(n_rows, tiles["BLOCK_M"]),)](
        logits, logits if bias is None else bias, targets, state,
        n_rows, n_cols, col0, logits.stride(0), state.stride(0), temperature,
        HAS_BIAS=bias is not None, WANT_ENTROPY=want_entropy, **tiles,
    )


def grad_logits(logits, bias, targets, col0, lse, entropy, grad_logp, grad_entropy, temperature):
    """Overwrite logits [rows, chunk] with ∂(Σ g_logp·logp + g_H·H)/∂(h·Wᵀ + b), in their dtype."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    tiles = _tiles()
    _grad_logits_kernel[(triton.cdiv(n_rows, tiles["BLOCK_M"]),)](
        logits, logits if bias is None else bias, targets, lse,
        lse if entropy is None else entropy, lse if grad_logp is None else grad_logp,
        lse if grad_entropy is None else grad_entropy,
        n_rows, n_cols, col0, logits.stride(0), temperature,
        HAS_BIAS=bias is not None, HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        **tiles,
    )

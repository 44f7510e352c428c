"""Triton kernels behind ``token_logprobs(..., implementation="triton")`` (logprobs.py states the math).

Forward, one kernel: each program owns BLOCK_M rows and one contiguous range ("split") of vocabulary tiles;
per tile it computes the [BLOCK_M, BLOCK_N] logits with ``tl.dot`` over H and folds them into an online
(max, Σ e^(z-max), Σ e^(z-max)(z-max)) state, picking the target logit on the way. The splits give the GPU
enough programs when N is small (a micro-batch of a few thousand tokens is only tens of row blocks); their
states are merged on the host over a [splits, N] array, which is tiny.

Backward: ``grad_logits`` recomputes one [rows, chunk] block of logits in a Triton GEMM whose epilogue writes
    G = (g_logp·(onehot - p) - g_H·p·(logp_v + H)) / τ
in the input dtype into a buffer; logprobs.chunked_backward then calls cuBLAS for G·W (grad_hidden) and Gᵀ·h
(grad_weight). Two of the four GEMMs of the op run in cuBLAS at its full rate, and no atomics are needed.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors with small tiles (the tests' path).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .logprobs import _interpreting

TRITON_CHUNK = 8192
"""Default vocabulary chunk of the backward buffer."""
_BUFFER_ELEMENTS = 1 << 25
"""rows × max(chunk, H) bound: the bf16 grad-logits buffer stays at or under 64 MiB, the float32 grad-hidden
accumulator under 128 MiB."""


@dataclass(frozen=True)
class _Tiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Hopper-sized tiles (wgmma wants BLOCK_M a multiple of 64, 8 warps for 128-row tiles).
FORWARD_TILES = _Tiles(128, 128, 64, 8, 4)
BACKWARD_TILES = _Tiles(128, 256, 64, 8, 3)
_INTERPRETER_TILES = _Tiles(16, 32, 16, 1, 1)
_GROUP_M = 8


def _tiles(default: _Tiles) -> _Tiles:
    return _INTERPRETER_TILES if _interpreting() else default


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 input must not be rounded to tf32: the naive reference multiplies in full float32.
    return "ieee" if dtype == torch.float32 else "tf32"


# Triton's interpreter (3.9) multiplies bfloat16 dot operands as their raw uint16 bits
# (interpreter.py, InterpreterBuilder.create_dot); it gets float32 operands instead. Exact: the product of two
# bfloat16 numbers is representable in float32, and the GPU's tensor cores accumulate it in float32 too.
def _upcast_dot() -> bool:
    return _interpreting()


def _target_programs(device: torch.device) -> int:
    if _interpreting():
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, rows, cols, width, stride_h, stride_w,
                 EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32 tile of hidden[rows] · weight[cols]ᵀ (rows, cols already in range)."""
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_h + ks[None, :]
    w_ptrs = weight_ptr + cols.to(tl.int64)[None, :] * stride_w + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(width, BLOCK_K)):
        if EVEN_K:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = ks < width - k * BLOCK_K
            h = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST_DOT:
            acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
    max_ptr, sum_ptr, shifted_sum_ptr, target_logit_ptr,
    n_rows, vocab, width, tiles_per_split, num_splits, stride_h, stride_w, temperature,
    HAS_BIAS: tl.constexpr, WANT_ENTROPY: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Consecutive programs share a row block and walk different splits: the row block stays in L2.
    pid = tl.program_id(0)
    split = pid % num_splits
    rows = (pid // num_splits) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, 0)
    targets = tl.load(targets_ptr + rows)

    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    exp_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    shifted_sum = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ e^(z-max)·(z-max), for the entropy
    target_logit = tl.zeros([BLOCK_M], dtype=tl.float32)
    first_tile = split * tiles_per_split
    end_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(vocab, BLOCK_N))
    for tile in range(first_tile, end_tile):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < vocab
        cols = tl.where(col_ok, cols, 0)
        acc = _logits_tile(hidden_ptr, weight_ptr, rows, cols, width, stride_h, stride_w,
                           EVEN_K, DOT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], acc / temperature, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        rescale = tl.exp(running_max - new_max)
        shifted = tl.where(col_ok[None, :], z - new_max[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)
        if WANT_ENTROPY:
            # Σ e^(z-m_old)(z-m_old) re-expressed around m_new; nothing to carry while exp_sum is still 0.
            max_shift = tl.where(exp_sum > 0, running_max - new_max, 0.0)
            shifted_sum = rescale * (shifted_sum + max_shift * exp_sum) + tl.sum(e * shifted, axis=1)
        exp_sum = rescale * exp_sum + tl.sum(e, axis=1)
        running_max = new_max
        is_target = (tile * BLOCK_N + tl.arange(0, BLOCK_N))[None, :] == targets[:, None]
        target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)

    offsets = split * n_rows + rows
    tl.store(max_ptr + offsets, running_max, mask=row_ok)
    tl.store(sum_ptr + offsets, exp_sum, mask=row_ok)
    if WANT_ENTROPY:
        tl.store(shifted_sum_ptr + offsets, shifted_sum, mask=row_ok)
    in_split = (targets >= first_tile * BLOCK_N) & (targets < end_tile * BLOCK_N)
    tl.store(target_logit_ptr + rows, target_logit, mask=row_ok & in_split)


@triton.jit
def _grad_logits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, out_ptr,
    n_rows, n_cols, width, col0, stride_h, stride_w, stride_out, temperature,
    HAS_BIAS: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order (Triton's matmul tutorial): GROUP_M row tiles reuse each weight tile from L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(n_rows, BLOCK_M)
    grid_n = tl.cdiv(n_cols, BLOCK_N)
    group_width = GROUP_M * grid_n
    first_m = (pid // group_width) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_width) % group_m
    pid_n = (pid % group_width) // group_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    rows = tl.where(row_ok, rows, 0)
    cols = tl.where(col_ok, cols, 0)
    acc = _logits_tile(hidden_ptr, weight_ptr, rows, cols, width, stride_h, stride_w,
                       EVEN_K, DOT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    logp = acc / temperature - tl.load(lse_ptr + rows)[:, None]
    p = tl.exp(logp)
    g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_GRAD_LOGP:
        local_target = tl.load(targets_ptr + rows) - col0
        onehot = tl.where(cols[None, :] == local_target[:, None], 1.0, 0.0)
        g += tl.load(grad_logp_ptr + rows)[:, None] * (onehot - p)
    if HAS_GRAD_ENTROPY:
        entropy = tl.load(entropy_ptr + rows)
        g -= tl.load(grad_entropy_ptr + rows)[:, None] * p * (logp + entropy[:, None])
    g = g / temperature
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, g.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def forward(hidden, weight, bias, targets, temperature, want_entropy, chunk_size):
    """(logp [N], entropy [N] or None, lse [N]), float32. ``chunk_size`` concerns the backward only."""
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    n, width = hidden.shape
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    if n == 0:
        empty = torch.empty(0, **f32)
        return empty, (empty.clone() if want_entropy else None), empty.clone()
    tiles = _tiles(FORWARD_TILES)
    vocab_tiles = triton.cdiv(vocab, tiles.block_n)
    row_blocks = triton.cdiv(n, tiles.block_m)
    splits = min(vocab_tiles, max(1, triton.cdiv(_target_programs(hidden.device), row_blocks)))
    tiles_per_split = triton.cdiv(vocab_tiles, splits)
    splits = triton.cdiv(vocab_tiles, tiles_per_split)
    state = torch.empty(3, splits, n, **f32)  # per split: max, Σ e^(z-max), Σ e^(z-max)(z-max)
    target_logit = torch.empty(n, **f32)
    _forward_kernel[(row_blocks * splits,)](
        hidden, weight, hidden if bias is None else bias.contiguous(), targets,
        state[0], state[1], state[2], target_logit,
        n, vocab, width, tiles_per_split, splits, hidden.stride(0), weight.stride(0), temperature,
        HAS_BIAS=bias is not None, WANT_ENTROPY=want_entropy, EVEN_K=width % tiles.block_k == 0,
        DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST_DOT=_upcast_dot(),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    # Merge the splits' online states (every split holds at least one column, so each Σ is > 0).
    split_max, split_sum, split_shifted = state
    row_max = split_max.amax(0)
    weight_of_split = torch.exp(split_max - row_max)
    exp_sum = (weight_of_split * split_sum).sum(0)
    log_sum = torch.log(exp_sum)
    lse = row_max + log_sum
    entropy = None
    if want_entropy:
        shifted = (weight_of_split * (split_shifted + (split_max - row_max) * split_sum)).sum(0)
        entropy = log_sum - shifted / exp_sum
    return target_logit - lse, entropy, lse


def backward_blocks(n_rows: int, vocab: int, chunk_size: int | None) -> tuple[int, int]:
    """(vocabulary chunk, row block) of the backward's grad-logits buffer."""
    chunk = min(chunk_size or TRITON_CHUNK, vocab)
    return chunk, max(1, min(n_rows, _BUFFER_ELEMENTS // chunk))


def grad_logits(hidden, weight, bias, targets, col0, lse, entropy, grad_logp, grad_entropy, temperature, out):
    """out [rows, chunk] (input dtype) = ∂/∂(h·Wᵀ + b) of Σ g_logp·logp + g_H·H for one block."""
    n_rows, n_cols = out.shape
    width = hidden.shape[1]
    if n_rows == 0:
        return
    tiles = _tiles(BACKWARD_TILES)
    grid = (triton.cdiv(n_rows, tiles.block_m) * triton.cdiv(n_cols, tiles.block_n),)
    some_row_vector = lse
    _grad_logits_kernel[grid](
        hidden, weight, lse if bias is None else bias, targets, lse,
        some_row_vector if entropy is None else entropy,
        some_row_vector if grad_logp is None else grad_logp,
        some_row_vector if grad_entropy is None else grad_entropy,
        out,
        n_rows, n_cols, width, col0, hidden.stride(0), weight.stride(0), out.stride(0), temperature,
        HAS_BIAS=bias is not None, HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        EVEN_K=width % tiles.block_k == 0, DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST_DOT=_upcast_dot(),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=_GROUP_M,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )

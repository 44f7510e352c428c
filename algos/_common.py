"""Shared primitives of the four algorithms, written once against the Python array API.

Every function here accepts NumPy, JAX or torch arrays (``array_api_compat.array_namespace``) and lets
``jax.grad`` and torch autograd flow through. Nothing imports jax or torch at module import time.

Spec: spec/common.md (checks, masked reductions, NaN-aware statistics, KL estimators, whitening,
aggregation of per-token losses). TRL semantics: shared/reference/trl.md §1–§2.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Literal

import array_api_compat
from array_api_compat import array_namespace

Array = Any
Metrics = dict[str, Array]
KLEstimator = Literal["k1", "k2", "k3"]


# --------------------------------------------------------------------------------------------
# Gradient control and input checks
# --------------------------------------------------------------------------------------------

def stop_gradient(x: Array) -> Array:
    """sg[x]: the value of ``x`` as a constant (spec/common.md eq. 15): torch ``.detach()``, ``jax.lax.stop_gradient``,
    NumPy identity."""
    if array_api_compat.is_torch_array(x):
        return x.detach()
    if array_api_compat.is_jax_array(x):
        import jax  # already imported by whoever made a jax array

        return jax.lax.stop_gradient(x)
    return x


def check_shapes(**named: tuple[Array | None, str]) -> dict[str, int]:
    """Check ``name=(array, "B T")`` pairs against one consistent binding of the symbolic dims.

    ``None`` arrays are skipped; the first array that has a dim binds it, so list the main input first.
    Returns the binding, e.g. ``{"B": 4, "T": 7}``.
    Raises ``ValueError`` naming the first argument whose rank or size disagrees.
    """
    dims: dict[str, int] = {}
    origin: dict[str, str] = {}
    for name, (array, spec) in named.items():
        if array is None:
            continue
        symbols = spec.split()
        shape = tuple(array.shape)
        if len(shape) != len(symbols):
            raise ValueError(f"{name}: expected shape [{', '.join(symbols)}] (rank {len(symbols)}), got {shape}")
        for symbol, size in zip(symbols, shape):
            if symbol in dims and dims[symbol] != size:
                raise ValueError(
                    f"{name}: expected shape [{', '.join(symbols)}] with {symbol}={dims[symbol]} "
                    f"(from {origin[symbol]}), got {shape}"
                )
            dims.setdefault(symbol, size)
            origin.setdefault(symbol, name)
    return dims


def check_float(**named: Array | None) -> None:
    """Check that all given arrays are real floating and share one dtype (``None`` skipped)."""
    first: tuple[str, Any] | None = None
    for name, array in named.items():
        if array is None:
            continue
        xp = array_namespace(array)
        if not xp.isdtype(array.dtype, "real floating"):
            raise ValueError(f"{name}: expected a real floating dtype, got {array.dtype}")
        if first is None:
            first = (name, array.dtype)
        elif array.dtype != first[1]:
            raise ValueError(f"{name}: dtype {array.dtype} differs from {first[0]} ({first[1]})")


def check_mask(mask: Array, like: Array, name: str = "mask") -> None:
    """A mask is bool, or floating with the dtype of ``like`` (1 = active)."""
    xp = array_namespace(mask)
    if mask.dtype != xp.bool and mask.dtype != like.dtype:
        raise ValueError(f"{name}: expected bool or {like.dtype} (the dtype of the log-probs), got {mask.dtype}")


def check_clipped_surrogate_config(config: Any) -> None:
    """Ranges shared by the configs of clipped-surrogate algorithms (GRPO, RLOO); messages name the field."""
    if not 0 <= config.epsilon < 1:
        raise ValueError(f"epsilon: expected 0 <= epsilon < 1, got {config.epsilon}")
    if config.epsilon_high is not None and config.epsilon_high < 0:
        raise ValueError(f"epsilon_high: expected >= 0, got {config.epsilon_high}")
    for name in ("beta", "advantage_epsilon", "std_ddof"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name}: expected >= 0, got {getattr(config, name)}")


def check_group_size(batch_size: int, num_generations: int) -> None:
    """Groups are contiguous rows [kG, (k+1)G): G must be a positive integer dividing B."""
    if not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations: expected a positive int, got {num_generations!r}")
    if batch_size % num_generations != 0:
        raise ValueError(f"num_generations: {num_generations} does not divide the batch size B={batch_size}")


def as_bool(mask: Array) -> Array:
    xp = array_namespace(mask)
    return mask if mask.dtype == xp.bool else mask != 0


def as_float(mask: Array, dtype: Any) -> Array:
    xp = array_namespace(mask)
    return xp.astype(mask, dtype)


# --------------------------------------------------------------------------------------------
# Masked and NaN-aware reductions
# --------------------------------------------------------------------------------------------

def masked_sum(x: Array, mask: Array, axis: int | None = None) -> Array:
    """Σ x over active positions; inactive positions contribute exactly 0 (even if x is not finite there)."""
    xp = array_namespace(x, mask)
    return xp.sum(xp.where(as_bool(mask), x, xp.zeros_like(x)), axis=axis)


def masked_mean(x: Array, mask: Array, axis: int | None = None) -> Array:
    """Σ m·x / max(1, Σ m): the mean over active positions, 0 where none is active."""
    xp = array_namespace(x, mask)
    count = xp.sum(as_float(as_bool(mask), x.dtype), axis=axis)
    return masked_sum(x, mask, axis=axis) / xp.clip(count, min=1.0)


def masked_var(x: Array, mask: Array, *, ddof: int) -> Array:
    """Variance over active positions with Σ(x-μ)²/(n - ddof) (spec/common.md eq. 13); 0 when n <= ddof."""
    xp = array_namespace(x, mask)
    count = xp.sum(as_float(as_bool(mask), x.dtype))
    centered = x - masked_mean(x, mask)
    squares = masked_sum(centered * centered, mask)
    return xp.where(count > ddof, squares / xp.clip(count - ddof, min=1.0), xp.zeros_like(squares))


def whiten(x: Array, mask: Array, *, ddof: int = 1, eps: float = 1e-8, shift_mean: bool = True) -> Array:
    """(x - μ_m) / sqrt(σ²_m + eps) over active positions (spec/common.md eq. 14; TRL ``masked_whiten``).

    μ_m, σ²_m: masked mean and variance with ``ddof`` (TRL: Bessel, ddof=1). ``shift_mean=False`` adds μ_m back.
    Inactive positions are returned unchanged in value (callers zero them where the spec says so).
    """
    xp = array_namespace(x, mask)
    mean = masked_mean(x, mask)
    whitened = (x - mean) / xp.sqrt(masked_var(x, mask, ddof=ddof) + eps)
    return whitened if shift_mean else whitened + mean


def nan_count(x: Array, axis: int | None = None) -> Array:
    xp = array_namespace(x)
    return xp.sum(as_float(~xp.isnan(x), x.dtype), axis=axis, keepdims=True)


def nansum(x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
    xp = array_namespace(x)
    return xp.sum(xp.where(xp.isnan(x), xp.zeros_like(x), x), axis=axis, keepdims=keepdims)


def nanmean(x: Array, axis: int | None = None) -> Array:
    """Mean of the non-NaN values (keepdims); NaN when there are none (spec/common.md eq. 9, ``torch.nanmean``)."""
    xp = array_namespace(x)
    count = nan_count(x, axis)
    total = nansum(x, axis=axis, keepdims=True)
    return xp.where(count > 0, total / xp.clip(count, min=1.0), xp.full_like(total, math.nan))


def nanstd(x: Array, axis: int | None = None, *, ddof: int) -> Array:
    """Standard deviation of the non-NaN values with Σ(x-μ)²/(n - ddof) (keepdims; spec/common.md eq. 9).

    NaN when n <= ddof: TRL's ``nanstd`` (ddof=1) gives NaN for fewer than two values (trl.md §2.2).
    """
    xp = array_namespace(x)
    count = nan_count(x, axis)
    centered = x - nanmean(x, axis)
    squares = nansum(centered * centered, axis=axis, keepdims=True)
    var = squares / xp.clip(count - ddof, min=1.0)
    return xp.where(count > ddof, xp.sqrt(var), xp.full_like(var, math.nan))


def nan_to_zero(x: Array) -> Array:
    xp = array_namespace(x)
    return xp.where(xp.isnan(x), xp.zeros_like(x), x)


def combine_rewards(rewards_per_func: Array, weights: Array) -> Array:
    """R_i = Σ_k^nan w_k r_ik, NaN if every r_ik is NaN (spec/common.md eq. 8; trl.md §1.4, §2.2).

    Shapes: rewards_per_func [B, K], weights [K] -> [B].
    """
    check_shapes(rewards_per_func=(rewards_per_func, "B K"), weights=(weights, "K"))
    check_float(rewards_per_func=rewards_per_func, weights=weights)
    xp = array_namespace(rewards_per_func, weights)
    total = nansum(rewards_per_func * weights[None, :], axis=1)
    unscorable = xp.all(xp.isnan(rewards_per_func), axis=1)
    return xp.where(unscorable, xp.full_like(total, math.nan), total)


def apply_missing_eos_penalty(rewards: Array, has_eos: Array, penalty: float | None) -> Array:
    """r_i - penalty·[completion i has no EOS] (TRL Online DPO L1200, PPO L758); ``None`` = no penalty.

    Shapes: rewards [B] float, has_eos [B] bool -> [B].
    """
    check_shapes(rewards=(rewards, "B"), has_eos=(has_eos, "B"))
    check_float(rewards=rewards)
    xp = array_namespace(rewards, has_eos)
    if has_eos.dtype != xp.bool:
        raise ValueError(f"has_eos: expected bool, got {has_eos.dtype}")
    if penalty is None:
        return rewards
    return rewards - penalty * as_float(~has_eos, rewards.dtype)


# --------------------------------------------------------------------------------------------
# KL estimators (Schulman 2020, "Approximating KL divergence")
# --------------------------------------------------------------------------------------------

def kl_estimate(logp: Array, ref_logp: Array, estimator: KLEstimator) -> Array:
    """Per-token estimate of KL(π‖π_ref) on samples from π, x = log π_ref - log π (spec/common.md eqs. 10–12).

    k1 = -x (unbiased, can be negative); k2 = x²/2; k3 = eˣ - x - 1 (unbiased, >= 0; TRL GRPO trl.md §2.5).
    Schulman 2020, "Approximating KL divergence".
    """
    return _KL_ESTIMATORS[estimator](ref_logp - logp)


def _k3(x: Array) -> Array:
    # expm1(x) - x, not exp(x) - x - 1: equal in exact arithmetic, but for |x| < 1e-8 the latter
    # cancels to about -1e-16, breaking k3 >= 0; fl(expm1(x)) >= x keeps it non-negative.
    xp = array_namespace(x)
    return xp.expm1(x) - x


_KL_ESTIMATORS: dict[str, Callable[[Array], Array]] = {
    "k1": lambda x: -x,
    "k2": lambda x: 0.5 * x * x,
    "k3": _k3,
}


# --------------------------------------------------------------------------------------------
# Aggregation of per-token losses into one micro-batch loss (trl.md §2.8, spec/common.md "Aggregation")
# Each returns the loss of ONE micro-batch as if gradient_accumulation_steps = 1 and one process.
# --------------------------------------------------------------------------------------------

def sequence_mean(per_token: Array, mask: Array) -> Array:
    """(1/B) Σ_i Σ_t m_it ℓ_it / max(1, Σ_t m_it). TRL alias ``grpo`` (spec/common.md eq. 3).

    Shao et al. 2024 (DeepSeekMath, GRPO), eq. 3: per-sequence token mean, then mean over sequences.
    """
    xp = array_namespace(per_token, mask)
    return xp.mean(masked_mean(per_token, mask, axis=-1))


def token_mean(per_token: Array, mask: Array) -> Array:
    """Σ_it m ℓ / max(1, Σ_it m) over this micro-batch. TRL alias ``bnpo`` (spec/common.md eq. 4)."""
    return masked_mean(per_token, mask)


def token_sum_over_constant(per_token: Array, mask: Array, *, max_completion_length: int) -> Array:
    """Σ_it m ℓ / (B · L), L = max_completion_length. TRL alias ``dr_grpo`` (spec/common.md eq. 5).

    Liu et al. 2025 (Dr. GRPO, "Understanding R1-Zero-Like Training"), §3.1: a constant normalizer removes
    the length bias of the per-sequence mean. B is the micro-batch row count (trl.md §2.13 quirk 10).
    """
    xp = array_namespace(per_token, mask)
    return xp.sum(masked_sum(per_token, mask)) / (per_token.shape[0] * max_completion_length)


def token_sum_over_global_count(per_token: Array, mask: Array, *, num_items_in_batch: Array | float | None) -> Array:
    """Σ_it m ℓ / max(1, N), N = active tokens of the whole generation batch. TRL aliases ``dapo``, ``cispo``
    (spec/common.md eq. 6).

    Yu et al. 2025 (DAPO), eq. 8 (token-level policy-gradient loss); MiniMax-M1 2025 (CISPO), eq. 4.
    ``num_items_in_batch=None`` uses this micro-batch's Σ m (then it equals ``token_mean``).
    """
    xp = array_namespace(per_token, mask)
    total = masked_sum(per_token, mask)
    count = xp.sum(as_float(as_bool(mask), per_token.dtype)) if num_items_in_batch is None else num_items_in_batch
    if isinstance(count, numbers.Real):  # Python or NumPy scalar
        return total / max(1.0, float(count))
    return total / xp.clip(xp.astype(count, per_token.dtype), min=1.0)


_AGGREGATIONS: dict[str, Callable[..., Array]] = {
    "grpo": lambda x, m, L, N: sequence_mean(x, m),
    "bnpo": lambda x, m, L, N: token_mean(x, m),
    "dr_grpo": lambda x, m, L, N: token_sum_over_constant(x, m, max_completion_length=L),
    "dapo": lambda x, m, L, N: token_sum_over_global_count(x, m, num_items_in_batch=N),
    "cispo": lambda x, m, L, N: token_sum_over_global_count(x, m, num_items_in_batch=N),
}
AGGREGATION_NAMES: tuple[str, ...] = tuple(_AGGREGATIONS)


def aggregate(
    per_token: Array,
    mask: Array,
    loss_type: str,
    *,
    max_completion_length: int,
    num_items_in_batch: Array | float | None = None,
) -> Array:
    """Reduce per-token losses [B, T] (or [B, 1], broadcast) to the micro-batch loss by ``loss_type``.

    grpo -> sequence_mean, bnpo -> token_mean, dr_grpo -> token_sum_over_constant,
    dapo / cispo -> token_sum_over_global_count (trl.md §2.8).
    """
    if loss_type not in _AGGREGATIONS:
        raise ValueError(f"loss_type: unknown {loss_type!r}; expected one of {AGGREGATION_NAMES}")
    xp = array_namespace(per_token, mask)
    per_token = xp.broadcast_to(per_token, mask.shape)
    return _AGGREGATIONS[loss_type](per_token, mask, max_completion_length, num_items_in_batch)

"""Run one algos function on NumPy, torch (autograd) and JAX (jax.grad, float64); compare with the tolerance table."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from aha.conformance.tolerances import tolerance

LossFn = Callable[..., tuple[Any, dict[str, Any]]]


def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def assert_close(actual: Any, expected: Any, dtype_name: str = "float64", err_msg: str = "") -> None:
    tol = tolerance(dtype_name)
    np.testing.assert_allclose(to_numpy(actual), to_numpy(expected), rtol=tol.rtol, atol=tol.atol, err_msg=err_msg)


def assert_printed(actual: Any, printed: Any, decimals: int) -> None:
    """``actual`` rounds to the value printed (with ``decimals`` decimals) in shared/reference/trl.md §8.2."""
    def fmt(values):
        return [f"{round(float(v), decimals) + 0.0:.{decimals}f}" for v in np.ravel(values)]
    assert fmt(to_numpy(actual)) == fmt(np.asarray(printed, dtype=float)), (to_numpy(actual), printed)


def decimals_of(printed: str) -> int:
    return len(printed.split(".")[1]) if "." in printed else 0


def run_numpy(fn: LossFn, arrays: dict[str, Any], wrt: tuple[str, ...] = ()):
    value, metrics = fn(**arrays)
    return to_numpy(value), {k: to_numpy(v) for k, v in metrics.items()}, None


def run_torch(fn: LossFn, arrays: dict[str, Any], wrt: tuple[str, ...] = ()):
    import torch

    inputs = {
        k: None if v is None else torch.tensor(np.asarray(v), requires_grad=k in wrt) for k, v in arrays.items()
    }
    value, metrics = fn(**inputs)
    grads = None
    if wrt:
        value.backward()
        grads = {k: to_numpy(inputs[k].grad) for k in wrt}
    return to_numpy(value), {k: to_numpy(v) for k, v in metrics.items()}, grads


def run_jax(fn: LossFn, arrays: dict[str, Any], wrt: tuple[str, ...] = ()):
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        inputs = {k: None if v is None else jnp.asarray(np.asarray(v)) for k, v in arrays.items()}

        def of_wrt(*diff):
            return fn(**{**inputs, **dict(zip(wrt, diff))})

        if not wrt:
            value, metrics = fn(**inputs)
            grads = None
        else:
            (value, metrics), diffs = jax.value_and_grad(of_wrt, argnums=tuple(range(len(wrt))), has_aux=True)(
                *(inputs[k] for k in wrt)
            )
            grads = {k: to_numpy(g) for k, g in zip(wrt, diffs)}
        return to_numpy(value), {k: to_numpy(v) for k, v in metrics.items()}, grads


BACKENDS = {"numpy": run_numpy, "torch": run_torch, "jax": run_jax}


def assert_backends_agree(fn: LossFn, arrays: dict[str, Any], wrt: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Same value and metrics on NumPy, torch and JAX; same gradients from torch autograd and jax.grad.

    Returns the torch gradients (all finite).
    """
    value, metrics, _ = run_numpy(fn, arrays)
    torch_value, torch_metrics, torch_grads = run_torch(fn, arrays, wrt)
    jax_value, jax_metrics, jax_grads = run_jax(fn, arrays, wrt)
    for name, (v, m) in {"torch": (torch_value, torch_metrics), "jax": (jax_value, jax_metrics)}.items():
        assert_close(v, value, err_msg=f"{name} loss")
        assert set(m) == set(metrics), name
        for key in metrics:
            assert m[key].shape == (), f"{name} metric {key} is not 0-d"
            assert_close(m[key], metrics[key], err_msg=f"{name} metric {key}")
    for key in wrt:
        assert np.all(np.isfinite(torch_grads[key])), f"non-finite torch gradient of {key}"
        assert_close(jax_grads[key], torch_grads[key], err_msg=f"gradient of {key}")
    return torch_grads

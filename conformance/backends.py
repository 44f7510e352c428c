"""The backends the suite compares: each evaluates a case's objective and reports an `Evaluation`.

| backend                 | log-probs                                      | dtype (model / loss)   | gradients        |
|-------------------------|------------------------------------------------|------------------------|------------------|
| jax-float64 (reference) | naive logits, `jax.nn.log_softmax`             | float64 / float64      | `jax.grad`       |
| numpy-float64           | naive logits, NumPy                            | float64 / float64      | none (values)    |
| torch-float64           | naive logits, `torch.log_softmax`              | float64 / float64      | autograd         |
| torch-naive-<dtype>     | naive logits `(h @ W.T + b).float()`           | <dtype> / float32      | autograd         |
| torch-fused-<dtype>     | `losses.<algo>_loss(implementation="torch")`   | <dtype> / float32      | custom backward  |
| triton-<dtype>          | `losses.<algo>_loss(implementation="triton")`  | <dtype> / float32      | custom backward  |

<dtype> is float32 or bfloat16. The fused backends call `aha.backends.torch.losses` (hidden states ->
`token_logprobs` -> `aha.algos` loss), the very functions the trainer calls. What comes before the
update (advantages, returns, pairs) is computed by `aha.algos` in every backend's own arrays. Torch
backends appear only when torch imports; triton ones only on CUDA or under `TRITON_INTERPRET=1` (the
CPU interpreter: about 5 s for every case of the registry at these sizes).
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from aha.backends.jax.reference import Evaluation

from . import problems
from .registry import LOW_PRECISION_UNSAFE_EDGES, Case

@dataclass(frozen=True)
class Backend:
    name: str
    dtype: str
    """"float64", "float32" or "bfloat16": the dtype of hidden states and LM head; picks the tolerance."""
    gradients: bool
    evaluate: Callable[[Case], Evaluation]
    unavailable: str | None = None
    """Why the backend cannot run here (None = it can)."""
    naive: bool = False
    """The plain same-dtype computation: the error floor optimized backends of its dtype are held to."""
    optimized: bool = False

    def skip_reason(self, case: Case) -> str | None:
        if case.edge in LOW_PRECISION_UNSAFE_EDGES.get(self.dtype, ()):
            return f"edge {case.edge} is not representable in {self.dtype}"
        return None


def _to_float64(tree) -> dict[str, np.ndarray]:
    return {key: np.asarray(value, dtype=np.float64) for key, value in tree.items()}


# ------------------------------------------------------------------------------------------------
# NumPy and JAX (float64)
# ------------------------------------------------------------------------------------------------

def _numpy_data(case: Case) -> dict:
    data = dict(case.inputs.data)
    data["mask"] = data["mask"] > 0 if case.shape.bool_mask else data["mask"]
    return data


def evaluate_numpy(case: Case, *, hidden=None, weight=None, bias=None, params=None) -> Evaluation:
    """Values only, in NumPy float64; optional overrides of the model inputs (for finite differences)."""
    from .registry import naive_logprobs

    inputs = case.inputs
    hidden = inputs.hidden if hidden is None else hidden
    weight = inputs.weight if weight is None else weight
    bias = inputs.bias if bias is None else bias
    logp = naive_logprobs(hidden, weight, inputs.targets, bias=bias, temperature=inputs.temperature)
    objective = problems.objective(case.problem, _numpy_data(case), case.config, case.num_generations)
    loss, metrics, outputs = objective(logp, dict(inputs.params if params is None else params))
    return Evaluation(np.asarray(loss, np.float64), _to_float64(metrics), _to_float64(outputs), {})


def evaluate_jax(case: Case) -> Evaluation:
    import jax.numpy as jnp

    from aha.backends.jax import evaluate

    data = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in _numpy_data(case).items()}
    inputs = case.inputs
    objective = problems.objective(case.problem, data, case.config, case.num_generations)
    return evaluate(objective, hidden=inputs.hidden, weight=inputs.weight, targets=inputs.targets,
                    bias=inputs.bias, temperature=inputs.temperature, params=inputs.params,
                    cotangent=inputs.cotangent)


# ------------------------------------------------------------------------------------------------
# torch
# ------------------------------------------------------------------------------------------------

def _torch_dtype(name: str):
    import torch

    return {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _naive_logprobs(hidden, weight, bias, targets, temperature, keep):
    """The documented naive equivalent of `token_logprobs`: z = (h @ W.T + b).float() / τ, log_softmax, gather.

    hidden [B, T, H] -> logp [B, T]; the float32 (float64) logits are kept in `keep` for their gradient."""
    import torch

    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(acc)
    logits.retain_grad()
    keep["logits"] = logits
    return torch.log_softmax(logits / temperature, -1).gather(-1, targets[..., None])[..., 0]


def _torch_evaluator(dtype: str, implementation: str | None, device: str) -> Callable[[Case], Evaluation]:
    """Plain torch autograd on naive logits (implementation None), or `aha.backends.torch.losses` with
    `token_logprobs(implementation=...)`: exactly the call the trainer makes."""

    def evaluate(case: Case) -> Evaluation:
        import torch

        inputs = case.inputs
        model_dtype = _torch_dtype(dtype)
        loss_dtype = torch.float64 if dtype == "float64" else torch.float32
        leaf = lambda x, dt: torch.tensor(x, dtype=dt, device=device, requires_grad=True)  # noqa: E731
        hidden, weight = leaf(inputs.hidden, model_dtype), leaf(inputs.weight, model_dtype)
        bias = None if inputs.bias is None else leaf(inputs.bias, model_dtype)
        targets = torch.tensor(inputs.targets, device=device)
        params = {k: leaf(v, loss_dtype) for k, v in inputs.params.items()}
        data = {k: torch.tensor(v, dtype=loss_dtype if np.issubdtype(v.dtype, np.floating) else None, device=device)
                if isinstance(v, np.ndarray) else v for k, v in _numpy_data(case).items()}
        prepared = case.problem.prepare(data, case.config, case.num_generations)
        keep: dict = {}
        if implementation is None:
            logp = _naive_logprobs(hidden, weight, bias, targets, inputs.temperature, keep)
            loss, metrics = case.problem.loss(logp, params, data, prepared, case.config)
        else:
            from aha.backends.torch import losses

            model = dict(hidden=hidden, weight=weight, bias=bias, targets=targets, temperature=inputs.temperature,
                         implementation=implementation)
            loss, metrics = case.problem.fused_loss(losses, model, params, data, prepared, case.config)
        (inputs.cotangent * loss).backward()
        grads = {"hidden": hidden.grad, "weight": weight.grad, **{k: v.grad for k, v in params.items()}}
        if bias is not None:
            grads["bias"] = bias.grad
        if "logits" in keep:
            grads["logits"] = keep["logits"].grad
        as_np = lambda tree: {k: v.detach().to("cpu", torch.float64).numpy() for k, v in tree.items()}  # noqa: E731
        return Evaluation(loss.detach().to("cpu", torch.float64).numpy(), as_np(metrics), as_np(prepared),
                          as_np(grads))

    return evaluate


def _torch_unavailable() -> str | None:
    return None if importlib.util.find_spec("torch") else "torch is not installed"


def _triton_unavailable(device: str) -> str | None:
    if _torch_unavailable():
        return _torch_unavailable()
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not (device.startswith("cuda") or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
        return "needs --device cuda or TRITON_INTERPRET=1"
    return None


def _fused_unavailable() -> str | None:
    if _torch_unavailable():
        return _torch_unavailable()
    if importlib.util.find_spec("aha.backends.torch.losses") is None:
        return "aha.backends.torch.losses is not there yet"
    return None


# ------------------------------------------------------------------------------------------------
# The list
# ------------------------------------------------------------------------------------------------

REFERENCE = Backend("jax-float64", "float64", True, evaluate_jax)


def candidate_backends(device: str = "cpu") -> list[Backend]:
    """Every backend compared with the reference, in report order (unavailable ones say why).

    `device`: where the torch backends put their tensors ("cpu", "cuda"); the references stay on the CPU."""
    out = [
        Backend("numpy-float64", "float64", False, evaluate_numpy),
        Backend("torch-float64", "float64", True, _torch_evaluator("float64", None, device),
                _torch_unavailable()),
    ]
    for dtype in ("float32", "bfloat16"):
        out += [
            Backend(f"torch-naive-{dtype}", dtype, True, _torch_evaluator(dtype, None, device), _torch_unavailable(),
                    naive=True),
            Backend(f"torch-fused-{dtype}", dtype, True, _torch_evaluator(dtype, "torch", device),
                    _fused_unavailable(), optimized=True),
            Backend(f"triton-{dtype}", dtype, True, _torch_evaluator(dtype, "triton", device),
                    _fused_unavailable() or _triton_unavailable(device), optimized=True),
        ]
    return out

"""Conformance for anyone: the registry's cases against another implementation, through a small adapter.

    aha conformance --target mypkg.losses:grpo_loss --algo grpo                 # aha's own signature
    aha conformance --adapter liger-grpo                                        # a ready adapter, its default target
    aha conformance --target verl.trainer.ppo.core_algos --adapter verl-ppo --report verl.json

A *target* is any importable object: "package.module:attr", or a module. An *adapter* (adapters/ holds the
ready ones; "package.module:attr" loads another) maps one case of the registry onto the target's signature
and the target's results back to aha's names. For each case it either declares the case unsupported, with
the reason (a config value the target cannot express, an input convention it lacks), or returns what the
target computes: the loss, then also its gradients with respect to the hidden states, the LM head (weight,
bias) and the value predictions, taken by autograd of cotangent · loss; metrics; and outputs (advantages,
returns). Everything returned is compared with the JAX float64 reference as the suite compares aha's own
backends (`checks.compare_arrays`, the "pipeline/<dtype>" row of the tolerance table, widened for large
logits by `tolerances.conditioning`). An unsupported case is reported as such, never as passed; a target
that supports no case at all does not pass either.

Inputs are the registry's (registry.py): hidden states and LM head on the bfloat16 grid, everything else on
the float32 grid, so casting them to the target's dtype is exact. What the algorithm prepares before the
update (advantages, returns, pairs) is given to the adapter as the spec computes it (`Call.prepared`); an
adapter whose target computes them itself returns its own under `Output.outputs`, and those are compared.
"""
from __future__ import annotations

import importlib
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from aha.backends.jax.reference import Evaluation

from . import registry
from .backends import REFERENCE, _naive_logprobs, _numpy_data, _torch_dtype
from .checks import Comparison, compare_arrays, compare_dicts
from .registry import LOW_PRECISION_UNSAFE_EDGES, Case
from .suite import Result
from .tolerances import conditioning, scaled, tolerance

UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class Call:
    """One case, as torch tensors in the target's dtype; what an adapter receives.

    hidden [B, T, H], weight [V, H], bias [V] | None: leaves in the model dtype (gradients are taken w.r.t. them);
    targets [B, T] int64; logp [B, T]: the naive log-probs log_softmax((h·Wᵀ + b) / τ)[target], computed from the
    leaves in the loss dtype (float32, float64 for float64), for targets that take log-probs; mask [B, T]: the
    completion mask as 0/1 floats of the loss dtype; data: the algorithm's own inputs (problems.py: rewards,
    old_logp, ref_logp, scores, old_values, has_eos, num_items_in_batch, and mask as the case's shape says);
    params: the other differentiable inputs (PPO's value predictions, leaves); prepared: the spec's advantages,
    returns or pairs; config: the aha config of the case (GRPOConfig, ...).
    """

    case: Case
    dtype: str
    hidden: Any
    weight: Any
    bias: Any
    targets: Any
    temperature: float
    logp: Any
    mask: Any
    data: dict
    params: dict
    prepared: dict
    config: Any
    num_generations: int


@dataclass
class Output:
    """What the target computed, in aha's names (spec/<algo>.md): any subset is fine, nothing is compared twice.

    loss: 0-d tensor with autograd to the call's leaves (None: the target has no loss, e.g. an advantage
    estimator); metrics: {aha name: value}; outputs: {"advantages" | "returns": array}."""

    loss: Any = None
    metrics: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)


class Adapter(Protocol):
    name: str
    algos: tuple[str, ...]
    """The algorithms whose cases this adapter can map."""
    default_target: str | None
    """The target used when none is given ("package.module:attr" or a module)."""
    dtype: str
    """The dtype the target runs in by default ("float64", "float32", "bfloat16")."""
    covers: str
    """One line: what is compared (and what is taken from the spec instead)."""

    def supports(self, case: Case) -> str | None:
        """None if the target can express this case, else the reason it cannot."""

    def __call__(self, target: Any, call: Call) -> Output:
        """Run the target on one case."""


def load(path: str) -> Any:
    """"package.module:attr.sub" -> that object; "package.module" -> the module."""
    module_name, _, attr = path.partition(":")
    obj = importlib.import_module(module_name)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------------------------------------
# One case
# ------------------------------------------------------------------------------------------------

def _to_torch(value, loss_dtype):
    import torch

    if not isinstance(value, np.ndarray):
        return value
    return torch.tensor(value, dtype=loss_dtype if np.issubdtype(value.dtype, np.floating) else None)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a tensor of any dtype (bool and int included)
        return value.detach().to("cpu").double().numpy()
    return np.asarray(value, dtype=np.float64)


def make_call(case: Case, dtype: str) -> Call:
    import torch

    inputs = case.inputs
    model_dtype = _torch_dtype(dtype)
    loss_dtype = torch.float64 if dtype == "float64" else torch.float32
    leaf = lambda x, dt: torch.tensor(x, dtype=dt, requires_grad=True)  # noqa: E731
    hidden, weight = leaf(inputs.hidden, model_dtype), leaf(inputs.weight, model_dtype)
    bias = None if inputs.bias is None else leaf(inputs.bias, model_dtype)
    targets = torch.tensor(inputs.targets)
    logp = _naive_logprobs(hidden, weight, bias, targets, inputs.temperature, {})
    numpy_data = _numpy_data(case)
    prepared = case.problem.prepare(numpy_data, case.config, case.num_generations)
    return Call(
        case=case, dtype=dtype, hidden=hidden, weight=weight, bias=bias, targets=targets,
        temperature=inputs.temperature, logp=logp, mask=torch.tensor(inputs.mask, dtype=loss_dtype),
        data={k: _to_torch(v, loss_dtype) for k, v in numpy_data.items()},
        params={k: leaf(v, loss_dtype) for k, v in inputs.params.items()},
        prepared={k: _to_torch(v, loss_dtype) for k, v in prepared.items()},
        config=case.config, num_generations=case.num_generations,
    )


def evaluate(target: Any, adapter: Adapter, case: Case, dtype: str) -> Evaluation:
    """The target's results on one case; gradients (of cotangent · loss) only when it returns a loss."""
    call = make_call(case, dtype)
    out = adapter(target, call)
    grads = {}
    if out.loss is not None:
        (case.inputs.cotangent * out.loss).backward()
        leaves = {"hidden": call.hidden, "weight": call.weight, "bias": call.bias, **call.params}
        grads = {k: _to_numpy(v.grad) for k, v in leaves.items() if v is not None and v.grad is not None}
    loss = None if out.loss is None else _to_numpy(out.loss)
    return Evaluation(loss, {k: _to_numpy(v) for k, v in out.metrics.items()},
                      {k: _to_numpy(v) for k, v in out.outputs.items()}, grads)


def compare(candidate: Evaluation, reference: Evaluation, dtype: str, *, logit_magnitude: float) -> list[Comparison]:
    """What the target returned against the reference: the loss and then every gradient the reference has (the
    logits' excepted), and the metrics and outputs the target names (a name the spec lacks fails)."""
    tol = scaled(tolerance(f"pipeline/{dtype}"), conditioning(logit_magnitude))
    out: list[Comparison] = []
    if candidate.loss is not None:
        out.append(compare_arrays("loss", candidate.loss, reference.loss, tol, scalar=True))
        wanted = {k: v for k, v in reference.grads.items() if k != "logits"}
        out += compare_dicts("grad", candidate.grads, wanted, tol, scalar=False)
    for kind, mine, theirs, scalar in (("metric", candidate.metrics, reference.metrics, True),
                                       ("output", candidate.outputs, reference.outputs, False)):
        out += compare_dicts(kind, mine, {k: v for k, v in theirs.items() if k in mine}, tol, scalar=scalar)
    return out


def _failure(case: Case, label: str, dtype: str, exc: BaseException) -> Result:
    line = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return Result(case.name, case.algo, label, dtype, "error", note=line)


def run(target: Any, adapter: Adapter, cases: list[Case], *, dtype: str | None = None, label: str = "target",
        progress: Callable[[Result], None] | None = None) -> list[Result]:
    """One result per case: "pass", "fail", "error" or "unsupported" (the note says why)."""
    dtype = dtype or adapter.dtype
    results = []
    for case in cases:
        start = time.perf_counter()
        reason = (None if case.algo in adapter.algos else f"the adapter maps {', '.join(adapter.algos)} only") \
            or adapter.supports(case)
        if reason is None and case.edge in LOW_PRECISION_UNSAFE_EDGES.get(dtype, ()):
            reason = f"edge {case.edge} is not representable in {dtype}"
        if reason:
            result = Result(case.name, case.algo, label, dtype, UNSUPPORTED, note=reason)
        else:
            try:
                reference = REFERENCE.evaluate(case)
                candidate = evaluate(target, adapter, case, dtype)
                comparisons = compare(candidate, reference, dtype, logit_magnitude=case.inputs.logit_magnitude)
                if not comparisons:
                    raise ValueError(f"adapter {adapter.name} returned nothing to compare")
                status = "pass" if all(c.ok for c in comparisons) else "fail"
                result = Result(case.name, case.algo, label, dtype, status, comparisons,
                                seconds=time.perf_counter() - start)
            except Exception as exc:
                result = _failure(case, label, dtype, exc)
        results.append(result)
        if progress:
            progress(result)
    return results


# ------------------------------------------------------------------------------------------------
# The Python API
# ------------------------------------------------------------------------------------------------

def _label(target: str | Any) -> str:
    """How a target is named in the report: its "package.module:attr" path."""
    if isinstance(target, str):
        return target
    if isinstance(target, types.ModuleType):
        return target.__name__
    named = target if hasattr(target, "__qualname__") else type(target)  # a function or class, else an instance
    return f"{named.__module__}:{named.__qualname__}"


def resolve_adapter(adapter: str | Adapter) -> Adapter:
    if not isinstance(adapter, str):
        return adapter
    from .adapters import resolve

    return resolve(adapter)


def check_target(
    target: str | Any | None = None,
    *,
    algo: str | None = None,
    adapter: str | Adapter = "aha",
    dtype: str | None = None,
    quick: bool = False,
    exhaustive: bool = False,
    every_edge: bool = False,
    report: str | None = None,
):
    """Run every case of `algo` against `target` through `adapter`; returns a `TargetReport` (`.ok`, `.table()`).

    target: "package.module:attr", a module path, or the object itself (None: the adapter's default target).
    algo: needed when the adapter maps several algorithms. dtype: the adapter's by default. quick, exhaustive,
    every_edge: the registry selections of `aha conformance`. report: also write the JSON report to this path.
    """
    from .target_report import TargetReport

    adapter = resolve_adapter(adapter)
    if algo is None:
        if len(adapter.algos) != 1:
            raise ValueError(f"algo: adapter {adapter.name} maps {', '.join(adapter.algos)}; name one")
        algo = adapter.algos[0]
    if algo not in adapter.algos:
        raise ValueError(f"algo: adapter {adapter.name} maps {', '.join(adapter.algos)}, not {algo}")
    target = target if target is not None else adapter.default_target
    if target is None:
        raise ValueError(f"target: adapter {adapter.name} has no default target; give one")
    obj = load(target) if isinstance(target, str) else target
    cases = registry.all_cases([algo], exhaustive=exhaustive, every_edge=every_edge)
    if quick:
        cases = registry.quick_cases(cases)
    start = time.perf_counter()
    label = _label(target)
    results = run(obj, adapter, cases, dtype=dtype, label=label)
    out = TargetReport(label, adapter.name, algo, dtype or adapter.dtype, adapter.covers, results,
                       time.perf_counter() - start)
    if report:
        out.write(report)
    return out

"""Golden vectors: frozen float64 reference values of every algorithm, in spec/vectors/<algo>.json.

    python -m aha.conformance.golden --write    # regenerate (review the diff, commit it with a reason)
    python -m aha.conformance.golden            # check that the current aha.algos reproduce them

A vector is framework-neutral: per-token log-probs are given (no model), with the algorithm's other
inputs; expected are the loss, every metric, the intermediate outputs (advantages, returns, pairs) and
the gradient of the loss with respect to the log-probs (and PPO's value predictions), all computed by
the JAX float64 reference. One vector per (algorithm, edge case), and one per appended variant (GRPO's
train/inference mismatch correction), taken from the conformance registry.

JSON encoding: arrays are nested lists; floats are written with full (repr) precision; NaN and ±inf
are the strings "NaN", "Infinity", "-Infinity"; booleans are JSON booleans, indices JSON integers;
option strings (the mismatch correction's mode) are JSON strings.
A change to `aha.algos` that moves any value beyond the pipeline/float64 tolerance fails the check, loudly.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import checks, problems, registry
from .suite import Result

GOLDEN = "golden"
"""Pseudo-backend name of the golden-vector check in the suite's tables."""
GENERATOR = "python -m aha.conformance.golden --write"


def vectors_dir() -> Path:
    from aha.spec import VECTORS_DIR

    return VECTORS_DIR


def _encode(value):
    if isinstance(value, np.ndarray):
        return [_encode(v) for v in value.tolist()] if value.ndim else _encode(value.item())
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else ("NaN" if math.isnan(value) else
                                                   ("Infinity" if value > 0 else "-Infinity"))
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"cannot encode {type(value)}")


_SPECIAL = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _decode(value):
    """JSON value -> NumPy array (float64 for numbers written as floats, int64 for integers, bool) or scalar."""
    if isinstance(value, list):
        flat = _flatten(value)
        if any(isinstance(v, bool) for v in flat):
            return np.asarray(value, dtype=bool)
        if flat and all(isinstance(v, int) for v in flat):
            return np.asarray(value, dtype=np.int64)
        return np.asarray(_map(value, lambda v: _SPECIAL.get(v, v)), dtype=np.float64)
    return _SPECIAL.get(value, value)


def _flatten(nested):
    return [x for item in nested for x in (_flatten(item) if isinstance(item, list) else [item])]


def _map(nested, fn):
    return [_map(v, fn) if isinstance(v, list) else fn(v) for v in nested]


def golden_cases(algo: str) -> list[registry.Case]:
    """One case per edge of the algorithm (the first registry case that meets it), then one per appended variant
    (registry.appended_variants: e.g. GRPO's train/inference mismatch correction)."""
    appended = {name for name, _, _ in registry.appended_variants(problems.PROBLEMS[algo])}
    seen, out = set(), []
    for case in registry.all_cases([algo]):
        key = case.variant if case.variant in appended else case.edge
        if key not in seen:
            seen.add(key)
            out.append(case)
    return out


def _reference(objective, logp: np.ndarray, params: dict[str, np.ndarray]):
    """Loss, metrics, outputs and d loss / d (logp, params) of an objective, in JAX float64."""
    import jax
    import jax.numpy as jnp

    import aha.backends.jax  # noqa: F401  (float64 on)

    def f(logp, params):
        loss, metrics, outputs = objective(logp, params)
        return loss, (loss, metrics, outputs)

    (g_logp, g_params), (loss, metrics, outputs) = jax.grad(f, argnums=(0, 1), has_aux=True)(
        jnp.asarray(logp), {k: jnp.asarray(v) for k, v in params.items()})
    as_np = lambda tree: {k: np.asarray(v) for k, v in tree.items()}  # noqa: E731
    grads = {"logp": np.asarray(g_logp), **as_np(g_params)}
    return np.asarray(loss), as_np(metrics), as_np(outputs), grads


def _jax_data(data: dict) -> dict:
    import jax.numpy as jnp

    return {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in data.items()}


def make_vector(case: registry.Case) -> dict:
    inputs = case.inputs
    data = dict(inputs.data)
    data["mask"] = data["mask"] > 0 if case.shape.bool_mask else data["mask"]
    objective = problems.objective(case.problem, _jax_data(data), case.config, case.num_generations)
    loss, metrics, outputs, grads = _reference(objective, inputs.logp, inputs.params)
    return {
        "name": case.name,
        "config_type": type(case.config).__name__,
        "config": _encode_config(case.config),
        "num_generations": case.num_generations,
        "inputs": {"logp": _encode(inputs.logp), **{k: _encode(v) for k, v in data.items()},
                   **{k: _encode(v) for k, v in inputs.params.items()}},
        "params": list(inputs.params),
        "expected": {"loss": _encode(loss), "metrics": {k: _encode(v) for k, v in metrics.items()},
                     "outputs": {k: _encode(v) for k, v in outputs.items()},
                     "grads": {k: _encode(v) for k, v in grads.items()}},
    }


def _encode_config(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _decode_config(algo: str, vector: dict):
    import importlib

    config_type = getattr(importlib.import_module(f"aha.algos.{algo}"), vector["config_type"])
    return config_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in vector["config"].items()})


def _provenance() -> dict:
    import jax

    from aha import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "generator": GENERATOR,
        "reference": "aha.backends.jax: jax.grad in float64 (jax_enable_x64) of the aha.algos functions",
        "aha": __version__, "git_commit_before_writing": commit, "python": platform.python_version(),
        "numpy": np.__version__, "jax": jax.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write(algos: list[str] | None = None) -> list[Path]:
    paths = []
    for algo in problems.PROBLEMS:
        if algos and algo not in algos:
            continue
        payload = {"algorithm": algo, "provenance": _provenance(), "format": __doc__.split("\n\n", 2)[2].strip(),
                   "vectors": {vector.pop("name"): vector for vector in map(make_vector, golden_cases(algo))}}
        path = vectors_dir() / f"{algo}.json"
        path.write_text(_dumps(payload) + "\n")
        paths.append(path)
    return paths


def _dumps(value, indent: int = 0) -> str:
    """JSON with objects one key per line and every array on one line (readable diffs of a regeneration)."""
    if not isinstance(value, dict) or not value:
        return json.dumps(value)
    pad = " " * (indent + 1)
    items = [f"{pad}{json.dumps(k)}: {_dumps(v, indent + 1)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"


def _check_vector(algo: str, vector: dict) -> list[checks.Comparison]:
    """Recompute one vector: values with NumPy float64 and with JAX float64, gradients with JAX."""
    config = _decode_config(algo, vector)
    problem = problems.PROBLEMS[algo]
    inputs = {k: _decode(v) for k, v in vector["inputs"].items()}
    logp = inputs.pop("logp")
    params = {k: inputs.pop(k) for k in vector["params"]}
    expected = vector["expected"]
    decoded = lambda tree: {k: _decode(v) for k, v in tree.items()}  # noqa: E731
    want_metrics, want_outputs = decoded(expected["metrics"]), decoded(expected["outputs"])
    tol = checks.tolerance("pipeline/float64")

    loss, metrics, outputs = problems.objective(problem, inputs, config, vector["num_generations"])(logp, params)
    out = [checks.compare_arrays("numpy:loss", loss, _decode(expected["loss"]), tol, scalar=True)]
    out += checks.compare_dicts("numpy:metric", _to_np(metrics), want_metrics, tol, scalar=True)
    out += checks.compare_dicts("numpy:output", _to_np(outputs), want_outputs, tol, scalar=False)
    objective = problems.objective(problem, _jax_data(inputs), config, vector["num_generations"])
    loss, metrics, outputs, grads = _reference(objective, logp, params)
    out.append(checks.compare_arrays("jax:loss", loss, _decode(expected["loss"]), tol, scalar=True))
    out += checks.compare_dicts("jax:metric", metrics, want_metrics, tol, scalar=True)
    out += checks.compare_dicts("jax:grad", grads, decoded(expected["grads"]), tol, scalar=False)
    return out


def _to_np(tree) -> dict:
    return {k: np.asarray(v) for k, v in tree.items()}


def check(algos: list[str] | None = None) -> list[Result]:
    """One result per golden vector (pseudo-backend "golden"); a missing file is an error result."""
    results = []
    for algo in problems.PROBLEMS:
        if algos and algo not in algos:
            continue
        path = vectors_dir() / f"{algo}.json"
        if not path.exists():
            results.append(Result(f"{algo}/<vectors>", algo, GOLDEN, "float64", "error",
                                  note=f"{path} is missing: run `{GENERATOR}`"))
            continue
        for name, vector in json.loads(path.read_text())["vectors"].items():
            try:
                comparisons = _check_vector(algo, vector)
            except Exception as exc:  # a vector the current algos cannot even evaluate fails loudly
                results.append(Result(name, algo, GOLDEN, "float64", "error", note=f"{type(exc).__name__}: {exc}"))
                continue
            status = "pass" if all(c.ok for c in comparisons) else "fail"
            results.append(Result(name, algo, GOLDEN, "float64", status, comparisons))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aha.conformance.golden", description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="regenerate spec/vectors/<algo>.json from the reference")
    p.add_argument("--algo", action="append", choices=sorted(problems.PROBLEMS))
    args = p.parse_args(argv)
    if args.write:
        for path in write(args.algo):
            print(f"wrote {path}")
        return 0
    results = check(args.algo)
    bad = [r for r in results if r.status != "pass"]
    for r in bad:
        detail = r.note or "; ".join(f"{c.quantity} |err| {c.max_abs:.3e}" for c in r.failed[:5])
        print(f"FAIL {r.case}: {detail}")
    print(f"{len(results) - len(bad)}/{len(results)} golden vectors reproduced")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

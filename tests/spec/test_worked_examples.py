"""Every worked example in spec/*.md (its ```json block) reproduced by aha.algos.

Values run on NumPy float64, gradients through torch float64 autograd. The documents print 8
significant digits, so the comparison uses the table's `printed8` tolerance.
"""
import dataclasses
import importlib
import json
import re

import numpy as np
import pytest
import torch

from aha.conformance.tolerances import tolerance
from aha.spec import SPEC_DIR

PRINTED = tolerance("printed8")
DOCUMENTS = ["common", "grpo", "rloo", "ppo", "online_dpo"]


def blocks(path):
    text = path.read_text()
    heads = [(m.start(), m.group(1)) for m in re.finditer(r"^### (Worked example \d+)", text, re.M)]
    for m in re.finditer(r"```json\n(.*?)```", text, re.S):
        head = [h for s, h in heads if s < m.start()]
        yield (head[-1] if head else None), json.loads(m.group(1))


TUPLES = {
    "ppo.gae": ["advantages", "returns"],
    "ppo.advantages": ["advantages", "returns"],
    "online_dpo.select_pairs": ["chosen_idx", "rejected_idx", "valid"],
}


def config_class(module):
    for name in dir(module):
        obj = getattr(module, name)
        if name.endswith("Config") and dataclasses.is_dataclass(obj):
            return obj
    return None


def convert(name, value, lib):
    if isinstance(value, list):
        arr = np.array(value)
        if arr.dtype == bool:
            return torch.tensor(arr) if lib == "torch" else arr
        if name.endswith("_idx"):
            arr = arr.astype(np.int64)
        else:
            arr = arr.astype(np.float64)
        return torch.tensor(arr) if lib == "torch" else arr
    return value


def close(a, b, rtol=PRINTED.rtol, atol=PRINTED.atol):
    bb = b
    a = np.asarray(a, dtype=float)
    b = np.array([np.nan if x is None else x for x in np.ravel(np.array(b, dtype=object))], dtype=float).reshape(np.shape(b))
    if a.shape != b.shape:
        return False, f"shape {a.shape} vs {b.shape}"
    # null in expected = unspecified
    care = np.array([x is not None for x in np.ravel(np.array(bb, dtype=object))]).reshape(np.shape(bb))
    ok = np.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True) | ~care
    return bool(ok.all()), f"got {np.array2string(a, precision=9)}"


def run(call, case, stats, where):
    fname = call["function"]
    modname, func = fname.split(".")
    module = importlib.import_module(f"aha.algos.{modname}")
    fn = getattr(module, func)
    args = dict(call.get("args", {}))
    args.update(case.get("args", {}))
    cfg = case.get("config", call.get("config"))
    expected = case.get("expected", call.get("expected"))
    kwargs = {}
    if cfg is not None:
        kwargs["config"] = config_class(module)(**cfg)
    # values with numpy
    np_args = {k: convert(k, v, "np") for k, v in args.items()}
    out = fn(**np_args, **kwargs)
    results = {}
    if isinstance(out, tuple) and fname not in TUPLES:
        results["loss"] = out[0]
        results["metrics"] = out[1]
    elif fname in TUPLES:
        results.update(dict(zip(TUPLES[fname], out)))
    elif isinstance(out, dict):  # a function returning metrics alone (mismatch.mismatch_metrics)
        results["metrics"] = out
    else:
        results["value"] = out
    for key, exp in expected.items():
        if key.startswith("grad_"):
            arg = key[len("grad_"):]
            t_args = {k: convert(k, v, "torch") for k, v in args.items()}
            lp = t_args[arg].clone().requires_grad_(True)
            t_args[arg] = lp
            loss, _ = fn(**t_args, **kwargs)
            loss.backward()
            got = lp.grad.numpy()
        elif key == "metrics":
            for mk, mv in exp.items():
                got = np.asarray(results["metrics"][mk])
                ok, msg = close(got, mv)
                stats[ok] += 1
                if not ok:
                    stats["failures"].append(f"{where} metric {mk}: expected {mv}, {msg}")
            continue
        else:
            got = results[key]
        if exp is None:
            continue
        ok, msg = close(np.asarray(got, dtype=float), exp)
        stats[ok] += 1
        if not ok:
            stats["failures"].append(f"{where} {key}: expected {exp}, {msg}")



@pytest.mark.parametrize("document", DOCUMENTS)
def test_worked_examples_reproduce(document):
    stats = {True: 0, False: 0, "failures": []}
    examples = list(blocks(SPEC_DIR / f"{document}.md"))
    assert len(examples) >= 2, f"spec/{document}.md must hold at least two worked examples"
    for head, example in examples:
        for index, call in enumerate(example["calls"]):
            for k, case in enumerate(call.get("cases", [call])):
                run(call, case, stats, f"{example['example']} ({head}) call {index} case {k}")
    assert not stats["failures"], "\n".join(stats["failures"])
    assert stats[True] > 0

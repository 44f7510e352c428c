"""Reward functions with TRL's signature, built-ins, loading by name, and batch scoring.

A reward function is called once per generation batch as

    fn(prompts=[...], completions=[...], **row_fields) -> list[float | None]

(trl.md §1.4): `row_fields` holds every dataset field other than the prompt, one list entry per
completion (e.g. `answer=[...]`), plus what the trainer adds (`completion_ids`). For
conversational prompts (lists of messages) each completion is passed as
`[{"role": "assistant", "content": text}]`, for string prompts as the text itself, as TRL does.
None, NaN or ±inf means "cannot score this one": it becomes NaN (the trainer counts them per
function, metric reward/<name>/unscorable), and a sample whose rewards are all NaN gets advantage 0
(aha.algos._common.combine_rewards).

Reward functions are user code: `compute_rewards(timeout=...)` stops one that does not return, and
the built-in `code_execution` runs completions only inside `sandbox.py`'s separate, limited process.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from . import reward_model, sandbox

RewardFn = Callable[..., list[float | None]]
REWARD_FUNCTIONS: dict[str, RewardFn] = {}
"""Built-in reward functions by name (the names `reward_funcs` accepts besides module/file paths)."""


class RewardFunctionError(RuntimeError):
    """A reward function raised, timed out, returned the wrong number of rewards, or a non-number."""


@runtime_checkable
class ReportsMetrics(Protocol):
    """A reward function that also counts things (e.g. sandbox timeouts); the trainer logs them as
    reward/<name>/<key> after every call."""

    def pop_metrics(self) -> dict[str, float]:
        """Counts since the last call, then reset."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def register(fn: RewardFn) -> RewardFn:
        REWARD_FUNCTIONS[name] = fn
        return fn
    return register


# --- built-ins ---------------------------------------------------------------------------------

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
THINK_ANSWER = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def completion_text(completion: str | list[dict[str, str]]) -> str:
    """The text of a completion, whether passed as a string or as [assistant message]."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def extract_answer(text: str) -> str:
    """The content of the last <answer>…</answer> if there is one, else the last number, else the
    last whitespace-separated token (trailing punctuation stripped)."""
    tagged = ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1]
    numbers = NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    tokens = text.split()
    return tokens[-1].strip(".,;:!?\"'") if tokens else ""


def normalize_answer(answer: str) -> str:
    """Canonical form for comparison: whitespace removed, lower case; numbers as their value, so
    "1,000" == "1000" == "1000.0" == "$1000"; a trailing full stop dropped."""
    text = re.sub(r"\s+", "", answer).lower().rstrip(".").lstrip("$")
    if NUMBER.fullmatch(text):
        try:
            value = Decimal(text.replace(",", ""))
        except InvalidOperation:
            return text
        return format(value.normalize(), "f") if value != 0 else "0"
    return text


@register_reward("exact_answer")
def exact_answer(prompts: list, completions: list, answer: list[str | None], **_: Any) -> list[float | None]:
    """1.0 if the extracted answer (see `extract_answer`) equals the gold `answer` after
    `normalize_answer`, else 0.0; None (not scorable) for rows without a gold answer."""
    return [None if gold is None else float(normalize_answer(extract_answer(completion_text(c)))
                                            == normalize_answer(gold))
            for c, gold in zip(completions, answer, strict=True)]


@register_reward("think_answer_format")
def think_answer_format(prompts: list, completions: list, **_: Any) -> list[float]:
    """1.0 if the completion is exactly `<think>…</think> <answer>…</answer>` (whitespace allowed
    around and between the blocks, one block of each, nothing else), else 0.0."""
    def strict(text: str) -> bool:
        match = THINK_ANSWER.fullmatch(text)
        return bool(match) and all(tag not in "".join(match.groups())
                                   for tag in ("<think>", "</think>", "<answer>", "</answer>"))
    return [float(strict(completion_text(c))) for c in completions]


def length_penalty_fn(target_length: int = 256, per_unit: float | None = None) -> RewardFn:
    """A reward of `-per_unit * max(0, length - target_length)`: zero up to the target, then
    falling linearly (default slope 1/target_length, i.e. -1 at twice the target).

    Length is the number of completion tokens when the trainer passes `completion_ids` (it does),
    else the number of characters.
    """
    slope = 1.0 / target_length if per_unit is None else per_unit

    def length_penalty(prompts: list, completions: list, completion_ids: list | None = None,
                       **_: Any) -> list[float]:
        lengths = ([len(ids) for ids in completion_ids] if completion_ids is not None
                   else [len(completion_text(c)) for c in completions])
        return [-slope * max(0, n - target_length) for n in lengths]
    return length_penalty


REWARD_FUNCTIONS["length_penalty"] = length_penalty_fn()

CODE_FENCE = re.compile(r"```(?:python|py|python3)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str | None:
    """The last ```python fenced block; else the content of the last <answer>…</answer> (itself
    unfenced if it holds a fence); else None."""
    fenced = CODE_FENCE.findall(text)
    if fenced:
        return fenced[-1]
    tagged = ANSWER_TAG.findall(text)
    if tagged:
        inner = CODE_FENCE.findall(tagged[-1])
        return inner[-1] if inner else tagged[-1]
    return None


class CodeExecutionReward:
    """The fraction of a row's tests that the completion's Python code passes, run in the sandbox.

    The code is `extract_code(completion)`; the tests come from the row field `tests_field`: assert
    statements, or stdin/stdout pairs (`sandbox.normalize_tests` lists the layouts). A completion
    without code scores 0.0; a row without tests is not scorable (None). A timeout or crash scores
    0.0 and is counted (metrics reward/code_execution/timeouts and .../crashes). Completions run
    `max_workers` at a time, each in its own process (sandbox.py says what is isolated and what not).
    """

    def __init__(self, *, tests_field: str = "tests", limits: sandbox.SandboxLimits = sandbox.SandboxLimits(),
                 python: str | None = None, max_workers: int = 4) -> None:
        self.tests_field = tests_field
        self.limits = limits
        self.python = python
        self.max_workers = max_workers
        self.__name__ = "code_execution"
        self._counts = {"timeouts": 0.0, "crashes": 0.0}
        self._lock = threading.Lock()

    def __call__(self, prompts: list, completions: list, **fields: Any) -> list[float | None]:
        if self.tests_field not in fields:
            raise ValueError(f"code_execution needs a dataset field '{self.tests_field}' with test cases "
                             f"(fields: {sorted(fields)})")
        jobs = list(zip(completions, fields[self.tests_field], strict=True))
        with ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(lambda job: self._score(*job), jobs))

    def _score(self, completion, tests) -> float | None:
        if tests is None:
            return None
        cases = sandbox.normalize_tests(tests)
        code = extract_code(completion_text(completion))
        if code is None:
            return 0.0
        run = sandbox.run_tests(code, cases, limits=self.limits, python=self.python)
        if run.status != "ok":
            with self._lock:
                self._counts["timeouts" if run.status == "timeout" else "crashes"] += 1
            return 0.0
        return run.passed / run.total

    def pop_metrics(self) -> dict[str, float]:
        with self._lock:
            counts, self._counts = self._counts, dict.fromkeys(self._counts, 0.0)
        return counts


REWARD_FUNCTIONS["code_execution"] = CodeExecutionReward()


# --- loading and naming ------------------------------------------------------------------------

def load_reward_function(spec: str | RewardFn) -> RewardFn:
    """A callable as is; a built-in name; "reward_model:PATH_OR_HUB_ID" (a sequence-classification
    model, reward_model.py); "package.module:function"; or "path/to/file.py:function"."""
    if callable(spec):
        return spec
    if spec in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[spec]
    if spec.startswith(reward_model.PREFIX):
        return reward_model.RewardModel(spec[len(reward_model.PREFIX):])
    if ":" not in spec:
        raise ValueError(f"unknown reward function {spec!r}; built-ins: {sorted(REWARD_FUNCTIONS)}, "
                         "or 'module:function' / 'path/to/file.py:function'")
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"reward function {spec!r}: no such file {path}")
        module_spec = importlib.util.spec_from_file_location(f"aha_user_rewards.{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {target} has no callable named {name!r}")
    return fn


def reward_name(fn: RewardFn) -> str:
    """The name metrics use: the registered name for built-ins, else the function's own name."""
    for name, registered in REWARD_FUNCTIONS.items():
        if registered is fn:
            return name
    if isinstance(fn, functools.partial):
        return reward_name(fn.func)
    return getattr(fn, "__name__", type(fn).__name__)


def reward_names(fns: Sequence[RewardFn]) -> list[str]:
    """Unique metric names, in order; a repeated name gets a suffix (`f`, `f_2`, ...)."""
    names, seen = [], {}
    for fn in fns:
        base = reward_name(fn)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


# --- batch scoring -----------------------------------------------------------------------------

def compute_rewards(reward_fns: Sequence[RewardFn], weights: Sequence[float] | None, prompts: list,
                    completions: list[str], rows: list[dict[str, Any]], *, timeout: float | None = None,
                    **extra: Any) -> np.ndarray:
    """Per-function rewards, float64 [B, K] (B = len(completions), K = len(reward_fns)); NaN = not scorable.

    `rows[i]` is the dataset row of completion i (rows repeat within a group); its fields other
    than "prompt" are passed as keyword lists, `extra` (e.g. completion_ids=...) is passed as is.
    `weights` is only checked here (one finite weight per function); the weighted sum is
    aha.algos._common.combine_rewards, so it is the same code in every backend.
    `timeout` (seconds, None = none) bounds each function's call on the whole batch.
    """
    batch = len(completions)
    if len(prompts) != batch or len(rows) != batch:
        raise ValueError(f"{len(prompts)} prompts and {len(rows)} rows for {batch} completions")
    if weights is not None and (len(weights) != len(reward_fns) or not all(map(math.isfinite, weights))):
        raise ValueError(f"need one finite weight per reward function: {list(weights)} for {len(reward_fns)}")
    passed = [[{"role": "assistant", "content": text}] if isinstance(p, list) else text
              for p, text in zip(prompts, completions)]
    fields = {key for row in rows for key in row if key != "prompt"}
    columns = {key: [row.get(key) for row in rows] for key in sorted(fields)} | extra
    rewards = np.empty((batch, len(reward_fns)), dtype=np.float64)
    for k, (fn, name) in enumerate(zip(reward_fns, reward_names(reward_fns))):
        rewards[:, k] = _call_reward(fn, name, prompts, passed, columns, batch, timeout)
    return rewards


def _call_reward(fn: RewardFn, name: str, prompts: list, completions: list,
                 columns: dict[str, list], batch: int, timeout: float | None) -> np.ndarray:
    try:
        values = list(_call_with_timeout(fn, timeout, prompts=prompts, completions=completions, **columns))
    except _Timeout:
        raise RewardFunctionError(
            f"reward function '{name}' did not return within reward_timeout={timeout:g} s for a batch of {batch} "
            "completions; make it faster or raise reward_timeout (the call cannot be interrupted and is left "
            "running in a background thread)") from None
    except Exception as error:
        index = _first_failing_sample(fn, prompts, completions, columns, timeout)
        where = f"on sample {index}" if index is not None else "on the batch (no single sample fails alone)"
        raise RewardFunctionError(f"reward function '{name}' raised {type(error).__name__} {where}: {error}") \
            from error
    if len(values) != batch:
        raise RewardFunctionError(f"reward function '{name}' returned {len(values)} rewards for "
                                  f"{batch} completions (sample index {min(len(values), batch)} has none or is extra)")
    out = np.empty(batch, dtype=np.float64)
    for i, value in enumerate(values):
        if value is None:
            out[i] = np.nan
            continue
        try:
            out[i] = float(value)
        except (TypeError, ValueError) as error:
            raise RewardFunctionError(f"reward function '{name}' returned {value!r} for sample {i}; "
                                      "expected a number or None") from error
        if math.isinf(out[i]):  # not scorable, like NaN; the trainer counts it
            out[i] = np.nan
    return out


class _Timeout(Exception):
    pass


def _call_with_timeout(fn: RewardFn, timeout: float | None, **kwargs: Any) -> Any:
    """fn(**kwargs), or _Timeout after `timeout` seconds. A Python thread cannot be stopped, so a call
    that hangs is left running in a daemon thread (it does not keep the process alive)."""
    if timeout is None:
        return fn(**kwargs)
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = fn(**kwargs)
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=call, name="aha-reward", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise _Timeout
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _first_failing_sample(fn: RewardFn, prompts: list, completions: list, columns: dict[str, list],
                          timeout: float | None) -> int | None:
    """Error path only: call `fn` one sample at a time to name the sample that makes it raise (or hang)."""
    for i in range(len(completions)):
        single = {key: values[i:i + 1] if isinstance(values, list) else values for key, values in columns.items()}
        try:
            _call_with_timeout(fn, timeout, prompts=prompts[i:i + 1], completions=completions[i:i + 1], **single)
        except Exception:
            return i
    return None

"""The one table of conformance cases: algorithm × config variant × shape × edge case.

Every case is built deterministically from its name (a CRC32 seed), so a failure reported by name
reproduces bit for bit. Inputs are made once per case in float64 and *pre-rounded*: hidden states and
the LM head lie on the bfloat16 grid, every other float (old/ref log-probs, rewards, values) on the
float32 grid. Casting them to a lower dtype is then exact, so one float64 reference serves every
backend and a backend's error is its own arithmetic, never input quantization.

Shapes are small on purpose (B <= 8, T <= 6, H <= 16, V <= 64): the whole suite runs on a 2-core CPU.
"""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from . import problems


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    T: int
    H: int
    V: int
    G: int
    bias: bool
    temperature: float
    bool_mask: bool


SHAPES: tuple[Shape, ...] = (
    Shape("b8t6g4", B=8, T=6, H=16, V=64, G=4, bias=True, temperature=0.7, bool_mask=True),
    Shape("b8t6g2", B=8, T=6, H=8, V=16, G=2, bias=False, temperature=1.0, bool_mask=False),
    Shape("b6t5g3", B=6, T=5, H=12, V=48, G=3, bias=False, temperature=1.3, bool_mask=False),
)
"""Two batch shapes only: the JAX reference compiles every primitive once per shape (~30 ms each), so
the number of distinct [B, T] drives the cold-start time; the LM-head shapes, groups, bias, temperature
and mask dtype vary independently."""

EDGES: tuple[str, ...] = (
    "generic",        # random inputs, ratios near 1
    "equal_rewards",  # one group whose rewards are all equal (zero std)
    "masked_rows",    # fully masked rows
    "length_one",     # every completion has exactly one active token
    "far_ratios",     # log-ratios of ±1–3: far outside every clip range
    "huge_logits",    # logits ~ 1e2–1e3 (exp overflows without the max shift); not run in bfloat16
    "tiny_logits",    # logits ~ 1e-4 (near-uniform distributions)
    "nan_rewards",    # unscorable rewards: NaN rows, a group with one scorable member, an all-NaN group
)
MIN_CASES_PER_ALGO = 16
"""Variants are repeated on other (shape, edge) pairs until each algorithm has at least this many cases."""
LOW_PRECISION_UNSAFE_EDGES = {"bfloat16": {"huge_logits"}}
"""Edges a dtype cannot represent: bfloat16 logits of ~300 have a spacing of 2 (the log-probs would be noise)."""


@dataclass(frozen=True)
class Case:
    algo: str
    variant: str
    config: Any
    options: dict = field(hash=False, compare=False)
    shape: Shape
    edge: str

    @property
    def name(self) -> str:
        return f"{self.algo}/{self.variant}/{self.shape.name}/{self.edge}"

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode())

    @property
    def problem(self) -> problems.Problem:
        return problems.PROBLEMS[self.algo]

    @property
    def num_generations(self) -> int:
        return self.options.get("num_generations", self.shape.G)

    @cached_property
    def inputs(self) -> CaseInputs:
        return build_inputs(self)


def _bf16_grid(x: np.ndarray) -> np.ndarray:
    """Round float64 to the nearest bfloat16 value (round-to-nearest-even on the top 16 bits of float32)."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def _is_float_array(x) -> bool:
    return isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating)


def f32_grid(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64).astype(np.float32).astype(np.float64)


def naive_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0):
    """NumPy float64 log_softmax((hidden @ weight.T + bias) / temperature)[targets] (the naive oracle)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    scaled = logits / temperature
    shifted = scaled - scaled.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def _lengths(rng: np.random.Generator, shape: Shape, edge: str) -> np.ndarray:
    lengths = rng.integers(1, shape.T + 1, size=shape.B)
    lengths[rng.integers(shape.B)] = shape.T  # at least one full-length row
    if edge == "length_one":
        lengths[:] = 1
    if edge == "masked_rows":
        lengths[rng.choice(shape.B, size=max(1, shape.B // 4), replace=False)] = 0
    return lengths


@dataclass(frozen=True)
class CaseInputs:
    """The float64 arrays of one case (hidden/LM head on the bfloat16 grid, the rest on the float32 grid)."""

    hidden: np.ndarray  # [B, T, H]
    weight: np.ndarray  # [V, H]
    bias: np.ndarray | None  # [V]
    targets: np.ndarray  # [B, T] int
    temperature: float
    mask: np.ndarray  # [B, T] float64 0/1; backends pass it as bool when the shape says so
    data: dict[str, Any]  # the algorithm's own inputs (problems.py), mask included
    params: dict[str, np.ndarray]  # differentiable inputs besides the log-probs (PPO values)
    cotangent: float  # upstream gradient of the loss: gradients are of cotangent * loss
    logp: np.ndarray  # [B, T] float64 naive log-probs of these inputs
    logit_magnitude: float  # max |logits / temperature|: widens low-precision tolerances (tolerances.conditioning)


def build_inputs(case: Case) -> CaseInputs:
    """Draw the common model inputs, then the algorithm's own (problems.py), all from the case's seed."""
    rng = np.random.default_rng(case.seed)
    shape, edge = case.shape, case.edge
    logit_scale = {"huge_logits": 150.0, "tiny_logits": 1e-4}.get(edge, 2.5)
    hidden = _bf16_grid(rng.normal(size=(shape.B, shape.T, shape.H)))
    weight = _bf16_grid(rng.normal(size=(shape.V, shape.H)) * logit_scale / np.sqrt(shape.H))
    bias = _bf16_grid(rng.normal(size=shape.V) * logit_scale * 0.3) if shape.bias else None
    targets = rng.integers(0, shape.V, size=(shape.B, shape.T))
    lengths = _lengths(rng, shape, edge)
    mask = (np.arange(shape.T)[None, :] < lengths[:, None]).astype(np.float64)
    logp = naive_logprobs(hidden, weight, targets, bias=bias, temperature=shape.temperature)
    own = case.problem.build(rng, case, logp=logp, mask=mask)
    own = {k: f32_grid(v) if _is_float_array(v) else v for k, v in own.items()}
    params = {k: own.pop(k) for k in case.problem.params}
    cotangent = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 2.0))
    logits = hidden @ weight.T + (0.0 if bias is None else bias)
    return CaseInputs(hidden, weight, bias, targets, shape.temperature, mask, {**own, "mask": mask}, params,
                      cotangent, logp, float(np.abs(logits).max() / shape.temperature))


def _label(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ":".join(_label(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _requirements(choice: dict, core: tuple[str, ...]) -> set:
    items = sorted(choice.items(), key=lambda kv: kv[0])
    pairs = {(a, b) for i, a in enumerate(items) for b in items[i + 1:]}
    return pairs | {("core", tuple(choice[name] for name in core))}


def variants(problem: problems.Problem, *, exhaustive: bool = False) -> list[tuple[str, object, dict]]:
    """The config variants of a problem: (name, config, options).

    Exhaustive: the full product of `problem.dimensions` (minus meaningless combinations). Default: a
    covering subset, chosen greedily in enumeration order, that contains every pair of values of any two
    dimensions (all-pairs testing) and the full product of the `core` dimensions; for GRPO that is ~30
    variants instead of 216, with every loss type meeting every other option value.
    """
    names = list(problem.dimensions)
    combos = []
    for values in itertools.product(*problem.dimensions.values()):
        choice = dict(zip(names, values))
        made = problem.variant(**choice)
        if made is not None:
            combos.append((choice, made))
    if not exhaustive:
        uncovered = set().union(*(_requirements(choice, problem.core) for choice, _ in combos))
        chosen = []
        while uncovered:
            gains = [len(_requirements(choice, problem.core) & uncovered) for choice, _ in combos]
            best = max(range(len(combos)), key=lambda i: (gains[i], -i))
            chosen.append(combos[best])
            uncovered -= _requirements(combos[best][0], problem.core)
        combos = [c for c in combos if any(c is k for k in chosen)]
    return [(",".join(f"{k}={_label(v)}" for k, v in choice.items()), config, options)
            for choice, (config, options) in combos]


def appended_variants(problem: problems.Problem) -> list[tuple[str, object, dict]]:
    """The problem's appended variants (`Problem.appended_variants`), named like the covering ones."""
    return [(",".join(f"{k}={_label(v)}" for k, v in choice.items()), config, options)
            for choice, config, options in problem.appended_variants()]


def all_cases(algos: list[str] | None = None, *, exhaustive: bool = False, every_edge: bool = False) -> list[Case]:
    """The cases of the registry: each algorithm's config variants, each paired with a shape and an edge.

    Shapes and edges are dealt to the variants by a seeded balanced permutation, so every edge meets
    every shape and no variant dimension is tied to an edge by the enumeration order. `every_edge`: each
    variant meets every edge instead (shapes in turn), for targets that support few variants (targets.py).
    The appended variants come last, dealt by a permutation of their own: adding one changes no other case.
    """
    cases: list[Case] = []
    for algo, problem in problems.PROBLEMS.items():
        if algos and algo not in algos:
            continue
        listed = variants(problem, exhaustive=exhaustive)
        appended = appended_variants(problem)
        if every_edge:
            cases += _every_edge(algo, problem, listed + appended)
            continue
        # Each variant is dealt to one (shape, edge), or more until the algorithm has MIN_CASES_PER_ALGO.
        names: set[str] = set()
        cases += _deal(algo, problem, listed * -(-MIN_CASES_PER_ALGO // len(listed)), algo, names)
        cases += _deal(algo, problem, appended * 2, f"{algo}/appended", names)  # each on two (shape, edge)
    return cases


def _deal(algo: str, problem: problems.Problem, listed: list, seed_name: str, names: set[str]) -> list[Case]:
    """Each variant of `listed` on one (shape, edge) by a balanced permutation seeded by `seed_name`; a repeated
    variant lands on a (shape, edge) it has not met (`names` holds the case names taken so far)."""
    rng = np.random.default_rng(zlib.crc32(seed_name.encode()))
    edges = [e for e in EDGES if e in problem.edges]
    edge_of = rng.permutation(np.arange(len(listed)) % len(edges))
    shape_of = rng.permutation(np.arange(len(listed)) % len(SHAPES))
    cases = []
    for i, (variant, config, options) in enumerate(listed):
        for attempt in range(len(edges) * len(SHAPES)):
            shape = SHAPES[(shape_of[i] + attempt // len(edges)) % len(SHAPES)]
            if shape.B % options.get("num_generations", shape.G):
                continue
            case = Case(algo, variant, config, options, shape, edges[(edge_of[i] + attempt) % len(edges)])
            if case.name not in names:
                break
        names.add(case.name)
        cases.append(case)
    return cases


def _every_edge(algo: str, problem: problems.Problem, listed: list) -> list[Case]:
    edges = [e for e in EDGES if e in problem.edges]
    cases = []
    for i, (variant, config, options) in enumerate(listed):
        for j, edge in enumerate(edges):
            fits = [s for s in SHAPES if s.B % options.get("num_generations", s.G) == 0]
            cases.append(Case(algo, variant, config, options, fits[(i + j) % len(fits)], edge))
    return cases


def quick_cases(cases: list[Case], stride: int = 4) -> list[Case]:
    """A deterministic subset for `--quick`: every `stride`-th case of each algorithm, all edges kept."""
    kept, seen_edges = [], set()
    for i, case in enumerate(cases):
        key = (case.algo, case.edge)
        if i % stride == 0 or key not in seen_edges:
            kept.append(case)
            seen_edges.add(key)
    return kept

"""What a run leaves behind to read: metrics.jsonl, samples.jsonl, curves.png, a console bar,
TensorBoard scalars when TensorBoard is installed; plus step timing and peak memory.

metrics.jsonl holds one JSON object per logged step: {"step", "time" (unix seconds), metric: value,
...}; non-finite values are written as null (strict JSON). With `logging_steps` N > 1 a line holds
the mean of the last N steps' finite values (TRL's logging average).
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
PLOT_FILE = "curves.png"

# Console bar label -> metric keys, first present wins (trainer names first, then other spellings).
PROGRESS_KEYS = {
    "reward": ("reward/mean", "reward"),
    "kl": ("kl", "approx_kl"),
    "len": ("completion_length/mean", "completions/mean_length"),
    "loss": ("loss",),
}


class MetricsLogger:
    """Appends metrics to `run_dir/metrics.jsonl`, drives a tqdm bar, mirrors to TensorBoard.

    tensorboard: None uses it when the `tensorboard` package is installed, True requires it, False never.
    """

    def __init__(self, run_dir: str | Path, *, logging_steps: int = 1, total_steps: int,
                 tensorboard: bool | None = None) -> None:
        if logging_steps < 1:
            raise ValueError(f"logging_steps must be >= 1, got {logging_steps}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logging_steps = logging_steps
        self.total_steps = total_steps
        self._window: dict[str, list[float]] = {}
        self._bar = None
        self._writer = _tensorboard_writer(self.run_dir, tensorboard)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record one optimizer step's metrics; written every `logging_steps` and at the last step."""
        for name, value in metrics.items():
            self._window.setdefault(name, []).append(float(value))
        self._progress(step, metrics)
        if step % self.logging_steps and step != self.total_steps:
            return
        means = {name: _finite_mean(values) for name, values in self._window.items()}
        self._window = {}
        record = {"step": step, "time": time.time()} | {k: _json_number(v) for k, v in means.items()}
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self._writer is not None:
            for name, value in means.items():
                self._writer.add_scalar(name, value, step)
            self._writer.flush()

    def log_samples(self, step: int, prompts: Sequence[str], completions: Sequence[str],
                    rewards: Sequence[float]) -> None:
        """One line per completion in `run_dir/samples.jsonl`: {"step", "prompt", "completion", "reward"}."""
        if not len(prompts) == len(completions) == len(rewards):
            raise ValueError(f"log_samples: {len(prompts)} prompts, {len(completions)} completions, "
                             f"{len(rewards)} rewards")
        with open(self.run_dir / SAMPLES_FILE, "a") as f:
            for prompt, completion, reward in zip(prompts, completions, rewards):
                line = {"step": step, "prompt": prompt, "completion": completion, "reward": _json_number(reward)}
                f.write(json.dumps(line, allow_nan=False, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()

    def _progress(self, step: int, metrics: dict[str, float]) -> None:
        from tqdm.auto import tqdm

        if self._bar is None:  # created at the first step logged, so a resumed run starts where it was
            self._bar = tqdm(total=self.total_steps, initial=step - 1, desc="train", dynamic_ncols=True,
                             file=sys.stderr)
        postfix = {}
        for label, keys in PROGRESS_KEYS.items():
            key = next((k for k in keys if k in metrics), None)
            if key is not None:
                postfix[label] = f"{metrics[key]:.4g}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """Records of `run_dir/metrics.jsonl` ordered by step; null -> nan.

    A step logged twice (a run resumed from a checkpoint older than its last log line) keeps its
    latest record. A torn last line (the process died mid-write) is skipped.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    by_step: dict[int, dict[str, float]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON line ({error})") from None
        by_step[record["step"]] = {k: math.nan if v is None else v for k, v in record.items()}
    return [by_step[step] for step in sorted(by_step)]


def plot_run(run_dir: str | Path) -> Path:
    """Draw `run_dir/curves.png` from metrics.jsonl: reward (total and per function), KL,
    completion length, loss, accuracy; panels without data are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    panels = [(title, series) for title, series in _panels(records) if series]
    columns = 2 if len(panels) > 1 else 1
    rows = max(1, math.ceil(len(panels) / columns))
    figure = Figure(figsize=(6 * columns, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)  # Agg canvas without pyplot: no global backend switch, no GUI
    if not panels:
        figure.text(0.5, 0.5, f"no metrics in {run_dir / METRICS_FILE}", ha="center", va="center")
    for index, (title, series) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        for label, key in series:
            steps = [r["step"] for r in records if key in r]
            axes.plot(steps, [r[key] for r in records if key in r], label=label, marker="." if len(steps) < 30 else None)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if len(series) > 1:
            axes.legend(fontsize="small")
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / PLOT_FILE
    figure.savefig(out, dpi=110)
    return out


def _panels(records: list[dict[str, float]]) -> list[tuple[str, list[tuple[str, str]]]]:
    keys = list(dict.fromkeys(k for r in records for k in r))

    def first(*names: str) -> list[tuple[str, str]]:
        return [(name, name) for name in names if name in keys][:1]

    per_function = [(k.removeprefix("reward/"), k) for k in keys
                    if k.startswith("reward/") and k not in ("reward/mean", "reward/std", "reward/unscorable")]
    return [
        ("reward", [("total", key) for _, key in first("reward/mean", "reward")] + per_function),
        ("KL to reference", first("kl", "approx_kl")),
        ("completion length", [(k.rsplit("/", 1)[-1], k) for k in keys if k.startswith("completion_length/")]
         or first("completions/mean_length")),
        ("loss", first("loss")),
        ("accuracy", [(k, k) for k in keys if "accurac" in k]),
    ]


class StepTimer:
    """Wall-clock seconds per phase of a step (`with timer("rollout"): ...`); synchronizes CUDA
    at the phase edges so asynchronous kernels are charged to the phase that launched them."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self._seconds[phase] = self._seconds.get(phase, 0.0) + time.perf_counter() - start

    def seconds(self, phase: str) -> float:
        """Seconds spent in `phase` so far; 0.0 if it did not run."""
        return self._seconds.get(phase, 0.0)

    def metrics(self) -> dict[str, float]:
        """{"time/<phase>": seconds, ..., "time/step": their sum}."""
        return {f"time/{phase}": s for phase, s in self._seconds.items()} | {"time/step": sum(self._seconds.values())}


def peak_memory_gib() -> float:
    """Peak memory in GiB: CUDA `max_memory_allocated` when CUDA is in use, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _json_number(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _tensorboard_writer(run_dir: Path, enabled: bool | None):
    if enabled is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch's writer needs the separate `tensorboard` package
        if enabled:
            raise ImportError("tensorboard=True needs the `tensorboard` package installed") from error
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))

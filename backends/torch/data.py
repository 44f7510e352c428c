"""Prompt datasets: JSONL/JSON, CSV, Parquet or a `datasets` folder, validated row by row.

Each row becomes a dict with "prompt" (a string, or a list of chat messages {"role", "content"}),
"answer" (a string or None) and every other field of the row unchanged: the trainer hands the
extra fields to reward functions as keyword lists, as TRL does (trl.md §1.4).

A malformed row raises `DatasetError` naming the file, the row (1-based line for JSONL and CSV,
0-based index for Parquet and `datasets`) and the field; with `skip_bad_rows=True` it is skipped
and recorded in `PromptDataset.skipped_rows` instead.

Iteration is epoch by epoch in an order shuffled from `(seed, epoch)`, so a run that saves
`state_dict()` and later calls `load_state_dict()` sees exactly the prompts it would have seen.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


class DatasetError(ValueError):
    """A dataset file or row is unusable; the message names the file, the row and the field."""


def load_prompt_dataset(path: str | Path, *, prompt_field: str = "prompt", answer_field: str = "answer",
                        skip_bad_rows: bool = False, seed: int = 0) -> PromptDataset:
    """Read and validate a prompt dataset; the format follows from the extension (or a folder).

    .jsonl/.ndjson: one JSON object per line (blank lines ignored); .json: a JSON array of objects
    or JSON lines; .csv: a header row, then one row per record; .parquet; a folder written by
    `datasets.Dataset.save_to_disk` (a DatasetDict must have a "train" split).
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    rows, skipped = [], []
    for row_label, raw in _read_raw_rows(path):
        try:
            if isinstance(raw, DatasetError):
                raise raw
            rows.append(_validate_row(raw, prompt_field, answer_field))
        except DatasetError as error:
            if not skip_bad_rows:
                raise DatasetError(f"{path}, {row_label}: {error}") from None
            skipped.append((row_label, str(error)))
    if not rows:
        detail = f" ({len(skipped)} malformed rows skipped)" if skipped else ""
        raise DatasetError(f"{path}: the dataset has no usable rows{detail}")
    return PromptDataset(rows, source=str(path), skipped_rows=skipped, seed=seed)


class PromptDataset:
    """Validated rows plus a resumable, seeded, epoch-wise shuffled cursor over them."""

    def __init__(self, rows: list[Row], *, source: str = "<memory>",
                 skipped_rows: list[tuple[str, str]] | None = None, seed: int = 0):
        if not rows:
            raise DatasetError(f"{source}: the dataset has no rows")
        self.rows = rows
        self.source = source
        self.skipped_rows = skipped_rows or []
        """(row label, reason) for every malformed row skipped with skip_bad_rows=True."""
        self.seed = seed
        self.epoch = 0
        self.position = 0
        """Rows of the current epoch already handed out."""

    @classmethod
    def from_rows(cls, rows: list[Row], *, prompt_field: str = "prompt", answer_field: str = "answer",
                  seed: int = 0, source: str = "<memory>") -> PromptDataset:
        """Validate in-memory rows (e.g. the demo task) exactly like rows read from a file."""
        checked = []
        for index, raw in enumerate(rows):
            try:
                checked.append(_validate_row(raw, prompt_field, answer_field))
            except DatasetError as error:
                raise DatasetError(f"{source}, index {index}: {error}") from None
        return cls(checked, source=source, seed=seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Row:
        return self.rows[index]

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of row indices used in `epoch`; a pure function of (seed, epoch)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def next_batch(self, batch_size: int) -> list[Row]:
        """The next `batch_size` rows in shuffled order, continuing into the next epoch when needed."""
        batch = []
        while len(batch) < batch_size:
            order = self.epoch_order(self.epoch)
            take = min(batch_size - len(batch), len(order) - self.position)
            batch += [self.rows[i] for i in order[self.position:self.position + take]]
            self.position += take
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_rows"] != len(self.rows):
            raise DatasetError(f"{self.source}: the saved cursor is for {state['num_rows']} rows, "
                               f"this dataset has {len(self.rows)}; resume with the same dataset")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]


def _read_raw_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(row label, raw row) pairs; an unparsable row is yielded as a DatasetError to validate later."""
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _read_saved_dataset(path)
    elif suffix in (".jsonl", ".ndjson"):
        yield from _read_json_lines(path)
    elif suffix == ".json":
        text = _read_text(path)
        if text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{path}: not a valid JSON array ({error})") from None
            yield from ((f"index {i}", record) for i, record in enumerate(records))
        else:
            yield from _read_json_lines(path)
    elif suffix == ".csv":
        yield from _read_csv(path)
    elif suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq
        yield from ((f"index {i}", record) for i, record in enumerate(pq.read_table(path).to_pylist()))
    else:
        raise DatasetError(f"{path}: unknown dataset format '{suffix}'; use .jsonl, .json, .csv, .parquet "
                           "or a folder saved with datasets.Dataset.save_to_disk")


def _read_json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield f"line {number}", DatasetError(f"not valid UTF-8 ({error.reason} at byte {error.start})")
                continue
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as error:
                yield f"line {number}", DatasetError(f"invalid JSON ({error.msg} at column {error.colno})")


def _read_text(path: Path) -> str:
    """The whole file as UTF-8, or a DatasetError naming the line of the first undecodable byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DatasetError(f"{path}, line {line}: not valid UTF-8 ({error.reason}); save the file as UTF-8") from None


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    with io.StringIO(_read_text(path), newline="") as file:
        reader = csv.DictReader(file)
        start = 2  # line 1 is the header; a quoted field may span lines, so track where each record starts
        for record in reader:
            label, start = f"line {start}", reader.line_num + 1
            if None in record:
                yield label, DatasetError(f"{len(record[None])} more values than the header has columns")
            elif any(value is None for value in record.values()):
                yield label, DatasetError("fewer values than the header has columns")
            else:
                # CSV has no null: an empty cell of an optional field means "absent".
                yield label, {key: (value if value != "" else None) for key, value in record.items()}


def _read_saved_dataset(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DatasetError(f"{path}: not a folder saved with datasets' save_to_disk ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DatasetError(f"{path}: a DatasetDict without a 'train' split (splits: {list(loaded)})")
        loaded = loaded["train"]
    yield from ((f"index {i}", record) for i, record in enumerate(loaded))


def _validate_row(raw: Any, prompt_field: str, answer_field: str) -> Row:
    if not isinstance(raw, dict):
        raise DatasetError(f"expected an object with a '{prompt_field}' field, got {type(raw).__name__}")
    row = dict(raw)
    if row.get(prompt_field) is None:
        raise DatasetError(f"missing field '{prompt_field}' (fields: {sorted(map(str, raw))})")
    prompt = row.pop(prompt_field)
    answer = row.pop(answer_field, None)
    row["prompt"] = _validate_prompt(prompt, prompt_field)
    row["answer"] = _validate_answer(answer, answer_field)
    return row


def _validate_prompt(prompt: Any, field: str) -> str | list[dict[str, str]]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DatasetError(f"field '{field}' is empty")
        return prompt
    if not isinstance(prompt, list):
        raise DatasetError(f"field '{field}' must be a string or a list of messages, got {type(prompt).__name__}")
    if not prompt:
        raise DatasetError(f"field '{field}' is an empty list of messages")
    messages = []
    for i, message in enumerate(prompt):
        where = f"field '{field}', message {i}"
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise DatasetError(f"{where}: expected an object with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in MESSAGE_ROLES:
            raise DatasetError(f"{where}: role must be one of {MESSAGE_ROLES}, got {message['role']!r}")
        if not isinstance(message["content"], str):
            raise DatasetError(f"{where}: content must be a string, got {type(message['content']).__name__}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _validate_answer(answer: Any, field: str) -> str | None:
    if answer is None or isinstance(answer, str):
        return answer
    # Numeric gold answers (GSM8K-style JSON) are compared as text by the reward functions.
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        if not math.isfinite(answer):  # pandas writes NaN for a missing value: not a gold answer
            raise DatasetError(f"field '{field}' is {answer}; write null for a row without an answer")
        return str(answer)
    raise DatasetError(f"field '{field}' must be a string or a number, got {type(answer).__name__}")

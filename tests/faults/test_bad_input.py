"""Malformed dataset rows of every kind, prompts longer than max_prompt_length, a tokenizer without a pad token."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from aha.backends.torch import TrainConfig, Trainer
from aha.backends.torch.data import DatasetError, load_prompt_dataset
from aha.backends.torch.tracking import read_metrics

from .conftest import save_tiny_model

GOOD = b'{"prompt": "1+1", "answer": "2"}'
BAD_ROWS = {  # kind: (the row's bytes, what the error says)
    "not an object": (b'[1, 2]', "expected an object with a 'prompt' field, got list"),
    "missing prompt": (b'{"question": "1+1"}', r"missing field 'prompt' \(fields: \['question'\]\)"),
    "null prompt": (b'{"prompt": null}', "missing field 'prompt'"),
    "blank prompt": (b'{"prompt": "  "}', "field 'prompt' is empty"),
    "prompt not text": (b'{"prompt": 12}', "field 'prompt' must be a string or a list of messages, got int"),
    "no messages": (b'{"prompt": []}', "field 'prompt' is an empty list of messages"),
    "message not object": (b'{"prompt": ["hi"]}', "field 'prompt', message 0: expected an object with 'role'"),
    "unknown role": (b'{"prompt": [{"role": "robot", "content": "hi"}]}',
                     "field 'prompt', message 0: role must be one of"),
    "content not text": (b'{"prompt": [{"role": "user", "content": 5}]}',
                         "field 'prompt', message 0: content must be a string, got int"),
    "answer not text": (b'{"prompt": "1+1", "answer": [2]}', "field 'answer' must be a string or a number, got list"),
    "answer NaN": (b'{"prompt": "1+1", "answer": NaN}',
                   "field 'answer' is nan; write null for a row without an answer"),
    "invalid JSON": (b'{"prompt": "1+1",', "invalid JSON"),
    "not UTF-8": (b'{"prompt": "1+1\xff"}', r"not valid UTF-8 \(invalid start byte"),
}


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_malformed_row_is_named_or_skipped_and_counted(tmp_path, kind):
    row, message = BAD_ROWS[kind]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join([GOOD, row, GOOD]) + b"\n")
    with pytest.raises(DatasetError, match=rf"train\.jsonl, line 2: {message}"):
        load_prompt_dataset(path)
    dataset = load_prompt_dataset(path, skip_bad_rows=True)
    assert len(dataset) == 2 and [label for label, _ in dataset.skipped_rows] == ["line 2"]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("extra.csv", "prompt,answer\n1+1,2\n2+2,4,oops\n", r"extra\.csv, line 3: 1 more values than the header"),
    ("short.csv", "prompt,answer\n1+1\n", r"short\.csv, line 2: fewer values than the header"),
    ("latin1.csv", "prompt,answer\n1+1,2\ncafé,3\n".encode("latin-1"), r"latin1\.csv, line 3: not valid UTF-8"),
    ("array.json", '[{"prompt": "1+1"}, ', r"array\.json: not a valid JSON array"),
    ("rows.txt", "1+1", r"unknown dataset format '\.txt'"),
    ("empty.jsonl", "\n\n", "the dataset has no usable rows"),
    ("missing.jsonl", None, "no such file"),
])
def test_malformed_file_is_named(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_prompt_dataset(path)


def test_trainer_stops_before_loading_the_model_or_warns_about_skipped_rows(base_config, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join([GOOD, b'{"prompt": []}', GOOD, GOOD]) + b"\n")
    values = {**base_config, "dataset": str(path), "model": str(tmp_path / "no-model-here")}
    with pytest.raises(DatasetError, match=r"line 2: field 'prompt' is an empty list"):
        Trainer(TrainConfig.from_dict(values))  # the dataset is read before the (missing) model
    with pytest.warns(RuntimeWarning, match=r"skipped 1 malformed rows \(skip_bad_rows\); the first, line 2"):
        trainer = Trainer(TrainConfig.from_dict({**base_config, "dataset": str(path), "skip_bad_rows": True}))
    assert len(trainer.dataset) == 3


def test_long_prompts_are_cut_from_the_left_and_counted(base_config):
    trainer = Trainer(TrainConfig.from_dict({**base_config, "max_prompt_length": 8, "max_steps": 1}))
    trainer.train()
    assert read_metrics(trainer.run_dir)[0]["truncated_prompts"] == 2  # both prompts of the step
    prompt_width = trainer.batch.input_ids.shape[1] - trainer.batch.completion_width
    assert prompt_width == 8


def test_long_prompt_is_an_error_naming_the_row(base_config, tmp_path):
    rows = [{"prompt": "1+1", "answer": "2"}] * 3 + [{"prompt": "what is " * 20 + "2+2?", "answer": "4"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    values = {**base_config, "dataset": str(path), "truncate_prompts": "error", "max_steps": 2,
              "num_generations": 2}  # 8 completions per step: all 4 rows in step 1
    trainer = Trainer(TrainConfig.from_dict(values))
    with pytest.raises(DatasetError, match=r"train\.jsonl, row index 3 \(prompt '.*what is what is.*'\.\.\.\): \d+ "
                                           r"tokens after the chat template, more than max_prompt_length=32"):
        trainer.train()
    assert trainer.step == 0


def test_tokenizer_without_pad_token_pads_with_eos(base_config, tmp_path):
    model = save_tiny_model(tmp_path / "no-pad", pad_token=False)
    assert AutoTokenizer.from_pretrained(model).pad_token is None
    trainer = Trainer(TrainConfig.from_dict({**base_config, "model": str(model), "max_steps": 1}))
    trainer.train()
    tokenizer, batch = trainer.tokenizer, trainer.batch
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None
    # EOS-as-pad never masks a real EOS: the mask covers every sampled token, EOS included.
    assert torch.equal(batch.mask.sum(1).long(), batch.completion_lengths)
    assert read_metrics(trainer.run_dir)[0]["step"] == 1

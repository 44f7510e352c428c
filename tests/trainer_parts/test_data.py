import csv
import json

import pytest

from aha.backends.torch.data import DatasetError, PromptDataset, load_prompt_dataset

ROWS = [
    {"prompt": "2+2", "answer": "4", "difficulty": 1},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+4"}], "answer": 7},
    {"prompt": "no gold answer here"},
]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def check_rows(dataset):
    assert len(dataset) == 3 and dataset.skipped_rows == []
    assert dataset[0] == {"prompt": "2+2", "answer": "4", "difficulty": 1}
    assert dataset[1]["prompt"][1] == {"role": "user", "content": "3+4"} and dataset[1]["answer"] == "7"
    assert dataset[2]["answer"] is None


def test_jsonl_keeps_extra_fields_and_normalizes_answers(tmp_path):
    check_rows(load_prompt_dataset(write_jsonl(tmp_path / "d.jsonl", ROWS)))


def test_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS))
    check_rows(load_prompt_dataset(path))


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    rows = [{"prompt": "2+2", "answer": "4", "difficulty": 1}, {"prompt": "5+5", "answer": None, "difficulty": 2}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    dataset = load_prompt_dataset(tmp_path / "d.parquet")
    assert [r["answer"] for r in dataset] == ["4", None] and dataset[1]["difficulty"] == 2


def test_saved_datasets_folder_and_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": "1+1", "solution": "2"}, {"question": "2+3", "solution": "5"}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "plain")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "dict")
    for folder in ("plain", "dict"):
        dataset = load_prompt_dataset(tmp_path / folder, prompt_field="question", answer_field="solution")
        assert [r["prompt"] for r in dataset] == ["1+1", "2+3"] and dataset[1]["answer"] == "5"
        assert "question" not in dataset[0]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "no_train")
    with pytest.raises(DatasetError, match="'train' split"):
        load_prompt_dataset(tmp_path / "no_train", prompt_field="question")


def test_csv_line_numbers_count_multiline_records(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["prompt", "answer"], ["two\nlines", "1"], ["ok", ""], ["", "3"]])
    with pytest.raises(DatasetError) as error:
        load_prompt_dataset(path)
    assert str(path) in str(error.value) and "line 5" in str(error.value) and "'prompt'" in str(error.value)
    dataset = load_prompt_dataset(path, skip_bad_rows=True)
    assert [r["prompt"] for r in dataset] == ["two\nlines", "ok"] and dataset[1]["answer"] is None
    assert dataset.skipped_rows == [("line 5", "missing field 'prompt' (fields: ['answer', 'prompt'])")]


def test_csv_ragged_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,answer\na,1\nb,2,extra\n")
    with pytest.raises(DatasetError, match=r"line 3: 1 more values than the header"):
        load_prompt_dataset(path)


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "x"', "invalid JSON"),
    ({"question": "x"}, "missing field 'prompt'"),
    ({"prompt": "   "}, "field 'prompt' is empty"),
    ({"prompt": 42}, "must be a string or a list of messages, got int"),
    ({"prompt": []}, "empty list of messages"),
    ({"prompt": [{"content": "x"}]}, "message 0: expected an object with 'role' and 'content'"),
    ({"prompt": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}, "message 1: role must be"),
    ({"prompt": [{"role": "user", "content": 3}]}, "content must be a string"),
    ({"prompt": "x", "answer": ["4"]}, "field 'answer' must be a string or a number"),
    ("[1, 2]", "expected an object"),
])
def test_malformed_jsonl_row_named_with_line_and_field(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], "", bad, ROWS[2]])  # the blank line 2 is ignored
    with pytest.raises(DatasetError) as error:
        load_prompt_dataset(path)
    assert str(error.value).startswith(f"{path}, line 3: ") and message in str(error.value)
    dataset = load_prompt_dataset(path, skip_bad_rows=True)
    assert len(dataset) == 2 and len(dataset.skipped_rows) == 1
    row, reason = dataset.skipped_rows[0]
    assert row == "line 3" and message in reason


def test_index_labels_for_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}, {"prompt": None}]), tmp_path / "d.parquet")
    with pytest.raises(DatasetError, match=r"index 1: missing field 'prompt'"):
        load_prompt_dataset(tmp_path / "d.parquet")


def test_empty_and_all_bad_and_unknown_format(tmp_path):
    with pytest.raises(DatasetError, match="no usable rows"):
        load_prompt_dataset(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(DatasetError, match=r"no usable rows \(2 malformed rows skipped\)"):
        load_prompt_dataset(write_jsonl(tmp_path / "bad.jsonl", ["{", "{}"]), skip_bad_rows=True)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DatasetError, match="unknown dataset format '.txt'"):
        load_prompt_dataset(tmp_path / "d.txt")
    with pytest.raises(DatasetError, match="no such file"):
        load_prompt_dataset(tmp_path / "missing.jsonl")


def test_epochs_are_seeded_permutations_and_resume_exactly():
    rows = [{"prompt": str(i), "answer": None} for i in range(7)]
    dataset = PromptDataset(rows, seed=3)
    first_epochs = [r["prompt"] for r in dataset.next_batch(14)]
    assert sorted(first_epochs[:7]) == sorted(first_epochs[7:]) == sorted(r["prompt"] for r in rows)
    assert first_epochs[:7] != first_epochs[7:] and dataset.epoch == 2

    a = PromptDataset(rows, seed=3)
    a.next_batch(5)
    saved = a.state_dict()
    expected = [r["prompt"] for r in a.next_batch(6)]
    b = PromptDataset(rows, seed=0)
    b.load_state_dict(saved)
    assert [r["prompt"] for r in b.next_batch(6)] == expected == first_epochs[5:11]
    assert [r["prompt"] for r in PromptDataset(rows, seed=4).next_batch(7)] != first_epochs[:7]
    with pytest.raises(DatasetError, match="saved cursor is for 7 rows"):
        PromptDataset(rows[:6]).load_state_dict(saved)


def test_from_rows_validates_like_files():
    assert PromptDataset.from_rows([{"q": "1+1", "a": 2}], prompt_field="q", answer_field="a")[0] == \
        {"prompt": "1+1", "answer": "2"}
    with pytest.raises(DatasetError, match="index 1: field 'prompt' is empty"):
        PromptDataset.from_rows([{"prompt": "x"}, {"prompt": ""}])

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from aha.backends.torch.chat import encode_prompts
from aha.backends.torch.data import load_prompt_dataset
from aha.backends.torch.demo import (DemoRecipe, build_demo_model, build_info, build_tokenizer, demo_dataset,
                                     evaluate_accuracy, write_jsonl)
from aha.backends.torch.demo.task import OPERANDS_LOW, OPERANDS_HIGH, is_test_pair, solution_text
from aha.backends.torch.rewards import exact_answer, think_answer_format

TINY = DemoRecipe(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, sft_steps=3,
                  batch_size=8, eval_rows=4)


def test_careful_solutions_are_right_and_sloppy_ones_right_exactly_without_carries():
    pairs = [(a, b) for a in range(OPERANDS_LOW, OPERANDS_HIGH + 1) for b in range(OPERANDS_LOW, OPERANDS_HIGH + 1)]
    careful = [solution_text(a, b, careful=True) for a, b in pairs]
    sloppy = [solution_text(a, b, careful=False) for a, b in pairs]
    answers = [str(a + b) for a, b in pairs]
    assert exact_answer(None, careful, answers) == [1.0] * len(pairs)
    assert think_answer_format(None, careful + sloppy) == [1.0] * (2 * len(pairs))
    no_carry = [a % 10 + b % 10 < 10 and a // 10 + b // 10 < 10 for a, b in pairs]
    assert exact_answer(None, sloppy, answers) == [float(x) for x in no_carry]
    assert 0.2 < sum(no_carry) / len(pairs) < 0.3
    assert solution_text(47, 85, careful=True) == "<think>7+5=12 4+8+1=13</think><answer>132</answer>"


def test_splits_are_disjoint_deterministic_and_unbiased():
    train, test = demo_dataset("train", 300, seed=1), demo_dataset("test", 300, seed=1)
    assert train == demo_dataset("train", 300, seed=1) and train != demo_dataset("train", 300, seed=2)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert all(is_test_pair(*map(int, r["prompt"].split("+"))) for r in test)
    # Held-out sums end in every digit (a linear hash would hold out only multiples of 5).
    assert {int(r["answer"]) % 10 for r in test} == set(range(10))
    with pytest.raises(ValueError, match="split must be"):
        demo_dataset("validation", 1)


def test_rows_round_trip_through_jsonl(tmp_path):
    rows = demo_dataset("test", 5)
    assert list(load_prompt_dataset(write_jsonl(rows, tmp_path / "demo.jsonl"))) == rows


def test_build_is_cached_loadable_and_scored(tmp_path):
    folder = build_demo_model(tmp_path, recipe=TINY)
    assert folder.parent == tmp_path and folder.name == f"demo-{TINY.fingerprint()}"
    info = build_info(folder)
    assert info["recipe"]["sft_steps"] == 3 and 0.0 <= info["heldout_greedy_accuracy"] <= 1.0
    stamp = (folder / "demo_build.json").stat().st_mtime_ns
    assert build_demo_model(tmp_path, recipe=TINY) == folder
    assert (folder / "demo_build.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no staging folder left behind

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    # The Auto classes must give back the very tokenizer the model was trained with.
    rows = demo_dataset("test", 3)
    assert encode_prompts(tokenizer, [r["prompt"] for r in rows]) == \
        encode_prompts(build_tokenizer(), [r["prompt"] for r in rows])
    text = solution_text(47, 85, careful=True)
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True) == text
    assert 0.0 <= evaluate_accuracy(model, tokenizer, rows, batch_size=2) <= 1.0

    assert build_demo_model(tmp_path, recipe=TINY, force=True) == folder
    assert json.loads((folder / "demo_build.json").read_text())["recipe"] == info["recipe"]


def test_recipe_change_builds_elsewhere():
    assert DemoRecipe().fingerprint() != TINY.fingerprint()
    assert DemoRecipe().fingerprint() == DemoRecipe().fingerprint()

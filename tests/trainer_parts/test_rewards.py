import numpy as np
import pytest

from aha.backends.torch.rewards import (REWARD_FUNCTIONS, RewardFunctionError, compute_rewards, exact_answer,
                                        extract_answer, length_penalty_fn, load_reward_function, normalize_answer,
                                        reward_names, think_answer_format)


@pytest.mark.parametrize("text, expected", [
    ("<think>2+2</think><answer> 4 </answer>", " 4 "),
    ("<answer>1</answer> then <answer>2</answer>", "2"),
    ("so it is 12, not 13.", "13"),
    ("total: 1,234.50 dollars", "1,234.50"),
    ("The capital is Paris.", "Paris"),
    ("", ""),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalize_answer_equates_number_spellings_and_word_case():
    assert len({normalize_answer(s) for s in ["1,000", "1000", "1000.0", " 1000 ", "$1000", "1000."]}) == 1
    assert normalize_answer("-0.50") == "-0.5" and normalize_answer("0.0") == "0"
    assert normalize_answer("New York") == normalize_answer("new  york")
    assert normalize_answer("1000") != normalize_answer("100")


def test_exact_answer():
    completions = ["<think>x</think><answer>1,000</answer>", "it is 7", "<answer>8</answer>", "Paris", "anything"]
    scores = exact_answer(None, completions, ["1000", "7.0", "9", "paris", None])
    assert scores == [1.0, 1.0, 0.0, 1.0, None]
    assert exact_answer(None, [[{"role": "assistant", "content": "<answer>3</answer>"}]], ["3"]) == [1.0]


@pytest.mark.parametrize("text, score", [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("  <think>\nmulti\nline\n</think>\n<answer>4</answer>\n", 1.0),
    ("<think>a</think>", 0.0),
    ("<answer>b</answer>", 0.0),
    ("<think>a</think><answer>b</answer> trailing", 0.0),
    ("pre <think>a</think><answer>b</answer>", 0.0),
    ("<think>a</think><think>c</think><answer>b</answer>", 0.0),
    ("<think>a</think><answer>b<answer>c</answer>", 0.0),
])
def test_think_answer_format_is_strict(text, score):
    assert think_answer_format(None, [text]) == [score]


def test_length_penalty_counts_tokens_when_given_else_characters():
    penalty = length_penalty_fn(target_length=4)
    assert penalty(None, ["abc", "abcdef"]) == [0.0, -0.5]
    assert penalty(None, ["x", "y"], completion_ids=[[1] * 8, [1] * 2]) == [-1.0, 0.0]
    assert REWARD_FUNCTIONS["length_penalty"](None, ["x"], completion_ids=[[1] * 512]) == [-1.0]


def test_load_by_name_module_and_file(tmp_path):
    assert load_reward_function("exact_answer") is exact_answer
    assert load_reward_function("aha.backends.torch.rewards:think_answer_format") is think_answer_format
    (tmp_path / "my_rewards.py").write_text(
        "def shout(prompts, completions, **kw):\n    return [float(c.isupper()) for c in completions]\n")
    shout = load_reward_function(f"{tmp_path / 'my_rewards.py'}:shout")
    assert shout(None, ["HI", "hi"]) == [1.0, 0.0] and reward_names([shout]) == ["shout"]
    with pytest.raises(ValueError, match="unknown reward function 'nope'; built-ins"):
        load_reward_function("nope")
    with pytest.raises(ValueError, match="has no callable named 'missing'"):
        load_reward_function(f"{tmp_path / 'my_rewards.py'}:missing")
    with pytest.raises(ValueError, match="no such file"):
        load_reward_function(f"{tmp_path / 'other.py'}:shout")


def test_reward_names_are_unique():
    def f(prompts, completions, **kw):
        return [0.0] * len(completions)
    assert reward_names([exact_answer, f, f, REWARD_FUNCTIONS["length_penalty"]]) == [
        "exact_answer", "f", "f_2", "length_penalty"]


def test_compute_rewards_passes_row_fields_and_maps_none_to_nan():
    seen = {}

    def spy(prompts, completions, answer, difficulty, completion_ids, **kw):
        seen.update(completions=completions, difficulty=difficulty, completion_ids=completion_ids)
        return [None, 0.5, float("nan"), 2]

    rows = [{"prompt": "a", "answer": "1", "difficulty": 1}] * 2 + [
        {"prompt": [{"role": "user", "content": "b"}], "answer": "2", "difficulty": 2}] * 2
    rewards = compute_rewards([exact_answer, spy], [1.0, 0.5], [r["prompt"] for r in rows],
                              ["1", "2", "2", "<answer>3</answer>"], rows, completion_ids=[[1], [2], [3], [4]])
    assert rewards.dtype == np.float64 and rewards.shape == (4, 2)
    np.testing.assert_array_equal(rewards, [[1.0, np.nan], [0.0, 0.5], [1.0, np.nan], [0.0, 2.0]])
    assert seen["difficulty"] == [1, 1, 2, 2] and seen["completion_ids"] == [[1], [2], [3], [4]]
    # String prompts get string completions, conversational prompts get [assistant message] (as TRL).
    assert seen["completions"][1] == "2" and seen["completions"][2] == [{"role": "assistant", "content": "2"}]


def test_raising_reward_names_function_and_sample():
    def picky(prompts, completions, **kw):
        return [1.0 / (len(c) - 3) for c in completions]  # ZeroDivisionError on the 3-character completion

    with pytest.raises(RewardFunctionError, match=r"'picky' raised ZeroDivisionError on sample 2") as error:
        compute_rewards([exact_answer, picky], None, ["p"] * 4, ["a", "bb", "ccc", "dddd"], [{"answer": "1"}] * 4)
    assert isinstance(error.value.__cause__, ZeroDivisionError)


def test_wrong_length_and_non_numbers_are_errors():
    rows = [{"answer": None}] * 3
    with pytest.raises(RewardFunctionError, match=r"'short' returned 2 rewards for 3 completions \(sample index 2"):
        compute_rewards([lambda_named("short", [1.0, 1.0])], None, ["p"] * 3, ["a"] * 3, rows)
    with pytest.raises(RewardFunctionError, match=r"'texty' returned 'good' for sample 1"):
        compute_rewards([lambda_named("texty", [1.0, "good", 0.0])], None, ["p"] * 3, ["a"] * 3, rows)
    with pytest.raises(ValueError, match="one finite weight per reward function"):
        compute_rewards([exact_answer], [1.0, 2.0], ["p"] * 3, ["a"] * 3, rows)


def lambda_named(name, values):
    def fn(prompts, completions, **kw):
        return values
    fn.__name__ = name
    return fn

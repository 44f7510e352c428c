"""Reward functions are untrusted code: one that raises, hangs or miscounts stops the run with its name;
the code_execution reward runs completions only in the sandbox, and a timeout or crash scores 0."""

from __future__ import annotations

import math
import os
import time

import pytest

from aha.backends.torch import TrainConfig, Trainer
from aha.backends.torch import sandbox
from aha.backends.torch.rewards import (REWARD_FUNCTIONS, CodeExecutionReward, RewardFunctionError, compute_rewards,
                                        extract_code, load_reward_function)

ROWS = [{"answer": None}] * 4
COMPLETIONS = ["a", "bb", "ccc", "dddd"]


def named(name, fn):
    fn.__name__ = name
    return fn


def test_raising_reward_names_the_function_and_the_sample():
    def picky(prompts, completions, **kw):
        return [1.0 / (len(c) - 3) for c in completions]  # ZeroDivisionError on "ccc" alone

    with pytest.raises(RewardFunctionError, match=r"reward function 'picky' raised ZeroDivisionError on sample 2"):
        compute_rewards([picky], None, ["p"] * 4, COMPLETIONS, ROWS)


def test_hanging_reward_times_out_naming_the_function():
    sleepy = named("sleepy", lambda prompts, completions, **kw: time.sleep(600))
    start = time.monotonic()
    with pytest.raises(RewardFunctionError, match=r"reward function 'sleepy' did not return within "
                                                  r"reward_timeout=0\.5 s for a batch of 4 completions"):
        compute_rewards([sleepy], None, ["p"] * 4, COMPLETIONS, ROWS, timeout=0.5)
    assert time.monotonic() - start < 5
    quick = named("quick", lambda prompts, completions, **kw: [1.0] * len(completions))
    assert compute_rewards([quick], None, ["p"] * 4, COMPLETIONS, ROWS, timeout=5.0).tolist() == [[1.0]] * 4


def test_reward_of_wrong_length_names_the_function():
    short = named("short", lambda prompts, completions, **kw: [1.0] * 3)
    with pytest.raises(RewardFunctionError, match=r"'short' returned 3 rewards for 4 completions \(sample index 3"):
        compute_rewards([short], None, ["p"] * 4, COMPLETIONS, ROWS)


def test_trainer_stops_on_a_hanging_reward(base_config):
    config = TrainConfig.from_dict({**base_config, "reward_timeout": 1, "max_steps": 1,
                                    "reward_funcs": ["tests/faults/rewards.py:hang"]})
    trainer = Trainer(config)
    start = time.monotonic()
    with pytest.raises(RewardFunctionError, match=r"'hang' did not return within reward_timeout=1 s"):
        trainer.train()
    assert time.monotonic() - start < 30 and trainer.step == 0


# --- code_execution --------------------------------------------------------------------------------------

ADD = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def test_code_is_extracted_from_fences_or_the_answer_tag():
    assert extract_code(ADD) == "def add(a, b):\n    return a + b\n"
    assert extract_code("<think>x</think><answer>print(1)</answer>") == "print(1)"
    assert extract_code("<answer>```python\nprint(2)\n```</answer>") == "print(2)\n"
    assert extract_code("no code here") is None


def test_code_execution_scores_the_fraction_of_tests_passed():
    reward = CodeExecutionReward()
    assert REWARD_FUNCTIONS["code_execution"] is load_reward_function("code_execution")
    wrong = fenced("def add(a, b):\n    return a - b")  # fails both
    half = fenced("def add(a, b):\n    return 3")  # passes the first only
    echo = fenced("print(input()[::-1])")
    io_tests = [{"input": "abc", "output": "cba\n"}, {"input": "xy", "output": "yx"}, {"input": "q", "output": "no"}]
    scores = reward(["p"] * 6, [ADD, wrong, half, "no code", echo, ADD],
                    tests=[ADD_TESTS, ADD_TESTS, ADD_TESTS, ADD_TESTS, io_tests, None])
    assert scores == [1.0, 0.0, 0.5, 0.0, pytest.approx(2 / 3), None]
    assert reward.pop_metrics() == {"timeouts": 0.0, "crashes": 0.0}


def test_code_execution_timeout_or_crash_scores_zero_and_is_counted():
    reward = CodeExecutionReward(limits=sandbox.SandboxLimits(timeout=1.0))
    loop = fenced("while True:\n    pass")
    killed = fenced("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    early_exit = fenced("import os\nos._exit(0)")  # would pass every assert if exit status were trusted
    forged = fenced("print('0' * 32 + ' [true, true]')")  # a fake report without the nonce
    start = time.monotonic()
    scores = reward(["p"] * 5, [loop, killed, early_exit, forged, ADD], tests=[ADD_TESTS] * 5)
    assert scores == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert time.monotonic() - start < 20
    assert reward.pop_metrics() == {"timeouts": 1.0, "crashes": 2.0}
    assert reward.pop_metrics() == {"timeouts": 0.0, "crashes": 0.0}  # counts are per call


def test_sandbox_limits_memory_processes_and_the_working_folder():
    def passes(code: str, expected: str) -> bool:
        run = sandbox.run_tests(code, [{"input": "", "output": expected}])
        return run.status == "ok" and run.passed == 1

    assert passes("try:\n    bytearray(4 << 30)\nexcept MemoryError:\n    print('limited')", "limited")
    _, _, owner, _ = sandbox.isolation()
    if owner is not None or os.geteuid() != 0:  # root itself is exempt from RLIMIT_NPROC
        assert passes("import os\ntry:\n    os.fork()\n    print('forked')\nexcept OSError:\n    print('no fork')",
                      "no fork")
    assert passes("import os\nprint(os.listdir('.'))\nopen('left-behind', 'w').write('x')", "[]")
    assert passes("import os\nprint(os.listdir('.'))", "[]")  # a fresh folder every time
    assert passes("import os\nprint(sorted(k for k in os.environ if 'TOKEN' in k or 'KEY' in k))", "[]")


def test_sandbox_has_no_network():
    prefix, _, _, description = sandbox.isolation()
    if not prefix:
        pytest.skip(f"no network isolation on this machine: {description}")
    code = ("import errno, socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=3)\n"
            "    print('connected')\nexcept OSError as error:\n    print(error.errno == errno.ENETUNREACH)")
    assert sandbox.run_tests(code, [{"input": "", "output": "True"}]).passed == 1


def test_code_execution_metrics_reach_the_trainer(base_config, tmp_path):
    rows = tmp_path / "code.jsonl"
    rows.write_text("".join(f'{{"prompt": "Write add(a, b) in Python. {i}", "tests": ["assert add(1, 2) == 3"]}}\n'
                            for i in range(4)))
    config = TrainConfig.from_dict({**base_config, "dataset": str(rows), "max_steps": 1,
                                    "reward_funcs": ["code_execution"]})
    trainer = Trainer(config)
    trainer.train()
    from aha.backends.torch.tracking import read_metrics
    row = read_metrics(trainer.run_dir)[0]
    # The random tiny model writes no code: every completion scores 0, none times out or crashes.
    assert row["reward/code_execution"] == 0.0 and row["reward/code_execution/unscorable"] == 0
    assert row["reward/code_execution/timeouts"] == 0 and row["reward/code_execution/crashes"] == 0
    assert math.isfinite(row["loss"])

"""Reward functions for the fault tests, loaded as 'tests/faults/rewards.py:<name>' (TRL's signature)."""

import math
import time


def count_sevens(prompts, completions, **row_fields):
    return [text.count("7") / max(1, len(text)) for text in completions]


def inf_on_first(prompts, completions, **row_fields):
    """+inf for the first completion of the batch: not scorable, counted."""
    return [math.inf] + [0.5] * (len(completions) - 1)


def hang(prompts, completions, **row_fields):
    time.sleep(600)
    return [0.0] * len(completions)

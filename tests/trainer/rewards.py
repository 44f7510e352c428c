"""A user reward file loaded as 'tests/trainer/rewards.py:count_sevens' (TRL's signature)."""


def count_sevens(prompts, completions, **row_fields):
    return [text.count("7") / max(1, len(text)) for text in completions]


def digit_fraction(prompts, completions, **row_fields):
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]

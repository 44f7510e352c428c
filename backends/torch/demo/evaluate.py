"""Greedy accuracy on rows with gold answers: the number the demo reports before and after RL."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..chat import encode_prompts
from ..rewards import exact_answer
from ..rollout import HFRolloutEngine, SamplingParams


def evaluate_accuracy(model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, batch_size: int = 64,
                      max_new_tokens: int = 40, system_prompt: str | None = None,
                      chat_template: str | None = "auto") -> float:
    """Fraction of rows whose greedy completion the `exact_answer` reward scores 1.0 (every row
    needs an "answer"; the prompt is rendered as for training, see chat.encode_prompts)."""
    missing = [i for i, row in enumerate(rows) if row.get("answer") is None]
    if missing:
        raise ValueError(f"evaluate_accuracy needs a gold answer in every row; rows {missing[:5]} have none")
    engine = HFRolloutEngine(model, tokenizer, max_batch_size=batch_size)
    prompt_ids = encode_prompts(tokenizer, [row["prompt"] for row in rows], system_prompt=system_prompt,
                                chat_template=chat_template)
    rollout = engine.generate(prompt_ids, 1, SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
    scores = exact_answer([row["prompt"] for row in rows], rollout.texts, [row["answer"] for row in rows])
    return float(np.mean([score == 1.0 for score in scores]))

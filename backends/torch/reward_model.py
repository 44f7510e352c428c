"""A reward model as a reward function: `reward_funcs: ["reward_model:PATH_OR_HUB_ID"]`.

TRL's semantics (trl.md §1.4): the text is prompt + completion (for chat prompts, the model's
chat template over the messages and the completion as the assistant turn), tokenized
right-padded without special tokens, and the reward is `logits[:, 0]` of an
`AutoModelForSequenceClassification` with one label. Scored without gradient, in batches, on the
training device; the model is loaded once, on first use.
"""

from __future__ import annotations

from typing import Any

import torch

PREFIX = "reward_model:"


class RewardModel:
    def __init__(self, name_or_path: str, *, batch_size: int = 16, device: str | None = None):
        self.name_or_path = name_or_path
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.__name__ = "reward_model"
        self._model = self._tokenizer = None

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        model = AutoModelForSequenceClassification.from_pretrained(self.name_or_path, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id  # TRL sets it from the reward tokenizer
        self._model, self._tokenizer = model.to(self.device).eval(), tokenizer

    def _text(self, prompt: Any, completion: Any) -> str:
        if isinstance(prompt, list):  # chat messages; the completion arrives as [assistant message]
            messages = prompt + (completion if isinstance(completion, list)
                                 else [{"role": "assistant", "content": completion}])
            return self._tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + (completion[0]["content"] if isinstance(completion, list) else completion)

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        if self._model is None:
            self._load()
        texts = [self._text(p, c) for p, c in zip(prompts, completions)]
        rewards: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self._tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                     add_special_tokens=False).to(self.device)
            rewards += self._model(**inputs).logits[:, 0].float().tolist()
        return rewards

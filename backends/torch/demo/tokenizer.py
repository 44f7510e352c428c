"""A character-level tokenizer built locally (no download), as a standard PreTrainedTokenizerFast.

Every printable ASCII character is one token; the four format tags are single (non-special)
tokens so the model emits them in one step and decoding with skip_special_tokens keeps them.
The chat template is chat.py's "plain" one, stored in the tokenizer like any chat model's.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from ..chat import PLAIN_TEMPLATE

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
FORMAT_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS.values(), *CHARACTERS])}
    # BPE without merges splits text into its characters; Fuse joins them back without spaces.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.add_tokens(FORMAT_TAGS)
    tokenizer.chat_template = PLAIN_TEMPLATE
    return tokenizer

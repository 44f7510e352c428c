"""Tiny causal LMs built from a config and saved to disk, so tests go through `from_pretrained`."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, LlamaForCausalLM

VOCAB = 100


def _save_tokenizer(path):
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(path)


def _save_model(path, model_class, config):
    torch.manual_seed(0)
    model_class(config).save_pretrained(path)
    _save_tokenizer(path)
    return str(path)


@pytest.fixture(scope="session")
def save_tiny_model():
    """save_tiny_model(path, model_class, config) -> str: random weights (seed 0) plus a tokenizer."""
    return _save_model


@pytest.fixture(scope="session")
def qwen_path(tmp_path_factory):
    """Qwen2, untied LM head, q/k/v biases; hidden 64 so 4-bit blocks of 64 fit."""
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    return _save_model(tmp_path_factory.mktemp("qwen"), Qwen2ForCausalLM, config)


@pytest.fixture(scope="session")
def llama_tied_path(tmp_path_factory):
    """Llama with tied input/output embeddings."""
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    return _save_model(tmp_path_factory.mktemp("llama"), LlamaForCausalLM, config)


@pytest.fixture
def batch():
    """[3, 10] ids: row 0 full, row 1 left-padded prompt, row 2 right-padded completion."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (3, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    attention_mask[2, -2:] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask

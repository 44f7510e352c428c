import pytest

from aha.backends.torch.chat import ChatTemplateError, encode_prompts, render_prompt, resolve_chat_template
from aha.backends.torch.demo import build_tokenizer

CONVERSATION = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "2+2"}]


@pytest.fixture
def bare_tokenizer():
    """A base-model tokenizer: no chat template."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


def test_auto_falls_back_to_plain_for_a_tokenizer_without_template(bare_tokenizer):
    assert render_prompt(bare_tokenizer, "2+2") == "<s>User: 2+2\nAssistant:"
    assert render_prompt(bare_tokenizer, "2+2", system_prompt="Think.") == "<s>System: Think.\nUser: 2+2\nAssistant:"
    assert render_prompt(bare_tokenizer, CONVERSATION) == "<s>User: hi\nAssistant: yo</s>\nUser: 2+2\nAssistant:"


def test_system_prompt_not_doubled(bare_tokenizer):
    messages = [{"role": "system", "content": "Own."}, {"role": "user", "content": "q"}]
    assert render_prompt(bare_tokenizer, messages, system_prompt="Other.") == "<s>System: Own.\nUser: q\nAssistant:"


def test_chatml(bare_tokenizer):
    assert render_prompt(bare_tokenizer, "2+2", system_prompt="S", chat_template="chatml") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_template_wins_under_auto_and_raw_jinja_is_accepted(bare_tokenizer):
    bare_tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}>"
    assert render_prompt(bare_tokenizer, "q") == "[q]>"
    assert render_prompt(bare_tokenizer, "q", chat_template="tokenizer") == "[q]>"
    assert render_prompt(bare_tokenizer, "q", chat_template="{{ messages[0]['content'] | upper }}") == "Q"


def test_unknown_or_missing_template_is_a_clear_error(bare_tokenizer):
    with pytest.raises(ChatTemplateError, match=r"unknown chat_template 'llama9'; choose one of \('auto'"):
        resolve_chat_template(bare_tokenizer, "llama9")
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        resolve_chat_template(bare_tokenizer, "tokenizer")


def test_encode_prompts_matches_rendered_text_and_truncates_from_the_left(bare_tokenizer):
    ids = encode_prompts(bare_tokenizer, ["2+2", CONVERSATION])
    assert ids[0] == bare_tokenizer("<s>User: 2+2\nAssistant:", add_special_tokens=False)["input_ids"]
    assert ids[0][0] == bare_tokenizer.bos_token_id and ids[0].count(bare_tokenizer.bos_token_id) == 1
    short = encode_prompts(bare_tokenizer, [CONVERSATION], max_prompt_length=5)[0]
    assert short == ids[1][-5:] and bare_tokenizer.decode(short) == "tant:"

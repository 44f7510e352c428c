import pytest
import torch
from transformers import AutoModelForCausalLM

from aha.backends.torch.batch import position_ids_from_mask
from aha.backends.torch.models import load_policy
from aha.conformance.tolerances import tolerance

K = 4  # logits_to_keep


def assert_close(actual, expected, dtype_name="float32"):
    tol = tolerance(dtype_name)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol.rtol, atol=tol.atol)


def model_logits(model, input_ids, attention_mask):
    """The oracle: the model's own logits for the positions predicting the last K tokens."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.logits[:, -K - 1:-1]


def randomize_lora_b(policy):
    """peft starts B at zero (adapter = identity); give it values so the adapter path matters."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in policy.named_trainable_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("lora_r", [0, 4])
@pytest.mark.parametrize("path_fixture", ["qwen_path", "llama_tied_path"])
def test_hidden_states_times_head_equal_model_logits(request, path_fixture, lora_r, batch):
    policy = load_policy(request.getfixturevalue(path_fixture), dtype="float32", lora_r=lora_r, device="cpu")
    randomize_lora_b(policy)
    input_ids, attention_mask = batch
    policy.model.train()  # checkpointed path, grad enabled
    hidden = policy.hidden_states(input_ids, attention_mask, K)
    assert hidden.shape == (3, K, policy.lm_head_weight.shape[1])
    assert hidden.requires_grad
    with torch.no_grad():
        expected = model_logits(policy.model, input_ids, attention_mask)
    assert_close(hidden @ policy.lm_head_weight.T, expected)


def test_tied_head_is_the_embedding(llama_tied_path):
    policy = load_policy(llama_tied_path, dtype="float32", device="cpu")
    embedding = policy.model.get_base_model().get_input_embeddings().weight
    assert policy.lm_head_weight.data_ptr() == embedding.data_ptr()
    assert policy.lm_head_bias is None


def test_lora_leaves_head_alone_and_gradients_reach_only_trainable(qwen_path, batch):
    policy = load_policy(qwen_path, dtype="float32", lora_r=4, device="cpu")
    trainable = policy.named_trainable_parameters()
    assert trainable and all("lora_" in name for name, _ in trainable)
    assert not any("lm_head" in name for name, _ in trainable)
    assert type(policy.model.get_base_model().lm_head) is torch.nn.Linear

    policy.model.train()
    hidden = policy.hidden_states(*batch, K)
    torch.logsumexp(hidden @ policy.lm_head_weight.T, -1).sum().backward()
    for name, param in policy.model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
    assert any(param.grad.abs().sum() > 0 for name, param in trainable if "lora_B" in name)


def test_checkpointing_changes_no_gradient(qwen_path, batch):
    def gradients(checkpointing):
        torch.manual_seed(0)  # same LoRA initialization
        policy = load_policy(qwen_path, dtype="float32", lora_r=4, gradient_checkpointing=checkpointing,
                             device="cpu")
        randomize_lora_b(policy)
        assert policy.model.get_base_model().model.layers[0].gradient_checkpointing == checkpointing
        policy.model.train()
        torch.logsumexp(policy.hidden_states(*batch, K) @ policy.lm_head_weight.T, -1).sum().backward()
        return [p.grad for p in policy.trainable_parameters()]

    for checkpointed, plain in zip(gradients(True), gradients(False)):
        assert_close(checkpointed, plain)


def test_reference_is_the_base_model_until_the_adapter_trains(qwen_path, batch):
    policy = load_policy(qwen_path, dtype="float32", lora_r=4, device="cpu")
    base = AutoModelForCausalLM.from_pretrained(qwen_path, dtype=torch.float32)
    with torch.no_grad():
        base_logits = model_logits(base, *batch)

    def reference_logits():
        with torch.no_grad(), policy.reference() as ref:
            return ref.hidden_states(*batch, K) @ ref.lm_head_weight.T

    with torch.no_grad():
        assert_close(policy.hidden_states(*batch, K) @ policy.lm_head_weight.T, base_logits)
    assert_close(reference_logits(), base_logits)

    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    policy.model.train()
    (policy.hidden_states(*batch, K) @ policy.lm_head_weight.T).square().mean().backward()
    optimizer.step()
    policy.model.eval()

    with torch.no_grad():
        trained = policy.hidden_states(*batch, K) @ policy.lm_head_weight.T
    assert (trained - base_logits).abs().max() > 1e-3
    assert_close(reference_logits(), base_logits)


def test_full_fine_tuning_reference_needs_a_copy(qwen_path, batch):
    policy = load_policy(qwen_path, dtype="float32", lora_r=0, device="cpu")
    assert len(policy.trainable_parameters()) == len(list(policy.model.parameters()))
    with pytest.raises(RuntimeError, match="reference_copy"):
        with policy.reference():
            pass

    policy = load_policy(qwen_path, dtype="float32", lora_r=0, reference_copy="cpu", device="cpu")

    def logits():
        return policy.hidden_states(*batch, K) @ policy.lm_head_weight.T

    with torch.no_grad(), policy.reference():
        before = logits()
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    logits().square().mean().backward()  # moves every weight, the LM head included
    optimizer.step()
    with policy.reference():  # the copy is frozen: no graph even with grad enabled
        reference = policy.hidden_states(*batch, K)
        assert not reference.requires_grad
        assert_close(reference @ policy.lm_head_weight.T, before)
    with torch.no_grad():
        assert (logits() - before).abs().max() > 1e-3


def test_position_ids_default_counts_attended_tokens(qwen_path, batch):
    policy = load_policy(qwen_path, dtype="float32", device="cpu")
    input_ids, attention_mask = batch
    assert position_ids_from_mask(attention_mask)[1].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]
    with torch.no_grad():
        default = policy.hidden_states(input_ids, attention_mask, K)
        explicit = policy.hidden_states(input_ids, attention_mask, K,
                                        position_ids=position_ids_from_mask(attention_mask))
        arange = policy.hidden_states(input_ids, attention_mask, K, position_ids=torch.arange(10).expand(3, 10))
        stretched = policy.hidden_states(input_ids, attention_mask, K, position_ids=torch.arange(0, 20, 2).expand(3, 10))
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    # RoPE sees only offsets: shifting a left-padded row's positions changes nothing (row 2 differs
    # only at its right padding, which the completion mask drops)
    assert_close(arange[:2], default[:2])
    assert (stretched - default).abs().max() > 1e-3  # explicit positions are used
    assert policy.tokenizer.pad_token_id == 0


def test_invalid_options_are_refused(qwen_path):
    with pytest.raises(ValueError, match="LM head"):
        load_policy(qwen_path, lora_r=4, lora_target_modules=["q_proj", "lm_head"], device="cpu")
    with pytest.raises(ValueError, match="lora_r > 0"):
        load_policy(qwen_path, lora_r=0, load_in_4bit=True, device="cpu")
    with pytest.raises(ValueError, match="full fine-tuning"):
        load_policy(qwen_path, lora_r=4, reference_copy="cpu", device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        load_policy(qwen_path, offload_activations=True, device="cpu")


def test_qlora_on_cpu(qwen_path, batch):
    """bitsandbytes >= 0.46 runs nf4 layers on the CPU; the adapter trains on top of them."""
    import bitsandbytes as bnb

    policy = load_policy(qwen_path, lora_r=4, load_in_4bit=True, device="cpu")
    base_layer = policy.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base_layer, bnb.nn.Linear4bit)
    assert base_layer.weight.quant_type == "nf4" and base_layer.weight.compress_statistics
    randomize_lora_b(policy)
    policy.model.train()
    hidden = policy.hidden_states(*batch, K)
    (hidden.float() @ policy.lm_head_weight.float().T).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())
    with torch.no_grad():
        expected = model_logits(policy.model, *batch)
        adapted = policy.hidden_states(*batch, K)
        assert_close(adapted @ policy.lm_head_weight.T, expected, "bfloat16")
        with policy.reference() as ref:
            assert (ref.hidden_states(*batch, K) - adapted).abs().max() > 0.1


def test_qlora_on_cpu_trains_after_an_eval_forward(qwen_path, batch):
    """Scoring (eval, no grad) must not switch bitsandbytes' CPU layers to an inference-only path."""
    def gradients(score_first):
        torch.manual_seed(0)
        policy = load_policy(qwen_path, lora_r=4, load_in_4bit=True, device="cpu")
        randomize_lora_b(policy)
        if score_first:
            policy.model.eval()
            with torch.no_grad():
                policy.hidden_states(*batch, K)
        policy.model.train()
        policy.hidden_states(*batch, K).float().square().sum().backward()
        return [p.grad for p in policy.trainable_parameters()]

    for scored, fresh in zip(gradients(True), gradients(False)):
        torch.testing.assert_close(scored, fresh, rtol=0, atol=0)


def test_unsupported_4bit_backend_fails_clearly(qwen_path, monkeypatch):
    import bitsandbytes as bnb

    def broken(*args, **kwargs):
        raise NotImplementedError("no 4-bit kernels for this device")

    monkeypatch.setattr(bnb.nn, "Linear4bit", broken)
    with pytest.raises(RuntimeError, match="bitsandbytes .* cannot run 4-bit nf4 layers on cpu"):
        load_policy(qwen_path, load_in_4bit=True, device="cpu")

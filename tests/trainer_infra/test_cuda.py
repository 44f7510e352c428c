"""GPU-only checks (skipped without CUDA): bf16 hidden states on the device, and that offloaded
checkpointing really moves the layer inputs off the GPU."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from aha.backends.torch.batch import position_ids_from_mask
from aha.backends.torch.models import load_policy
from aha.conformance.tolerances import tolerance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LAYERS, HIDDEN, BATCH, LENGTH = 8, 1024, 4, 2048


@pytest.fixture(scope="module")
def wide_path(tmp_path_factory, save_tiny_model):
    config = Qwen2Config(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=512,
                         max_position_embeddings=LENGTH, dtype="bfloat16")
    return save_tiny_model(tmp_path_factory.mktemp("wide"), Qwen2ForCausalLM, config)


def peak_training_bytes(policy):
    input_ids = torch.randint(3, 100, (BATCH, LENGTH), device="cuda")
    mask = torch.ones_like(input_ids)
    policy.model.train()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    policy.hidden_states(input_ids, mask, LENGTH // 2).float().square().mean().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def test_offloaded_checkpointing_lowers_peak_memory(wide_path):
    plain = peak_training_bytes(load_policy(wide_path, dtype="bfloat16", lora_r=8, device="cuda"))
    torch.cuda.empty_cache()
    offloaded = peak_training_bytes(load_policy(wide_path, dtype="bfloat16", lora_r=8, offload_activations=True, device="cuda"))
    layer_inputs = (LAYERS - 1) * BATCH * LENGTH * HIDDEN * 2  # bf16 inputs that wait on the host
    print(f"peak over weights: plain {plain / 2**20:.0f} MiB, offloaded {offloaded / 2**20:.0f} MiB, "
          f"layer inputs {layer_inputs / 2**20:.0f} MiB")
    assert offloaded < plain - layer_inputs / 2


def test_bf16_hidden_states_on_cuda(wide_path):
    policy = load_policy(wide_path, dtype="bfloat16", lora_r=8, device="cuda")
    input_ids = torch.randint(3, 100, (2, 64), device="cuda")
    mask = torch.ones_like(input_ids)
    mask[1, :5] = 0
    with torch.no_grad():
        hidden = policy.hidden_states(input_ids, mask, 16)
        logits = policy.model(input_ids=input_ids, attention_mask=mask,
                              position_ids=position_ids_from_mask(mask)).logits[:, -17:-1]
    tol = tolerance("bfloat16")
    torch.testing.assert_close((hidden @ policy.lm_head_weight.T).float(), logits.float(), rtol=tol.rtol, atol=tol.atol)

import copy
import random

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from aha.backends.torch.checkpoint import (CheckpointError, export_merged, latest_checkpoint, list_checkpoints,
                                           load_checkpoint, save_checkpoint)
from aha.backends.torch.models import load_policy
from aha.conformance.tolerances import tolerance

K = 4


def make_run(path, lora_r=4):
    policy = load_policy(path, dtype="float32", lora_r=lora_r, device="cpu")
    value_head = torch.nn.Linear(policy.lm_head_weight.shape[1], 1)
    params = policy.trainable_parameters() + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return policy, value_head, optimizer, scheduler


def train_step(policy, value_head, optimizer, scheduler, batch):
    policy.model.train()
    hidden = policy.hidden_states(*batch, K)
    loss = torch.logsumexp(hidden @ policy.lm_head_weight.T, -1).mean() + value_head(hidden).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def snapshot(policy, value_head, optimizer, scheduler):
    return ({n: p.detach().clone() for n, p in policy.model.state_dict().items()},
            {n: p.detach().clone() for n, p in value_head.state_dict().items()},
            copy.deepcopy(optimizer.state_dict()), copy.deepcopy(scheduler.state_dict()))


def draws():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


@pytest.mark.parametrize(("path_fixture", "lora_r"), [("qwen_path", 4), ("llama_tied_path", 0)])
def test_round_trip_restores_weights_optimizer_scheduler_and_rng(request, tmp_path, batch, path_fixture, lora_r):
    model_path = request.getfixturevalue(path_fixture)
    run = make_run(model_path, lora_r)
    policy, value_head, optimizer, scheduler = run
    for _ in range(2):
        train_step(*run, batch)
    state = {"step": 2, "data": {"epoch": 0, "position": 7}, "metrics": [{"loss": 1.5}]}
    path = save_checkpoint(tmp_path, 2, policy=policy, optimizer=optimizer, scheduler=scheduler,
                           trainer_state=state, extra_modules={"value_head": value_head})
    assert path == tmp_path / "checkpoint-2" and latest_checkpoint(tmp_path) == path
    assert (path / ("adapter_model.safetensors" if lora_r else "model.safetensors")).is_file()
    saved, expected_draws = snapshot(*run), draws()

    train_step(*run, batch)  # move everything away from the saved state
    fresh = make_run(model_path, lora_r)  # and load into a different process-like fresh run
    assert load_checkpoint(path, policy=fresh[0], optimizer=fresh[2], scheduler=fresh[3],
                           extra_modules={"value_head": fresh[1]}) == state
    assert draws() == expected_draws
    restored = snapshot(*fresh)
    for before, after in zip(saved[:2], restored[:2]):
        assert before.keys() == after.keys()
        for name in before:
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(restored[2], saved[2], rtol=0, atol=0)
    assert restored[3] == saved[3]

    # the restored run continues exactly like the original would have
    load_checkpoint(path, policy=policy, optimizer=optimizer, scheduler=scheduler,
                    extra_modules={"value_head": value_head})
    train_step(*run, batch)
    train_step(*fresh, batch)
    for name, param in policy.model.state_dict().items():
        torch.testing.assert_close(fresh[0].model.state_dict()[name], param, rtol=0, atol=0)


def test_corrupted_or_missing_file_is_named(qwen_path, tmp_path):
    policy, value_head, optimizer, scheduler = make_run(qwen_path)
    path = save_checkpoint(tmp_path, 1, policy=policy, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"step": 1})
    weights = path / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is corrupted"):
        load_checkpoint(path, policy=policy, optimizer=optimizer, scheduler=scheduler)
    weights.write_bytes(original)
    (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="optimizer.pt is missing"):
        load_checkpoint(path, policy=policy, optimizer=optimizer, scheduler=scheduler)


def test_mismatches_are_refused(qwen_path, tmp_path):
    policy, value_head, optimizer, scheduler = make_run(qwen_path)
    path = save_checkpoint(tmp_path, 1, policy=policy, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={}, extra_modules={"value_head": value_head})
    with pytest.raises(CheckpointError, match="extra modules"):
        load_checkpoint(path, policy=policy)
    full = load_policy(qwen_path, dtype="float32", lora_r=0, device="cpu")
    with pytest.raises(CheckpointError, match="LoRA vs full"):
        load_checkpoint(path, policy=full, extra_modules={"value_head": value_head})


def test_crash_mid_save_leaves_previous_checkpoint_and_no_partial(qwen_path, tmp_path):
    policy, value_head, optimizer, scheduler = make_run(qwen_path)
    first = save_checkpoint(tmp_path, 1, policy=policy, optimizer=optimizer, scheduler=scheduler,
                            trainer_state={"step": 1})

    class Exploding(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 2, policy=policy, optimizer=optimizer, scheduler=scheduler,
                        trainer_state={"step": 2}, extra_modules={"head": Exploding()}, save_total_limit=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert latest_checkpoint(tmp_path) == first
    assert load_checkpoint(first, policy=policy, optimizer=optimizer, scheduler=scheduler) == {"step": 1}

    (tmp_path / ".checkpoint-3.tmp").mkdir()  # what a killed save leaves: ignored, then cleaned up
    (tmp_path / "checkpoint-9").mkdir()  # no manifest: not a checkpoint
    assert latest_checkpoint(tmp_path) == first
    save_checkpoint(tmp_path, 3, policy=policy, optimizer=optimizer, scheduler=scheduler, trainer_state={})
    assert not (tmp_path / ".checkpoint-3.tmp").exists()


def test_save_total_limit_keeps_newest(qwen_path, tmp_path):
    policy, value_head, optimizer, scheduler = make_run(qwen_path)
    for step in (1, 2, 10, 10):  # the same step twice replaces it
        save_checkpoint(tmp_path, step, policy=policy, optimizer=optimizer, scheduler=scheduler,
                        trainer_state={"step": step}, save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-2"]


def test_export_merged_matches_base_plus_adapter(qwen_path, tmp_path, batch):
    policy, value_head, optimizer, scheduler = make_run(qwen_path)
    train_step(policy, value_head, optimizer, scheduler, batch)
    train_step(policy, value_head, optimizer, scheduler, batch)  # B != 0 after the second step
    save_checkpoint(tmp_path / "run", 2, policy=policy, optimizer=optimizer, scheduler=scheduler, trainer_state={})
    out = export_merged(tmp_path / "run", tmp_path / "merged")

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name in merged.state_dict())
    assert list(out.glob("*.safetensors")) and AutoTokenizer.from_pretrained(out).pad_token == "<pad>"
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen_path),
                                        str(tmp_path / "run" / "checkpoint-2"))
    base = AutoModelForCausalLM.from_pretrained(qwen_path)
    input_ids, attention_mask = batch
    with torch.no_grad():
        expected = adapted(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = merged(input_ids=input_ids, attention_mask=attention_mask).logits
        untrained = base(input_ids=input_ids, attention_mask=attention_mask).logits
    tol = tolerance("float32")
    torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol)
    assert (actual - untrained).abs().max() > 1e-3

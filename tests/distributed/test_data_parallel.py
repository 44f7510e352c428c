"""Two processes (torchrun, gloo on CPU) take the single-process step on the union of their batches: the same
samples, rewards, losses and gradients (spec/common.md eq. 7), and checkpoints that resume on one process.

LoRA runs replicate the adapter and average gradients (distributed.py); full fine-tuning runs shard the model
with FSDP2 (sharding.py). One process sees the same global batch with twice the gradient accumulation:
per process 2 prompts x 4 completions in 2 micro-batches of 4, in one process 4 prompts in 4 micro-batches.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from aha.backends.torch import TrainConfig
from aha.backends.torch.trainer import Trainer
from aha.backends.torch.tracking import read_metrics
from aha.conformance.tolerances import tolerance

from .conftest import torchrun
from .recording import record_gradients

pytestmark = pytest.mark.slow

SAME_ON_ONE_PROCESS = ["reward/mean", "reward/digit_fraction", "completion_length/mean", "frac_truncated", "loss",
                       "grad_norm", "entropy", "frac_reward_zero_std"]
"""Metrics that are the single-process value on the union (means over equal shares, sums of scaled losses);
standard deviations (advantage/std, reward/std) are per-process values averaged, not pooled."""
VARIANTS = {
    # c = P with N summed over processes; the batch std of the gathered rewards.
    "lora-dapo-batch": dict(loss_type="dapo", scale_rewards="batch"),
    # FSDP2; c = 1/GA (a mean over sequences).
    "fsdp-grpo-group": dict(loss_type="grpo", scale_rewards="group", lora_r=0, fsdp=True),
}


def _single_process(values: dict, output_dir, *, steps: int, resume=None):
    """One process on the global batch: twice the accumulation; its gradients and its trainer."""
    config = {**values, "gradient_accumulation_steps": 2 * values["gradient_accumulation_steps"], "fsdp": False,
              "output_dir": str(output_dir), "max_steps": steps, "save_steps": 2, "resume": resume}
    trainer = Trainer(TrainConfig.from_dict(config))
    gradients = record_gradients(trainer)
    trainer.train()
    return trainer, gradients


def _weights(checkpoint) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (checkpoint / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(checkpoint / name)


def _assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol, what: str) -> None:
    """The suite's closeness rule: |got - expected| <= atol·max|expected| + rtol·|expected|, per tensor."""
    assert got.keys() == expected.keys(), what
    for name, reference in expected.items():
        allowed = tol.atol * reference.abs().max() + tol.rtol * reference.abs()
        excess = ((got[name] - reference).abs() - allowed).max().item()
        assert excess <= 0, f"{what}, {name}: {(got[name] - reference).abs().max().item():.3g} beyond the tolerance"


def _assert_metrics(got: list[dict], expected: list[dict]) -> None:
    tol = tolerance("float32")
    assert [row["step"] for row in got] == [row["step"] for row in expected]
    for row, reference in zip(got, expected):
        for key in SAME_ON_ONE_PROCESS:
            assert row[key] == pytest.approx(reference[key], rel=tol.rtol, abs=tol.atol), (row["step"], key)


@pytest.fixture(scope="module", params=list(VARIANTS))
def runs(request, settings, tmp_path_factory):
    """Two processes for 2 steps (checkpoint-2), one process for 3 on the same global batches."""
    variant = request.param
    values = {**settings, **VARIANTS[variant]}
    folder = tmp_path_factory.mktemp(variant)
    torchrun({**values, "output_dir": str(folder / "two"), "max_steps": 2})
    one, one_gradients = _single_process(values, folder / "one", steps=3)
    return dict(values=values, folder=folder, two=folder / "two", one=one, one_gradients=one_gradients)


def test_two_processes_take_the_single_process_step(runs):
    """Same samples and metrics; the first gradient equal to float32 rounding; the weights after AdamW steps,
    and gradients taken at them, to the tolerance of AdamW steps (its update is ~lr·sign(g) where g is
    rounding noise, conformance/tolerances.py)."""
    two = runs["two"]
    _assert_metrics(read_metrics(two), read_metrics(runs["one"].run_dir)[:2])
    two_samples = [json.loads(line) for line in (two / "samples.jsonl").read_text().splitlines()]
    one_samples = [json.loads(line) for line in (runs["one"].run_dir / "samples.jsonl").read_text().splitlines()]
    assert two_samples and all(sample in one_samples for sample in two_samples)  # rank 0's share, the same draws
    first, second = torch.load(two / "gradients.pt")
    _assert_close(first, runs["one_gradients"][0], tolerance("float32"), "gradient of step 1")
    # Step 2's gradient is taken at weights one AdamW step apart.
    _assert_close(second, runs["one_gradients"][1], tolerance("adamw_steps/float32"), "gradient of step 2")
    _assert_close(_weights(two / "checkpoint-2"), _weights(runs["one"].run_dir / "checkpoint-2"),
                  tolerance("adamw_steps/float32"), "weights after step 2")
    state = json.loads((two / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["data"]["position"] == 8  # 2 steps x 4 global prompts


def test_checkpoint_of_two_processes_resumes_in_one(runs):
    """Step 3 resumed in one process from the two-process checkpoint equals step 3 of the one-process run."""
    resumed, gradients = _single_process(runs["values"], runs["folder"] / "resumed", steps=3,
                                         resume=str(runs["two"] / "checkpoint-2"))
    assert resumed.step == 3
    _assert_metrics(read_metrics(resumed.run_dir), read_metrics(runs["one"].run_dir)[2:])
    _assert_close(gradients[0], runs["one_gradients"][2], tolerance("adamw_steps/float32"), "gradient of step 3")
    _assert_close(_weights(resumed.run_dir / "checkpoint-3"), _weights(runs["one"].run_dir / "checkpoint-3"),
                  tolerance("adamw_steps/float32"), "weights after step 3")


def test_fsdp_checkpoint_resumes_sharded(runs, settings):
    """An FSDP checkpoint loads back into two sharded processes (full files read, re-sharded) and steps on."""
    if not runs["values"].get("fsdp"):
        pytest.skip("the FSDP variant's checkpoint")
    values = {**runs["values"], "output_dir": str(runs["folder"] / "two-resumed"), "max_steps": 3,
              "resume": str(runs["two"] / "checkpoint-2")}
    torchrun(values)
    resumed = runs["folder"] / "two-resumed"
    _assert_metrics(read_metrics(resumed), read_metrics(runs["one"].run_dir)[2:])
    _assert_close(torch.load(resumed / "gradients.pt")[0], runs["one_gradients"][2],
                  tolerance("adamw_steps/float32"), "gradient of step 3")
    _assert_close(_weights(resumed / "checkpoint-3"), _weights(runs["one"].run_dir / "checkpoint-3"),
                  tolerance("adamw_steps/float32"), "weights after step 3")

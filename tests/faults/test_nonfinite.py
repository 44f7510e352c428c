"""A non-finite loss or gradient skips the optimizer step and touches no weight; max_bad_steps in a
row stop the run; non-finite rewards are not scorable and counted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aha.backends.torch import TrainConfig, Trainer
from aha.backends.torch.rewards import compute_rewards
from aha.backends.torch.trainer import NonFiniteLossError
from aha.backends.torch.tracking import read_metrics


def inject(trainer: Trainer, faults: dict[tuple[int, int], str]) -> list[dict[str, torch.Tensor]]:
    """Make the loss of (step, micro-batch) non-finite ("loss") or give it a NaN gradient with a finite
    value ("gradient": + sqrt(0 * sum(hidden)), whose derivative is inf * 0). Returns the trainable
    weights at the start of every step (and, once training ends, after the last)."""
    real_loss, real_step = trainer.algorithm.loss, trainer.train_step
    seen = {"step": 0, "micro": 0}
    snapshots = []

    def loss(hidden, *args, **kwargs):
        value, metrics = real_loss(hidden, *args, **kwargs)
        step = trainer.step + 1
        seen["micro"] = seen["micro"] + 1 if seen["step"] == step else 1
        seen["step"] = step
        fault = faults.get((step, seen["micro"]))
        if fault == "loss":
            value = value * float("nan")
        elif fault == "gradient":
            value = value + (hidden.sum() * 0).sqrt()
        return value, metrics

    def train_step():
        snapshots.append(weights(trainer))
        return real_step()

    trainer.algorithm.loss = loss
    trainer.train_step = train_step
    return snapshots


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.policy.named_trainable_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[name], b[name]) for name in a)


def test_nonfinite_loss_or_gradient_skips_the_step_and_changes_no_weight(base_config):
    config = TrainConfig.from_dict({**base_config, "max_steps": 4, "reward_funcs": [
        "tests/faults/rewards.py:count_sevens", "tests/faults/rewards.py:inf_on_first"]})
    trainer = Trainer(config)
    snapshots = inject(trainer, {(2, 2): "loss", (4, 1): "gradient"})
    with pytest.warns(RuntimeWarning) as caught:
        trainer.train()
    snapshots.append(weights(trainer))
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 2
    assert messages[0].startswith("step 2: a non-finite loss (nan) in micro-batch 2/2; optimizer step skipped "
                                  "(no weights changed), 1 in a row (max_bad_steps=5)")
    assert messages[1].startswith("step 4: a non-finite gradient in micro-batch 1/2; optimizer step skipped")
    # Steps 2 and 4 change nothing; steps 1 and 3 do.
    assert same(snapshots[1], snapshots[2]) and same(snapshots[3], snapshots[4])
    assert not same(snapshots[0], snapshots[1]) and not same(snapshots[2], snapshots[3])
    adam_steps = {float(state["step"]) for state in trainer.optimizer.state.values()}
    assert adam_steps == {2.0}  # moments updated by the two good steps only
    assert trainer.scheduler.last_epoch == 4  # the schedule follows the step number
    assert all(torch.isfinite(w).all() for w in snapshots[-1].values())
    rows = read_metrics(trainer.run_dir)
    assert [row["skipped_steps"] for row in rows] == [0, 1, 1, 2]
    assert math.isnan(rows[1]["loss"]) and math.isnan(rows[3]["grad_norm"]) and math.isfinite(rows[2]["loss"])
    # +inf from a reward function is "not scorable" (NaN), counted per function; training goes on.
    assert [row["reward/inf_on_first/unscorable"] for row in rows] == [1, 1, 1, 1]
    assert all(row["reward/count_sevens/unscorable"] == 0 for row in rows)


def test_max_bad_steps_in_a_row_stop_the_run(base_config):
    trainer = Trainer(TrainConfig.from_dict({**base_config, "max_steps": 6, "max_bad_steps": 2}))
    snapshots = inject(trainer, {(step, 1): "loss" for step in range(2, 7)})
    with pytest.warns(RuntimeWarning, match="step 2: a non-finite loss"), \
            pytest.raises(NonFiniteLossError, match=r"step 3: a non-finite loss \(nan\) in micro-batch 1/2; .* "
                                                    r"2 in a row \(max_bad_steps=2\): stopping\. The weights are "
                                                    r"unchanged since step 1"):
        trainer.train()
    assert trainer.step == 2 and trainer.skipped_steps == 2
    assert same(snapshots[1], weights(trainer))  # as after step 1


def test_fault_settings_are_config_fields_and_flags(capsys):
    from aha.cli import main

    assert TrainConfig().max_bad_steps == 5
    assert TrainConfig.from_dict({"max-bad-steps": 3, "reward-timeout": 2}).reward_timeout == 2.0
    with pytest.raises(ValueError, match="max_bad_steps must be >= 1"):
        TrainConfig(max_bad_steps=0)
    with pytest.raises(ValueError, match="reward_timeout must be > 0"):
        TrainConfig(reward_timeout=0)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    flags = capsys.readouterr().out
    assert "--max-bad-steps" in flags and "--reward-timeout" in flags and "--truncate-prompts" in flags


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, None])
def test_nonfinite_rewards_are_not_scorable(value):
    def odd(prompts, completions, **kw):
        return [1.0, value]

    rewards = compute_rewards([odd], None, ["p", "p"], ["a", "b"], [{}, {}])
    assert rewards[0, 0] == 1.0 and np.isnan(rewards[1, 0])

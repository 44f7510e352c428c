"""Out of memory in the rollout or the update: free, halve, retry, count; the result is the same step."""

from __future__ import annotations

import pytest
import torch

from aha.backends.torch import TrainConfig, Trainer
from aha.backends.torch.tracking import read_metrics
from aha.conformance.tolerances import tolerance


def out_of_memory_in_update(trainer: Trainer, *, at_call: int | None) -> None:
    """Raise OutOfMemoryError from the decoder's with-grad forward number `at_call` (1-based over the run;
    the update's micro-batch k of step 1 is call k), or from every one when at_call is None."""
    hidden, calls = trainer._hidden, {"n": 0}

    def failing(batch):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if at_call is None or calls["n"] == at_call:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return hidden(batch)

    trainer._hidden = failing


def trained_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The policy's trainable weights and the algorithm's own modules' (PPO's value head)."""
    modules = {f"{name}.{key}": p for name, module in trainer.algorithm.modules.items()
               for key, p in module.named_parameters()}
    return dict(trainer.policy.named_trainable_parameters()) | modules


@pytest.mark.parametrize(("algo", "beta"), [("grpo", 0.0), ("grpo", 0.04), ("rloo", None), ("ppo", None),
                                            ("online_dpo", None)])
def test_oom_in_update_halves_the_micro_batch_and_gives_the_same_weights(base_config, tmp_path, algo, beta):
    values = {**base_config, "algo": algo, "beta": beta, "max_steps": 2}
    plain = Trainer(TrainConfig.from_dict({**values, "output_dir": str(tmp_path / "plain")}))
    plain.train()
    injected = Trainer(TrainConfig.from_dict({**values, "output_dir": str(tmp_path / "injected")}))
    out_of_memory_in_update(injected, at_call=2)  # step 1, micro-batch 2 of 2
    with pytest.warns(RuntimeWarning, match=r"step 1: out of memory in the update \(CUDA out of memory\. Tried to "
                                            r"allocate 2\.00 GiB \(injected\)\); retrying with 2 completions per "
                                            r"decoder pass"):
        injected.train()
    tol = tolerance("float32")
    expected, got = trained_weights(plain), trained_weights(injected)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=tol.rtol, atol=tol.atol, msg=name)
    plain_rows, rows = read_metrics(plain.run_dir), read_metrics(injected.run_dir)
    assert [row["oom_retries"] for row in rows] == [1, 0] and [row["oom_retries"] for row in plain_rows] == [0, 0]
    for expected, got in zip(plain_rows, rows):
        for key in [k for k in ("loss", "grad_norm", "kl", "entropy") if k in expected]:
            assert got[key] == pytest.approx(expected[key], rel=tol.rtol, abs=tol.atol), key


def test_oom_in_rollout_halves_the_generate_batch(base_config):
    trainer = Trainer(TrainConfig.from_dict({**base_config, "max_steps": 2}))
    generate_batch, sizes = trainer.engine._generate_batch, []

    def failing(prompts, sampling):
        sizes.append(len(prompts))
        if len(prompts) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return generate_batch(prompts, sampling)

    trainer.engine._generate_batch = failing
    with pytest.warns(RuntimeWarning, match="out of memory in the rollout .*; retrying with 4 sequences per generate"):
        trainer.train()
    assert sizes == [8, 4, 4, 4, 4]  # step 1: fails at 8, then 2 x 4; step 2 keeps 4
    assert trainer.engine.max_batch_size == 4
    assert [row["oom_retries"] for row in read_metrics(trainer.run_dir)] == [1, 0]


def test_oom_at_one_completion_per_pass_fails_with_advice(base_config):
    trainer = Trainer(TrainConfig.from_dict({**base_config, "max_steps": 1}))
    out_of_memory_in_update(trainer, at_call=None)
    with pytest.warns(RuntimeWarning, match="retrying with 1 completions per decoder pass"), \
            pytest.raises(torch.OutOfMemoryError, match=r"out of memory in the update at step 1 even with 1 "
                                                        r"completions per decoder pass .*Lower "
                                                        r"per_device_train_batch_size"):
        trainer.train()
    assert trainer._oom_retries == 2  # 4 -> 2 -> 1 rows per pass, then no lower


def test_oom_in_scoring_halves_the_pass_and_gives_the_same_weights(base_config, tmp_path):
    values = {**base_config, "beta": 0.04, "max_steps": 1}  # beta > 0: reference log-probs are scored
    plain = Trainer(TrainConfig.from_dict({**values, "output_dir": str(tmp_path / "plain")}))
    plain.train()
    injected = Trainer(TrainConfig.from_dict({**values, "output_dir": str(tmp_path / "injected")}))
    hidden, failed = injected._hidden, []

    def failing(batch):
        if not torch.is_grad_enabled() and not failed:
            failed.append(len(batch))
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return hidden(batch)

    injected._hidden = failing
    with pytest.warns(RuntimeWarning, match="out of memory in the scoring .*; retrying with 2 completions per pass"):
        injected.train()
    assert failed == [4] and read_metrics(injected.run_dir)[0]["oom_retries"] == 1
    tol = tolerance("float32")
    expected, got = trained_weights(plain), trained_weights(injected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=tol.rtol, atol=tol.atol, msg=name)

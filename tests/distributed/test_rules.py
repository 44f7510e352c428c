"""The rules of multi-process training, in one process (no process group): the loss scaling of spec/common.md
eq. 7 for every aggregation, the share of prompts each rank takes, and how metrics combine over ranks."""

from __future__ import annotations

import pytest
import torch

from aha.backends.torch import distributed
from aha.backends.torch.algorithms import make_algorithm
from aha.backends.torch.batch import RolloutBatch
from aha.backends.torch.config import TrainConfig
from aha.conformance.tolerances import tolerance

PROCESSES, ACCUMULATION, ROWS, LENGTH, HIDDEN, VOCAB = 2, 2, 3, 5, 8, 11


def _batch(generator: torch.Generator) -> tuple[torch.Tensor, RolloutBatch]:
    rows = PROCESSES * ACCUMULATION * ROWS
    ids = torch.randint(VOCAB, (rows, LENGTH), generator=generator)
    mask = (torch.rand(rows, LENGTH, generator=generator) < 0.7).double()
    mask[0] = 0  # a fully masked row
    mask[1] = 1  # micro-batches with different token counts
    batch = RolloutBatch(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.zeros_like(ids),
                         completion_ids=ids, mask=mask, completion_lengths=mask.sum(1).long(),
                         truncated=torch.zeros(rows, dtype=torch.bool),
                         extras={"advantages": torch.randn(rows, dtype=torch.float64, generator=generator)})
    return torch.randn(rows, LENGTH, HIDDEN, dtype=torch.float64, generator=generator), batch


def _averaged_gradient(monkeypatch, config: TrainConfig, hidden, weight, batch, *, processes: int) -> torch.Tensor:
    """(1/P) sum_p sum_b grad(loss_{p,b}) with the trainer's loss scaling; process p takes micro-batches
    p·GA .. (p+1)·GA - 1 of the same sequence of micro-batches of ROWS rows."""
    monkeypatch.setattr(distributed, "world_size", lambda: processes)
    adapter = make_algorithm(config, 1, hidden_size=HIDDEN)
    accumulation = PROCESSES * ACCUMULATION // processes
    tokens = int(batch.mask.sum())  # N, summed over every process
    total = torch.zeros_like(weight)
    for process in range(processes):
        weight.grad = None
        for micro in range(process * accumulation, (process + 1) * accumulation):
            rows = torch.arange(micro * ROWS, (micro + 1) * ROWS)
            loss, _ = adapter.loss(hidden[rows], weight, None, batch.select(rows), num_items_in_batch=tokens,
                                   gradient_accumulation_steps=accumulation)
            loss.backward()
        total += weight.grad / processes  # the mean over processes (distributed.average_gradients, DDP)
    return total


@pytest.mark.parametrize(("algo", "loss_type"), [("grpo", "grpo"), ("grpo", "bnpo"), ("grpo", "dr_grpo"),
                                                 ("grpo", "dapo"), ("grpo", "cispo"), ("rloo", None)])
def test_eq7_averaged_gradient_equals_the_single_process_gradient(monkeypatch, algo, loss_type):
    """With the same micro-batches, P processes of GA micro-batches and one process of P·GA give one gradient
    for every aggregation (token_mean too: the mean of micro-batch means is the same set of means)."""
    generator = torch.Generator().manual_seed(0)
    hidden, batch = _batch(generator)
    weight = torch.randn(VOCAB, HIDDEN, dtype=torch.float64, generator=generator, requires_grad=True)
    config = TrainConfig(algo=algo, loss_type=loss_type, num_generations=ROWS, per_device_train_batch_size=ROWS,
                         gradient_accumulation_steps=ACCUMULATION, max_completion_length=LENGTH, temperature=0.8)
    one = _averaged_gradient(monkeypatch, config, hidden, weight, batch, processes=1)
    two = _averaged_gradient(monkeypatch, config, hidden, weight, batch, processes=PROCESSES)
    tol = tolerance("float64")
    torch.testing.assert_close(two, one, rtol=tol.rtol, atol=tol.atol * one.abs().max().item())
    assert one.abs().max() > 0


def test_without_the_factor_p_dapo_would_be_p_times_too_small(monkeypatch):
    """The meta-test: dropping c = P for dapo (keeping DDP's mean) is caught by the comparison above."""
    generator = torch.Generator().manual_seed(0)
    hidden, batch = _batch(generator)
    weight = torch.randn(VOCAB, HIDDEN, dtype=torch.float64, generator=generator, requires_grad=True)
    config = TrainConfig(algo="grpo", loss_type="dapo", num_generations=ROWS, per_device_train_batch_size=ROWS,
                         gradient_accumulation_steps=ACCUMULATION, max_completion_length=LENGTH)
    one = _averaged_gradient(monkeypatch, config, hidden, weight, batch, processes=1)
    monkeypatch.setattr(type(make_algorithm(config, 1, hidden_size=HIDDEN)), "_scale", lambda self, ga: 1.0)
    two = _averaged_gradient(monkeypatch, config, hidden, weight, batch, processes=PROCESSES)
    torch.testing.assert_close(two * PROCESSES, one)
    assert not torch.allclose(two, one)


def test_each_rank_takes_every_pth_prompt_of_the_global_list(monkeypatch):
    rows = [f"prompt {i}" for i in range(6)]
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shares.append(distributed.shard_prompts(rows))
    assert shares[1] == (["prompt 1", "prompt 4"], [1, 4])
    assert sorted(index for _, indices in shares for index in indices) == list(range(6))


def test_one_process_helpers_are_the_identity():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.shard_prompts(["a", "b"]) == (["a", "b"], [0, 1])
    assert distributed.sum_over_ranks(7.0) == 7.0 and distributed.any_rank(False) is False
    x = torch.arange(4.0)
    assert distributed.gather_rows(x) is x and torch.equal(distributed.own_rows(x), x)
    metrics = {"loss": 1.0, "completion_length/min": 3.0}
    assert distributed.combine_metrics(metrics) is metrics


@pytest.mark.parametrize(("name", "values", "combined"), [
    ("completion_length/min", [3.0, 1.0], 1.0), ("ratio_max", [1.5, 2.0], 2.0), ("advantage/max_abs", [1.0, 4.0], 4.0),
    ("time/update", [2.0, 3.0], 3.0), ("peak_memory_gib", [1.0, 2.0], 2.0),
    ("reward/exact_answer/unscorable", [1.0, 2.0], 3.0), ("truncated_prompts", [0.0, 1.0], 1.0),
    ("tokens_per_s/train", [100.0, 120.0], 220.0), ("loss", [0.25, 0.75], 0.5), ("reward/mean", [0.0, 1.0], 0.5),
])
def test_metrics_combine_by_meaning(name, values, combined):
    assert distributed._combine(name, values) == combined


def test_gradients_are_averaged_in_buckets_of_one_dtype(monkeypatch):
    monkeypatch.setattr(distributed, "BUCKET_ELEMENTS", 10)
    params = [torch.zeros(n, dtype=dtype) for n, dtype in [(4, torch.float32), (4, torch.float32), (3, torch.bfloat16),
                                                          (4, torch.float32), (12, torch.float32)]]
    for p in params:
        p.grad = torch.zeros_like(p)
    buckets = distributed._buckets(params)
    position = {id(p): index for index, p in enumerate(params)}
    assert [[position[id(p)] for p in bucket] for bucket in buckets] == [[0, 1], [3], [4], [2]]

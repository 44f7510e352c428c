"""Train/inference mismatch correction (spec/grpo.md §2.5): the ratio against a transcription of TRL's code, on
NumPy, torch and JAX; its invariances; how grpo.loss applies it (policy term only, no gradient into it)."""
import numpy as np
import pytest
import torch

from aha.algos import grpo, mismatch
from algos_harness import assert_backends_agree, assert_close
from algos_inputs import batch, pick

CORRECTIONS = [
    ("token_truncate", None, 3.0), ("token_truncate", 0.5, 2.0), ("token_truncate", 0.8, None),
    ("token_mask", None, 3.0), ("token_mask", 0.5, 2.0),
    ("sequence_truncate", None, 3.0), ("sequence_truncate", 0.5, 2.0),
    ("sequence_mask", None, 3.0), ("sequence_mask", 0.5, 2.0), ("sequence_mask", None, None),
]


def inputs(seed: int, junk: float = 3.0) -> dict:
    """Sampler log-probs drifting from the old ones by a row offset in [-1, 1] plus up to ±1.5 per token, so ratios
    fall on both sides of every bound; junk in padding."""
    arrays = batch(seed, junk=junk)
    rng = np.random.default_rng(seed + 100)
    rows = arrays["old_logp"].shape[0]
    drift = np.linspace(-1.0, 1.0, rows)[:, None] + rng.uniform(-1.5, 1.5, size=arrays["old_logp"].shape)
    sampler = arrays["old_logp"] - drift
    sampler = np.where(arrays["mask"], sampler, junk * rng.standard_normal(sampler.shape))
    return {"old_logp": arrays["old_logp"], "sampler_logp": sampler, "mask": arrays["mask"]}


def trl_importance_sampling_ratio(old_logp, sampler_logp, mask, mode, clip_min, clip_max):
    """trl.md §2.4 (grpo_trainer.py L2578–2623) transcribed in torch: the oracle."""
    old, sampler, mask = (torch.as_tensor(np.asarray(x, np.float64)) for x in (old_logp, sampler_logp, mask))
    diff = (old - sampler) * mask
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode in ("sequence_truncate", "token_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max).numpy()
    if clip_max is not None:
        ratio = ratio.masked_fill(ratio > clip_max, 0.0)
    if clip_min is not None:
        ratio = ratio.masked_fill(ratio < clip_min, 0.0)
    return ratio.numpy()


@pytest.mark.parametrize("mode, clip_min, clip_max", CORRECTIONS)
def test_ratio_equals_trl_transcription_on_every_backend(mode, clip_min, clip_max):
    arrays = inputs(0)
    expected = trl_importance_sampling_ratio(**arrays, mode=mode, clip_min=clip_min, clip_max=clip_max)
    ratio = mismatch.importance_sampling_ratio(**arrays, mode=mode, clip_min=clip_min, clip_max=clip_max)
    assert ratio.shape == ((6, 1) if mode.startswith("sequence") else (6, 5))
    assert_close(ratio, expected)
    clipped = (expected == 0) | np.isin(expected, [v for v in (clip_min, clip_max) if v is not None])
    if clip_min is not None or clip_max is not None:
        assert clipped.any() and (~clipped).any(), "the inputs must exercise both sides of the bounds"

    def fn(**a):
        r = mismatch.importance_sampling_ratio(**a, mode=mode, clip_min=clip_min, clip_max=clip_max)
        return r, mismatch.mismatch_metrics(**a, ratio=r)

    assert_backends_agree(fn, arrays, ())


def test_defaults_are_trls():
    arrays = inputs(1)
    assert_close(mismatch.importance_sampling_ratio(**arrays),
                 trl_importance_sampling_ratio(**arrays, mode="sequence_mask", clip_min=None, clip_max=3.0))


def test_sequence_ratio_is_the_product_of_token_ratios_and_padding_is_ignored():
    arrays = inputs(2)
    token = mismatch.importance_sampling_ratio(**arrays, mode="token_mask", clip_min=None, clip_max=None)
    sequence = mismatch.importance_sampling_ratio(**arrays, mode="sequence_mask", clip_min=None, clip_max=None)
    assert_close(sequence[:, 0], np.prod(token, axis=1))
    assert np.all(token[~arrays["mask"]] == 1.0)
    other_junk = inputs(2, junk=-7.0)
    for mode in mismatch.MODES:
        assert_close(mismatch.importance_sampling_ratio(**arrays, mode=mode, clip_max=2.0),
                     mismatch.importance_sampling_ratio(**other_junk, mode=mode, clip_max=2.0))


def test_mask_modes_keep_in_range_values_and_zero_the_rest():
    old = np.array([[0.0, 0.0, 0.0]])
    sampler = np.log(np.array([[1 / 0.4, 1 / 1.5, 1 / 2.5]]))  # ratios 0.4, 1.5, 2.5
    mask = np.ones((1, 3), dtype=bool)
    ratio = mismatch.importance_sampling_ratio(old, sampler, mask, mode="token_mask", clip_min=0.5, clip_max=2.0)
    assert_close(ratio, [[0.0, 1.5, 0.0]])
    ratio = mismatch.importance_sampling_ratio(old, sampler, mask, mode="token_truncate", clip_min=0.5, clip_max=2.0)
    assert_close(ratio, [[0.5, 1.5, 2.0]])


def test_metrics_on_nothing_active_are_neutral():
    arrays = inputs(3)
    arrays["mask"] = np.zeros_like(arrays["mask"])
    for mode in ("token_mask", "sequence_mask"):
        ratio = mismatch.importance_sampling_ratio(**arrays, mode=mode)
        metrics = mismatch.mismatch_metrics(**arrays, ratio=ratio)
        assert {k: float(v) for k, v in metrics.items()} == {
            "sampling/sampling_logp_difference/mean": 0.0, "sampling/sampling_logp_difference/max": 0.0,
            "sampling/kl": 0.0, "sampling/importance_sampling_ratio/min": 1.0,
            "sampling/importance_sampling_ratio/mean": 1.0, "sampling/importance_sampling_ratio/max": 1.0}


def test_kl_metric_is_zero_without_mismatch_and_positive_with_it():
    arrays = inputs(4)
    same = dict(arrays, sampler_logp=arrays["old_logp"])
    ratio = mismatch.importance_sampling_ratio(**same)
    assert float(mismatch.mismatch_metrics(**same, ratio=ratio)["sampling/kl"]) == 0.0
    ratio = mismatch.importance_sampling_ratio(**arrays)
    assert float(mismatch.mismatch_metrics(**arrays, ratio=ratio)["sampling/kl"]) > 0.0


@pytest.mark.parametrize("mode, clip_min, clip_max, message", [
    ("token", None, 3.0, "mode: unknown"),
    ("token_truncate", None, None, "at least one bound"),
    ("sequence_mask", 2.0, 2.0, "clip_min: expected < clip_max"),
    ("sequence_mask", 0.0, 2.0, "clip_min: expected a ratio bound > 0"),
])
def test_invalid_corrections_name_the_argument(mode, clip_min, clip_max, message):
    with pytest.raises(ValueError, match=message):
        mismatch.importance_sampling_ratio(**inputs(5), mode=mode, clip_min=clip_min, clip_max=clip_max)


# ------------------------------------------------------------------------------------------------
# grpo.loss with the ratio
# ------------------------------------------------------------------------------------------------

def loss_inputs(seed: int) -> dict:
    arrays = pick(batch(seed, junk=3.0), "logp", "old_logp", "ref_logp", "advantages", "mask")
    return arrays


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo"])
@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_loss_with_ratio_agrees_on_every_backend(loss_type, mode):
    config = grpo.GRPOConfig(loss_type=loss_type, beta=0.04, epsilon_high=0.28 if loss_type != "cispo" else 5.0)
    arrays = loss_inputs(6)
    mis = inputs(6)
    arrays["importance_sampling_ratio"] = mismatch.importance_sampling_ratio(
        arrays["old_logp"], mis["sampler_logp"], arrays["mask"], mode=mode, clip_min=0.5, clip_max=2.0)
    assert_backends_agree(lambda **a: grpo.loss(**a, config=config), arrays, ("logp",))


def test_ratio_of_ones_is_no_correction():
    config = grpo.GRPOConfig(beta=0.04)
    arrays = loss_inputs(7)
    plain, plain_metrics = grpo.loss(**arrays, config=config)
    for shape in ((6, 5), (6, 1)):
        value, metrics = grpo.loss(**arrays, config=config, importance_sampling_ratio=np.ones(shape))
        assert_close(value, plain)
        assert metrics.keys() == plain_metrics.keys()


def test_ratio_weights_the_policy_term_not_the_kl_and_gets_no_gradient():
    """ρ^IS = 0 everywhere leaves β·KL alone (eq. 13); ρ^IS = c scales the policy loss and its gradient by c."""
    arrays = {k: torch.tensor(v) for k, v in loss_inputs(8).items()}
    with_kl, without_kl = grpo.GRPOConfig(beta=0.1), grpo.GRPOConfig(beta=0.0)
    zeros = torch.zeros(6, 1, dtype=torch.float64)
    value, _ = grpo.loss(**arrays, config=with_kl, importance_sampling_ratio=zeros)
    kl_only = grpo.loss(**arrays, config=with_kl)[0] - grpo.loss(**arrays, config=without_kl)[0]
    assert_close(value, kl_only)

    logp = arrays["logp"].clone().requires_grad_(True)
    ratio = torch.full((6, 5), 2.5, dtype=torch.float64, requires_grad=True)
    scaled, _ = grpo.loss(**{**arrays, "logp": logp}, config=without_kl, importance_sampling_ratio=ratio)
    scaled.backward()
    reference_logp = arrays["logp"].clone().requires_grad_(True)
    plain, _ = grpo.loss(**{**arrays, "logp": reference_logp}, config=without_kl)
    plain.backward()
    assert_close(scaled, 2.5 * plain)
    assert_close(logp.grad, 2.5 * reference_logp.grad)
    assert ratio.grad is None


def test_loss_rejects_a_ratio_of_the_wrong_shape_or_dtype():
    arrays = loss_inputs(9)
    config = grpo.GRPOConfig()
    with pytest.raises(ValueError, match="importance_sampling_ratio: expected shape"):
        grpo.loss(**arrays, config=config, importance_sampling_ratio=np.ones((6, 2)))
    with pytest.raises(ValueError, match="importance_sampling_ratio: dtype"):
        grpo.loss(**arrays, config=config, importance_sampling_ratio=np.ones((6, 5), dtype=np.float32))

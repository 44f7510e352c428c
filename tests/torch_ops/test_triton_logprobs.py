"""token_logprobs, Triton implementation: equals the naive oracle, values and gradients.

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, as ``make test`` sets it), which is
slow: shapes stay tiny (N <= 64, H <= 32, V <= 300). On a CUDA machine the same tests run the compiled kernels.
"""
import pytest
import torch

from aha.backends.torch import logprobs
from aha.backends.torch.logprobs import _interpreting, token_logprobs, triton_available
from logprob_oracle import LargestAllocation, assert_all_close, make_inputs, naive, values_and_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not triton_available() or not (DEVICE == "cuda" or _interpreting()),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1",
)
N, H, V = 50, 24, 300  # N not a multiple of the 16-row tiles, V not a multiple of the chunks below
# Chunks narrower (40) and wider (128) than the kernels' column tile (64 under the interpreter, 1024 compiled):
# a narrower one leaves masked columns in its tile, where a later chunk's target must not be picked.
NARROW, WIDE = 40, 128


def with_chunk(monkeypatch, chunk, rows=20):
    """chunk_size=chunk with row blocks of ``rows`` (three blocks for N = 50, the last one ragged)."""
    from aha.backends.torch import triton_logprobs

    monkeypatch.setattr(triton_logprobs, "BLOCK_ELEMENTS", rows * max(chunk, H))
    return chunk


def triton_fn(temperature, chunk_size):
    def fn(hidden, weight, targets, bias):
        return token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=True,
                              chunk_size=chunk_size, implementation="triton")
    return fn


def oracle(temperature):
    return lambda hidden, weight, targets, bias: naive(hidden, weight, targets, bias=bias, temperature=temperature)


@pytest.mark.parametrize("dtype, temperature, chunk", [
    (torch.float32, 0.7, NARROW), (torch.float32, 1.0, WIDE), (torch.bfloat16, 1.0, NARROW),
    (torch.bfloat16, 1.6, WIDE),
], ids=["float32-0.7-narrow", "float32-1.0-wide", "bfloat16-1.0-narrow", "bfloat16-1.6-wide"])
def test_matches_naive_in_float64_and_same_dtype(monkeypatch, dtype, temperature, chunk):
    name = str(dtype).removeprefix("torch.")
    hidden, weight, targets, bias = make_inputs(N, H, V, dtype, device=DEVICE)
    actual = values_and_grads(triton_fn(temperature, with_chunk(monkeypatch, chunk)), hidden, weight, targets, bias)
    reference = values_and_grads(oracle(temperature), hidden.double(), weight.double(), targets, bias.double())
    assert_all_close(actual, reference, name)
    assert_all_close(actual, values_and_grads(oracle(temperature), hidden, weight, targets, bias), name)


def test_extreme_logits_without_bias(monkeypatch):
    # One-hot rows (|z| ~ 1e3): compared at the condition number max|z| of log-softmax (see test_logprobs.py).
    hidden, weight, targets, _ = make_inputs(N, H, V, torch.float32, logit_std=3e2, bias=False, device=DEVICE)
    condition = float((hidden.double() @ weight.double().T).abs().max())
    reference = values_and_grads(oracle(1.0), hidden.double(), weight.double(), targets, None)
    actual = values_and_grads(triton_fn(1.0, with_chunk(monkeypatch, NARROW)), hidden, weight, targets, None)
    assert_all_close(actual, reference, "float32", condition=condition)


def test_equals_torch_implementation_and_skips_unneeded_gradients(monkeypatch):
    hidden, weight, targets, _ = make_inputs(N, H, V, torch.float32, device=DEVICE)
    chunk = with_chunk(monkeypatch, WIDE)
    leaves = {impl: hidden.clone().requires_grad_() for impl in ("torch", "triton")}
    for impl, leaf in leaves.items():
        logp = token_logprobs(leaf, weight, targets, chunk_size=chunk, implementation=impl)  # frozen weight
        logp.backward(torch.linspace(-1, 1, N, device=DEVICE))
    assert_all_close([leaves["triton"].grad.double().cpu()], [leaves["torch"].grad.double().cpu()], "float32")


def test_never_allocates_full_logits(monkeypatch):
    # Largest storage of any aten op (views report their base: the weight): a [rows, chunk] block at most.
    n, width, vocab = 64, 16, 256
    chunk = with_chunk(monkeypatch, 64, rows=40)
    hidden, weight, targets, _ = make_inputs(n, width, vocab, torch.float32, device=DEVICE, bias=False)
    hidden.requires_grad_()
    weight.requires_grad_()
    with LargestAllocation() as probe:
        logp, entropy = token_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=chunk,
                                       implementation="triton")
        (logp.sum() + entropy.sum()).backward()
    rows = logprobs._plan("triton", hidden, weight, chunk).rows
    assert rows < n
    assert probe.nbytes <= max(rows * chunk * 4, weight.numel() * 4) < n * vocab * 4

"""token_logprobs, torch implementation and API: equals its naive oracle (values and gradients), never holds
[N, V] logits, and rejects bad input by name. The Triton implementation: test_triton_logprobs.py."""
import pytest
import torch

from aha.backends.torch import logprobs
from aha.backends.torch.logprobs import token_logprobs
from logprob_oracle import LargestAllocation, assert_all_close, assert_close, make_inputs, naive, values_and_grads

N, H, V = 50, 24, 300  # N, V deliberately not multiples of the blocks below


def fused(chunk_size, temperature, implementation="torch"):
    def fn(hidden, weight, targets, bias):
        return token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=True,
                              chunk_size=chunk_size, implementation=implementation)
    return fn


def oracle(temperature):
    return lambda hidden, weight, targets, bias: naive(hidden, weight, targets, bias=bias, temperature=temperature)


@pytest.fixture
def small_row_blocks(monkeypatch):
    """Row blocks of 1280 // max(chunk=64, H) = 20 rows: N = 50 spans three blocks, the last one ragged."""
    monkeypatch.setattr(logprobs, "_TORCH_BLOCK_ELEMENTS", 64 * 20)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_float64_equals_naive_exactly_up_to_roundoff(small_row_blocks, temperature):
    # In float64 the chunked algorithm (online softmax, entropy around the running max, float64 accumulation)
    # has nothing to hide behind: it must equal the naive expression to float64 round-off.
    inputs = make_inputs(N, H, V, torch.float64)
    expected = values_and_grads(oracle(temperature), *inputs)
    assert_all_close(values_and_grads(fused(64, temperature), *inputs), expected, "float64")


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_matches_naive_in_float64_and_same_dtype(small_row_blocks, dtype, temperature):
    name = str(dtype).removeprefix("torch.")
    inputs = make_inputs(N, H, V, dtype)
    actual = values_and_grads(fused(64, temperature), *inputs)
    reference = values_and_grads(oracle(temperature), *(None if x is None else x.double() for x in inputs[:2]),
                                 inputs[2], inputs[3].double())
    assert_all_close(actual, reference, name)
    assert_all_close(actual, values_and_grads(oracle(temperature), *inputs), name)


@pytest.mark.parametrize("logit_std", [1e-4, 3e2])
def test_extreme_logits(logit_std):
    # Tiny logits: a near-uniform distribution (entropy -> log V). Huge logits: one-hot rows, where a naive
    # exp overflows. Forward and backward of log-softmax have an absolute error bounded by eps·max|z|: the
    # comparison is scaled by that condition number max(1, max|z|) (of the float64 logits).
    inputs = make_inputs(N, H, V, torch.float32, logit_std=logit_std, bias=False)
    condition = max(1.0, float((inputs[0].double() @ inputs[1].double().T).abs().max()))
    reference = values_and_grads(oracle(1.0), inputs[0].double(), inputs[1].double(), inputs[2], None)
    actual = values_and_grads(fused(64, 1.0), *inputs)
    assert_all_close(actual, reference, "float32", condition=condition)
    if logit_std < 1:
        assert_close(actual[1], torch.full((N,), float(torch.log(torch.tensor(V, dtype=torch.float64)))),
                     "float32", what="entropy of a uniform distribution")


@pytest.mark.parametrize("chunk_size", [1, 7, V, 10 * V])
def test_chunking_changes_nothing(chunk_size):
    inputs = make_inputs(N, H, V, torch.float32)
    assert_all_close(values_and_grads(fused(chunk_size, 0.8), *inputs), values_and_grads(fused(None, 0.8), *inputs),
                     "float32")


def test_gradient_through_each_output_alone_and_partial_requires_grad():
    hidden, weight, targets, bias = make_inputs(N, H, V, torch.float64)
    for output in (0, 1):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        ref_leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        got = token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], return_entropy=True, chunk_size=64)
        want = naive(ref_leaves[0], ref_leaves[1], targets, bias=ref_leaves[2])
        got[output].sum().backward()
        want[output].sum().backward()
        for a, e in zip(leaves, ref_leaves):
            assert_close(a.grad, e.grad, "float64", what=f"output {output}")
    frozen_weight = hidden.clone().requires_grad_()
    logp = token_logprobs(frozen_weight, weight, targets, chunk_size=64)  # the LoRA case: only hidden trains
    (grad,) = torch.autograd.grad(logp.sum(), frozen_weight)
    ref_hidden = hidden.clone().requires_grad_()
    (want,) = torch.autograd.grad(naive(ref_hidden, weight, targets)[0].sum(), ref_hidden)
    assert_close(grad, want, "float64", what="grad_hidden with a frozen weight")


def test_outputs_dtype_shape_and_no_grad():
    hidden, weight, targets, _ = make_inputs(N, H, V, torch.bfloat16)
    with torch.no_grad():
        logp, entropy = token_logprobs(hidden, weight, targets, return_entropy=True)
    assert logp.shape == entropy.shape == (N,) and logp.dtype == entropy.dtype == torch.float32
    assert token_logprobs(hidden, weight, targets).shape == (N,)
    empty = token_logprobs(hidden[:0].requires_grad_(), weight, targets[:0])
    assert empty.shape == (0,)
    empty.sum().backward()


def test_never_allocates_full_logits():
    # Largest storage any aten op produces, forward and backward: the naive path makes [N, V] float32; the
    # chunked one at most one [rows, chunk] block (rows = N here) or a weight-sized gradient.
    n, width, vocab, chunk = 256, 8, 4096, 256
    hidden, weight, targets, _ = make_inputs(n, width, vocab, torch.float32, bias=False)
    hidden.requires_grad_()
    weight.requires_grad_()
    full_logits = n * vocab * 4
    with LargestAllocation() as probe:
        naive(hidden, weight, targets)[0].sum().backward()
    assert probe.nbytes >= full_logits  # the probe sees what it must catch
    with LargestAllocation() as probe:
        logp, entropy = token_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=chunk)
        (logp.sum() + entropy.sum()).backward()
    assert probe.nbytes <= max(n * chunk * 4, weight.numel() * 4) < full_logits


def _bad(**changes):
    hidden, weight, targets, bias = make_inputs(8, 4, 16, torch.float32)
    kwargs = dict(hidden=hidden, weight=weight, targets=targets, bias=bias, temperature=1.0)
    kwargs.update(changes)
    return kwargs


@pytest.mark.parametrize("argument, kwargs", [
    ("hidden", _bad(hidden=torch.zeros(2, 8, 4))),
    ("hidden", _bad(hidden=torch.zeros(8, 4, dtype=torch.int32))),
    ("weight", _bad(weight=torch.zeros(16, 5))),
    ("weight", _bad(weight=torch.zeros(16, 4, dtype=torch.float64))),
    ("weight", _bad(weight=torch.zeros(0, 4))),
    ("targets", _bad(targets=torch.zeros(7, dtype=torch.int64))),
    ("targets", _bad(targets=torch.zeros(8, dtype=torch.int32))),
    ("targets", _bad(targets=torch.full((8,), 16))),
    ("targets", _bad(targets=torch.full((8,), -1))),
    ("bias", _bad(bias=torch.zeros(15))),
    ("bias", _bad(bias=torch.zeros(16, dtype=torch.float64))),
    ("temperature", _bad(temperature=0.0)),
    ("temperature", _bad(temperature=-1.0)),
    ("temperature", _bad(temperature=float("nan"))),
    ("temperature", _bad(temperature=float("inf"))),
    ("chunk_size", _bad(chunk_size=0)),
    ("implementation", _bad(implementation="cuda")),
    ("targets", _bad(targets=torch.zeros(8, dtype=torch.int64, device="meta"))),
])
def test_bad_input_names_the_argument(argument, kwargs):
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        token_logprobs(**kwargs)


def test_auto_is_torch_on_cpu():
    assert logprobs._resolve("auto", torch.zeros(1)) == "torch"

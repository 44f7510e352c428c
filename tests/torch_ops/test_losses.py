"""backends/torch/losses.py: each algorithm on fused log-probs equals the same ``aha.algos`` loss on the naive
log-probs (loss, every metric, gradients w.r.t. hidden, weight, bias and the value predictions)."""
import pytest
import torch

from aha.algos import grpo, online_dpo, ppo, rloo
from aha.algos._common import masked_mean
from aha.backends.torch import losses
from aha.backends.torch.logprobs import _interpreting, triton_available
from logprob_oracle import assert_close, naive

B, T, H, V, G = 4, 5, 16, 64, 2
TEMPERATURE = 0.8


def batch(dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    hidden, weight, bias = rand(B, T, H).to(dtype), (rand(V, H) / 2).to(dtype), rand(V).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=gen)
    lengths = torch.tensor([5, 3, 1, 4])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    with torch.no_grad():
        logp = naive_logp(hidden, weight, targets, bias)
    # old/ref log-probs near the policy's, so some ratios fall inside and some outside the clip range
    old_logp, ref_logp = logp + 0.3 * rand(B, T), logp + 0.3 * rand(B, T)
    return dict(hidden=hidden, weight=weight, bias=bias, targets=targets, mask=mask,
                old_logp=old_logp.float() if dtype != torch.float64 else old_logp,
                ref_logp=ref_logp.float() if dtype != torch.float64 else ref_logp, rand=rand)


def naive_logp(hidden, weight, targets, bias, entropy=False):
    out = naive(hidden.reshape(B * T, H), weight, targets.reshape(-1), bias=bias, temperature=TEMPERATURE)
    return (out[0].view(B, T), out[1].view(B, T)) if entropy else out[0].view(B, T)


def cases():
    """(name, fused(hidden, weight, bias, extra) -> (loss, metrics), algos(logp, extra) -> (loss, metrics),
    extra inputs with gradient)."""
    d = batch()
    rand = d["rand"]
    common = dict(old_logp=d["old_logp"], ref_logp=d["ref_logp"], mask=d["mask"])
    adv = rand(B)
    grpo_config = grpo.GRPOConfig(beta=0.04, loss_type="dapo")
    rloo_config = rloo.RLOOConfig(beta=0.05, kl_in="loss")
    ppo_config = ppo.PPOConfig()
    dpo_config = online_dpo.OnlineDPOConfig(beta=0.1)
    pairs = online_dpo.select_pairs(rand(B), num_generations=G)
    ppo_data = dict(advantages=rand(B, T), old_values=rand(B, T), returns=rand(B, T))
    values = rand(B, T)
    return d, [
        ("grpo",
         lambda h, w, b, x: losses.grpo_loss(h, w, d["targets"], d["mask"], d["old_logp"], d["ref_logp"], adv,
                                             config=grpo_config, temperature=TEMPERATURE, bias=b,
                                             num_items_in_batch=17, with_entropy=True),
         lambda logp, x: grpo.loss(logp, d["old_logp"], d["ref_logp"], adv, d["mask"], config=grpo_config,
                                   num_items_in_batch=17), {}),
        ("rloo",
         lambda h, w, b, x: losses.rloo_loss(h, w, d["targets"], d["mask"], None, d["ref_logp"], adv,
                                             config=rloo_config, temperature=TEMPERATURE, bias=b, with_entropy=True),
         lambda logp, x: rloo.loss(logp, None, d["ref_logp"], adv, d["mask"], config=rloo_config), {}),
        ("ppo",
         lambda h, w, b, x: losses.ppo_loss(h, w, d["targets"], d["mask"], d["old_logp"], ppo_data["advantages"],
                                            x["values"], ppo_data["old_values"], ppo_data["returns"],
                                            config=ppo_config, temperature=TEMPERATURE, bias=b, with_entropy=True),
         lambda logp, x: ppo.loss(logp, d["old_logp"], ppo_data["advantages"], x["values"], ppo_data["old_values"],
                                  ppo_data["returns"], d["mask"], config=ppo_config),
         {"values": values}),
        ("online_dpo",
         lambda h, w, b, x: losses.online_dpo_loss(h, w, d["targets"], d["mask"], d["ref_logp"], *pairs,
                                                   config=dpo_config, temperature=TEMPERATURE, bias=b,
                                                   with_entropy=True),
         lambda logp, x: online_dpo.loss(logp, d["ref_logp"], d["mask"], *pairs, config=dpo_config), {}),
    ], common


@pytest.mark.parametrize("index", range(4), ids=["grpo", "rloo", "ppo", "online_dpo"])
def test_fused_loss_equals_algos_loss_on_naive_logprobs(index):
    d, all_cases, _ = cases()
    name, fused, reference, extra = all_cases[index]
    leaves = lambda: [x.clone().requires_grad_() for x in (d["hidden"], d["weight"], d["bias"])]  # noqa: E731
    extras = lambda: {k: v.clone().requires_grad_() for k, v in extra.items()}  # noqa: E731

    fused_leaves, fused_extra = leaves(), extras()
    value, metrics = fused(*fused_leaves, fused_extra)
    value.backward()
    ref_leaves, ref_extra = leaves(), extras()
    logp, entropy = naive_logp(ref_leaves[0], ref_leaves[1], d["targets"], ref_leaves[2], entropy=True)
    ref_value, ref_metrics = reference(logp, ref_extra)
    ref_value.backward()

    assert_close(value.detach(), ref_value.detach(), "float64", what=f"{name} loss")
    assert set(metrics) == set(ref_metrics) | {"entropy"}
    for key, ref in ref_metrics.items():
        assert_close(metrics[key], ref, "float64", what=f"{name} metric {key}")
    assert_close(metrics["entropy"], masked_mean(entropy.detach(), d["mask"]), "float64", what="entropy metric")
    for what, a, e in zip(("hidden", "weight", "bias"), fused_leaves, ref_leaves):
        assert_close(a.grad, e.grad, "float64", what=f"{name} grad {what}")
    for key in extra:
        assert_close(fused_extra[key].grad, ref_extra[key].grad, "float64", what=f"{name} grad {key}")


@pytest.mark.skipif(not triton_available() or not (torch.cuda.is_available() or _interpreting()),
                    reason="needs triton, and CUDA or TRITON_INTERPRET=1")
def test_grpo_on_triton_in_bfloat16_matches_float64():
    d = batch(torch.bfloat16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = grpo.GRPOConfig(beta=0.04)
    adv = torch.linspace(-1, 1, B, device=device)
    to = lambda x: x.to(device)  # noqa: E731
    hidden = to(d["hidden"]).detach().clone().requires_grad_()
    value, _ = losses.grpo_loss(hidden, to(d["weight"]), to(d["targets"]), to(d["mask"]), to(d["old_logp"]),
                                to(d["ref_logp"]), adv, config=config, temperature=TEMPERATURE,
                                implementation="triton")
    value.backward()
    ref_hidden = d["hidden"].detach().double().requires_grad_()
    logp = naive_logp(ref_hidden, d["weight"].double(), d["targets"], None)
    ref_value, _ = grpo.loss(logp, d["old_logp"].double(), d["ref_logp"].double(), adv.cpu().double(), d["mask"],
                             config=config)
    ref_value.backward()
    assert_close(value.detach().double().cpu(), ref_value.detach(), "bfloat16", what="loss")
    assert_close(hidden.grad.double().cpu(), ref_hidden.grad, "bfloat16", what="grad hidden")


def test_shapes_are_checked():
    d = batch()
    with pytest.raises(ValueError, match="hidden, targets"):
        losses.completion_logprobs(d["hidden"][0], d["weight"], d["targets"], temperature=1.0)

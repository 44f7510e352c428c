"""Adapters for targets with aha's own signatures: a project that implements the `aha.algos` contract needs no
mapping. `aha.algos.<algo>.loss` itself passes every case through `LOSS` (tests/conformance/test_targets.py).

LOSS: the target is a loss with the signature of `aha.algos.<algo>.loss`, called on the naive log-probs with the
spec's advantages / returns / pairs; compared: loss, every metric it returns, gradients.
ADVANTAGES: the target is an advantage function with the signature of `aha.algos.<algo>.advantages`; compared:
advantages (and PPO's returns).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..targets import Call, Output


def _grpo_loss(target, call: Call):
    d, p = call.data, call.prepared
    # The train/inference mismatch weight is passed only to the cases that have one (spec/grpo.md §2.5).
    correction = {k: p[k] for k in ("importance_sampling_ratio",) if k in p}
    return target(call.logp, d.get("old_logp"), d.get("ref_logp"), p["advantages"], d["mask"], config=call.config,
                  num_items_in_batch=d.get("num_items_in_batch"), **correction)


def _rloo_loss(target, call: Call):
    d, p = call.data, call.prepared
    return target(call.logp, d.get("old_logp"), d.get("ref_logp"), p["advantages"], d["mask"], config=call.config)


def _ppo_loss(target, call: Call):
    d, p = call.data, call.prepared
    return target(call.logp, d["old_logp"], p["advantages"], call.params["values"], d["old_values"], p["returns"],
                  d["mask"], config=call.config)


def _online_dpo_loss(target, call: Call):
    d, p = call.data, call.prepared
    return target(call.logp, d["ref_logp"], d["mask"], p["chosen_idx"], p["rejected_idx"], p["valid"],
                  config=call.config)


def _grpo_advantages(target, call: Call):
    return {"advantages": target(call.data["rewards"], num_generations=call.num_generations, config=call.config)}


def _rloo_advantages(target, call: Call):
    d = call.data
    return {"advantages": target(d["rewards"], num_generations=call.num_generations, config=call.config,
                                 logp=d["rollout_logp"], ref_logp=d.get("ref_logp"), mask=d["mask"])}


def _ppo_advantages(target, call: Call):
    d = call.data
    advantages, returns = target(d["scores"], d["old_logp"], d["ref_logp"], d["old_values"], d["mask"],
                                 config=call.config)
    return {"advantages": advantages, "returns": returns}


@dataclass(frozen=True)
class AhaSignature:
    name: str
    calls: dict
    covers: str
    default_target: str | None = None
    dtype: str = "float64"

    @property
    def algos(self) -> tuple[str, ...]:
        return tuple(self.calls)

    def supports(self, case) -> str | None:
        return None

    def __call__(self, target, call: Call) -> Output:
        result = self.calls[call.case.algo](target, call)
        if isinstance(result, dict):
            return Output(outputs=result)
        loss, metrics = result
        return Output(loss=loss, metrics=metrics)


LOSS = AhaSignature(
    "aha", {"grpo": _grpo_loss, "rloo": _rloo_loss, "ppo": _ppo_loss, "online_dpo": _online_dpo_loss},
    "loss, every metric the target returns, gradients (hidden states, LM head, value predictions); "
    "advantages, returns and pairs are the spec's (inputs)")
ADVANTAGES = AhaSignature(
    "aha-advantages", {"grpo": _grpo_advantages, "rloo": _rloo_advantages, "ppo": _ppo_advantages},
    "advantages (PPO: and returns) from the rewards")

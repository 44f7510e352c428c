"""One conformance problem per algorithm: its config variants, its inputs, and its objective.

A problem turns a case into (a) the algorithm's own float64 inputs (rewards, old/ref log-probs, values),
(b) `prepare`: what the trainer computes before the update (advantages, returns, pairs), (c) `loss`:
the `aha.algos` loss on given log-probs, and (d) `fused_loss`: the same through
`aha.backends.torch.losses`, from hidden states. (b) and (c), written against the array API, make the
`objective(logp, params) -> (loss, metrics, outputs)` that the NumPy, JAX and plain torch backends
evaluate; `params` holds the inputs the loss is differentiated in besides the log-probs (PPO's value
predictions); `outputs` are the prepared arrays, compared too.

Inputs are *conditioned*: importance log-ratios are pushed at least `RATIO_MARGIN` away from every
kink of the loss (clip edges, δ, the CISPO cap, the dual clip), in the statistic the loss actually
thresholds (per token, per-sequence mean for GSPO, per-sequence sum for RLOO). Near a kink a bfloat16
rounding error flips a clip indicator and moves a gradient discontinuously; that would test luck,
not the implementation. The far-from-1 regime is still exercised by the `far_ratios` edge.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import numpy as np

RATIO_MARGIN = 0.1
"""Minimum distance, in log-ratio, between any ratio statistic and a kink of the loss (10% in ratio)."""

Objective = Callable[..., tuple]


class Problem(Protocol):
    algo: str
    edges: tuple[str, ...]
    params: tuple[str, ...]
    dimensions: dict[str, tuple]
    """The config dimensions and their values; a variant is one value per dimension."""
    core: tuple[str, ...]
    """Dimensions whose full product the default (covering) selection keeps (registry.variants)."""

    def variant(self, **choice) -> tuple[Any, dict] | None:
        """(config, options) of one choice of values, or None when the combination is meaningless."""

    def appended_variants(self) -> list[tuple[dict, Any, dict]]:
        """(choice, config, options) of variants listed after the covering set (registry.appended_variants), so
        that adding one moves no existing case: features that are not a dimension of every variant."""

    def build(self, rng: np.random.Generator, case, *, logp: np.ndarray, mask: np.ndarray) -> dict:
        """The algorithm's own float64 inputs of a case, drawn from `rng` (old/ref log-probs around `logp`)."""

    def prepare(self, data: dict, config: Any, num_generations: int) -> dict:
        """What the trainer computes before the update, without gradient: advantages, returns, pairs."""

    def loss(self, logp, params: dict, data: dict, prepared: dict, config: Any) -> tuple:
        """`aha.algos.<algo>.loss` on given log-probs: (loss, metrics)."""

    def fused_loss(self, losses, model: dict, params: dict, data: dict, prepared: dict, config: Any) -> tuple:
        """`aha.backends.torch.losses.<algo>_loss` from hidden states (`model`: hidden [B, T, H], weight,
        bias, targets, temperature, implementation): (loss, metrics)."""

    def value_gradient_agree(self, case) -> bool:
        """False where the gradient is by design not the derivative of the value (stop-gradient tricks)."""


def objective(problem: Problem, data: dict, config: Any, num_generations: int) -> Objective:
    """objective(logp, params) -> (loss, metrics, outputs): prepare, then the algorithm's loss on `logp`."""
    prepared = problem.prepare(data, config, num_generations)

    def evaluate(logp, params):
        loss, metrics = problem.loss(logp, params, data, prepared, config)
        return loss, metrics, prepared

    return evaluate


# ------------------------------------------------------------------------------------------------
# Input helpers shared by the problems
# ------------------------------------------------------------------------------------------------

def _push_off(values: np.ndarray, kinks: list[float], margin: float) -> np.ndarray:
    """Move every value lying within `margin` of a kink to the nearest edge of the merged forbidden set."""
    intervals: list[list[float]] = []
    for kink in sorted(kinks):
        if intervals and kink - margin <= intervals[-1][1]:
            intervals[-1][1] = kink + margin
        else:
            intervals.append([kink - margin, kink + margin])
    out = np.array(values, dtype=np.float64)
    for low, high in intervals:
        inside = (out > low) & (out < high)
        out[inside] = np.where(out[inside] - low < high - out[inside], low, high)
    return out


def condition_log_ratio(d: np.ndarray, mask: np.ndarray, kinks: list[float], view: str) -> np.ndarray:
    """Condition log-ratios d [B, T] so that the `view` statistic stays RATIO_MARGIN away from the kinks.

    view: "token" (each active d), "mean" (masked mean per row, GSPO), "sum" (masked sum per row, RLOO).
    For the row views the whole row is shifted, which keeps its token-level spread.
    """
    d = np.array(d, dtype=np.float64)
    if view == "token":
        return np.where(mask > 0, _push_off(d, kinks, RATIO_MARGIN), d)
    count = mask.sum(-1)
    stat = (d * mask).sum(-1) / (np.maximum(count, 1) if view == "mean" else 1)
    shift = _push_off(stat, kinks, RATIO_MARGIN) - stat
    per_token = shift if view == "mean" else shift / np.maximum(count, 1)
    return d + np.where(count > 0, per_token, 0.0)[:, None] * mask


def visit_every_region(d: np.ndarray, mask: np.ndarray, advantages: np.ndarray, regions, view: str) -> np.ndarray:
    """Put one token (token view) or one row's mean (mean view) into each (advantage sign, log-ratio) region,
    on distinct active rows with an advantage of that sign, so every branch of the loss is taken in every
    off-policy case: a perturbation of any clip edge then changes some loss value."""
    d = np.array(d, dtype=np.float64)
    used: set[int] = set()
    for sign, target in regions:
        rows = [i for i in range(d.shape[0]) if mask[i].any() and advantages[i] * sign > 0 and i not in used]
        if not rows:
            continue
        row = rows[0]
        used.add(row)
        if view == "token":
            d[row, 0] = target  # rows are right-padded: the first token is active
        else:
            d[row] += (target - (d[row] * mask[row]).sum() / mask[row].sum()) * mask[row]
    return d


def log_ratio_noise(rng: np.random.Generator, shape: tuple[int, ...], edge: str) -> np.ndarray:
    """log π - log π_old: a mix of tokens near the trust region (σ = 0.1) and beyond its edges (σ = 0.5), so
    both branches of every clip are taken; for the `far_ratios` edge ±1–3 with random sign."""
    if edge == "far_ratios":
        return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(1.0, 3.0, size=shape)
    return rng.normal(size=shape) * rng.choice([0.1, 0.5], size=shape)


def dyadic_rewards(rng: np.random.Generator, batch: int, num_generations: int, edge: str) -> np.ndarray:
    """Rewards on a quarter grid in [0, 2]: exact in every float dtype, so group means, zero-std groups and
    ties are the same in float32 as in float64. Edges add an all-equal group or unscorable (NaN) rewards."""
    rewards = rng.integers(0, 9, size=batch) * 0.25
    groups = batch // num_generations
    if edge == "equal_rewards":
        rewards[:num_generations] = 0.5
    if edge == "nan_rewards":
        rewards[1:num_generations] = np.nan  # group 0: a single scorable member
        if groups > 1:
            rewards[-num_generations:] = np.nan  # last group: nothing scorable
        if groups > 2:
            rewards[num_generations + 1] = np.nan  # one unscorable row in a group
    return rewards


def sampler_drift(rng: np.random.Generator, mask: np.ndarray, mode: str, clip_min: float | None,
                  clip_max: float | None, *, exact_rows: np.ndarray) -> np.ndarray:
    """log π_old - log π_sampler [B, T] for the mismatch correction: tokens a little off (σ = 0.1) and far off
    (σ = 0.6), kept RATIO_MARGIN away from log C_min and log C_max in the statistic the mode thresholds (each
    token, or each row's sum), with one token or row pushed beyond each bound, so every branch of the
    truncation or mask is taken. `exact_rows` [B] bool: rows sampled without mismatch (ρ^IS = 1), so the
    clip regions visit_every_region put there stay weighted (a masked ρ^IS of 0 would hide them)."""
    d = rng.normal(size=mask.shape) * rng.choice([0.1, 0.6], size=mask.shape)
    d[exact_rows] = 0.0
    bounds = [math.log(b) for b in (clip_min, clip_max) if b is not None]
    token = mode.startswith("token")
    rows = [i for i in range(mask.shape[0]) if mask[i].any() and not exact_rows[i]]
    for row, target in zip(rows, [bound + (-0.3 if k == 0 and clip_min is not None else 0.3)
                                  for k, bound in enumerate(bounds)]):
        if token:
            d[row, 0] = target
        else:
            d[row] += (target - (d[row] * mask[row]).sum()) / mask[row].sum() * mask[row]
    return condition_log_ratio(d, mask, bounds, "token" if token else "sum")


# ------------------------------------------------------------------------------------------------
# GRPO
# ------------------------------------------------------------------------------------------------

class GRPOProblem:
    algo = "grpo"
    edges = ("generic", "equal_rewards", "masked_rows", "length_one", "far_ratios", "huge_logits",
             "tiny_logits", "nan_rewards")
    params = ()

    dimensions = {
        "loss": ("grpo", "bnpo", "dr_grpo", "dapo", "cispo"),
        "level": ("token", "sequence"),
        "beta": (0.0, 0.04),
        "delta": (None, 1.6),
        "scale": ("group", "batch", "none"),
        "policy": ("off", "on"),
    }
    core = ("loss", "level", "policy")

    corrections = (  # (loss, level, beta, (mode, C_min, C_max)): each mode with TRL's and with two-sided bounds
        ("dapo", "token", 0.04, ("token_truncate", 0.5, 2.0)),
        ("grpo", "sequence", 0.0, ("token_mask", 0.5, 2.0)),
        ("bnpo", "token", 0.0, ("sequence_truncate", None, 3.0)),
        ("dapo", "token", 0.0, ("sequence_mask", None, 3.0)),
        ("cispo", "token", 0.04, ("sequence_mask", 0.25, 3.0)),
        ("dr_grpo", "sequence", 0.04, ("sequence_truncate", 0.5, 2.0)),
    )
    """The train/inference mismatch correction (spec/grpo.md §2.5): sampler log-probs in the inputs, the ratio
    ρ^IS prepared by `aha.algos.mismatch` and passed to the loss. Always off-policy: with the correction the
    trainer scores π_old (as TRL)."""

    def variant(self, loss, level, beta, delta, scale, policy):
        from aha.algos.grpo import GRPOConfig

        if loss == "cispo" and delta is not None:
            return None  # δ caps the clipped surrogate only; CISPO has none
        config = GRPOConfig(
            epsilon=0.2, epsilon_high=1.5 if loss == "cispo" else 0.28, delta=delta, beta=beta, loss_type=loss,
            scale_rewards=scale, importance_sampling_level=level, max_completion_length=8,
        )
        return config, {"on_policy": policy == "on"}

    def appended_variants(self):
        out = []
        for loss, level, beta, correction in self.corrections:
            choice = dict(loss=loss, level=level, beta=beta, delta=None, scale="group", policy="off")
            config, options = self.variant(**choice)
            out.append(({**choice, "correction": correction}, config, {**options, "correction": correction}))
        return out

    def regions(self, config) -> list[tuple[float, float]]:
        """(advantage sign, log-ratio) points inside every region where the loss's branch changes: clipped low
        with A < 0, clipped high with A > 0, beyond δ with A < 0, above the CISPO cap with A > 0."""
        if config.loss_type == "cispo":
            return [(1.0, math.log(config.clip_high) + 0.3)]
        low, high = math.log(1 - config.epsilon), math.log(1 + config.clip_high)
        if config.delta is None:
            return [(-1.0, low - 0.3), (1.0, high + 0.3)]
        delta = math.log(config.delta)
        return [(-1.0, low - 0.3), (1.0, (high + delta) / 2), (-1.0, delta + 0.3)]

    def kinks(self, config) -> list[float]:
        if config.loss_type == "cispo":
            return [math.log(config.clip_high)]
        kinks = [math.log(1 - config.epsilon), math.log(1 + config.clip_high)]
        return kinks + ([math.log(config.delta)] if config.delta is not None else [])

    def build(self, rng, case, *, logp, mask):
        config = case.config
        out: dict[str, Any] = {"rewards": dyadic_rewards(rng, case.shape.B, case.num_generations, case.edge)}
        if not case.options["on_policy"]:
            view = "token" if config.importance_sampling_level == "token" else "mean"
            d = log_ratio_noise(rng, logp.shape, case.edge)
            advantages = self.prepare(out, config, case.num_generations)["advantages"]
            visited = visit_every_region(d, mask, advantages, self.regions(config), view)
            out["old_logp"] = logp - condition_log_ratio(visited, mask, self.kinks(config), view)
        if config.beta != 0:
            out["ref_logp"] = logp + rng.normal(scale=0.3, size=logp.shape)
        if config.loss_type in ("dapo", "cispo") and rng.random() < 0.5:
            out["num_items_in_batch"] = float(mask.sum() + rng.integers(0, 10))  # other micro-batches' tokens
        if "correction" in case.options:
            mode, clip_min, clip_max = case.options["correction"]
            out["sampler_logp"] = out["old_logp"] - sampler_drift(rng, mask, mode, clip_min, clip_max,
                                                                  exact_rows=np.any(visited != d, axis=1))
            out.update(correction_mode=mode, correction_clip_min=clip_min, correction_clip_max=clip_max)
        return out

    def prepare(self, data, config, groups):
        from aha.algos import grpo, mismatch

        prepared = {"advantages": grpo.advantages(data["rewards"], num_generations=groups, config=config)}
        if "sampler_logp" in data:
            prepared["importance_sampling_ratio"] = mismatch.importance_sampling_ratio(
                data["old_logp"], data["sampler_logp"], data["mask"], mode=data["correction_mode"],
                clip_min=data["correction_clip_min"], clip_max=data["correction_clip_max"])
        return prepared

    def loss(self, logp, params, data, prepared, config):
        from aha.algos import grpo

        return grpo.loss(logp, data.get("old_logp"), data.get("ref_logp"), prepared["advantages"], data["mask"],
                         config=config, num_items_in_batch=data.get("num_items_in_batch"),
                         importance_sampling_ratio=prepared.get("importance_sampling_ratio"))

    def fused_loss(self, losses, model, params, data, prepared, config):
        return losses.grpo_loss(
            model["hidden"], model["weight"], model["targets"], data["mask"], data.get("old_logp"),
            data.get("ref_logp"), prepared["advantages"], config=config, temperature=model["temperature"],
            bias=model["bias"], implementation=model["implementation"],
            num_items_in_batch=data.get("num_items_in_batch"),
            importance_sampling_ratio=prepared.get("importance_sampling_ratio"))

    def value_gradient_agree(self, case):
        return not case.options["on_policy"] and case.config.loss_type != "cispo"


# ------------------------------------------------------------------------------------------------
# RLOO
# ------------------------------------------------------------------------------------------------

class RLOOProblem:
    algo = "rloo"
    edges = GRPOProblem.edges
    params = ()

    dimensions = {
        "kl_in": ("reward", "loss"),
        "beta": (0.0, 0.05),
        "normalize": (False, True),
        "reward_clip": (None, (0.25, 1.5)),
        "policy": ("off", "on"),
    }
    core = ("kl_in", "beta", "policy")

    def appended_variants(self):
        return []

    def variant(self, kl_in, beta, normalize, reward_clip, policy):
        from aha.algos.rloo import RLOOConfig

        config = RLOOConfig(beta=beta, kl_in=kl_in, epsilon=0.2, epsilon_high=0.28, normalize_advantages=normalize,
                            reward_clip_range=reward_clip)
        return config, {"on_policy": policy == "on"}

    def build(self, rng, case, *, logp, mask):
        config = case.config
        out: dict[str, Any] = {"rewards": dyadic_rewards(rng, case.shape.B, case.num_generations, case.edge)}
        if not case.options["on_policy"]:
            kinks = [math.log(1 - config.epsilon), math.log(1 + config.clip_high)]
            d = condition_log_ratio(log_ratio_noise(rng, logp.shape, case.edge), mask, kinks, "sum")
            out["old_logp"] = logp - d
        out["rollout_logp"] = out.get("old_logp", logp)
        if config.beta != 0:
            out["ref_logp"] = logp + rng.normal(scale=0.3, size=logp.shape)
        return out

    def prepare(self, data, config, groups):
        from aha.algos import rloo

        # The KL-in-reward uses the rollout policy's log-probs (old, or on-policy the current ones, scored
        # before the update: given as `rollout_logp`).
        return {"advantages": rloo.advantages(data["rewards"], num_generations=groups, config=config,
                                              logp=data["rollout_logp"], ref_logp=data.get("ref_logp"),
                                              mask=data["mask"])}

    def loss(self, logp, params, data, prepared, config):
        from aha.algos import rloo

        return rloo.loss(logp, data.get("old_logp"), data.get("ref_logp"), prepared["advantages"], data["mask"],
                         config=config)

    def fused_loss(self, losses, model, params, data, prepared, config):
        return losses.rloo_loss(
            model["hidden"], model["weight"], model["targets"], data["mask"], data.get("old_logp"),
            data.get("ref_logp"), prepared["advantages"], config=config, temperature=model["temperature"],
            bias=model["bias"], implementation=model["implementation"])

    def value_gradient_agree(self, case):
        return not case.options["on_policy"]


# ------------------------------------------------------------------------------------------------
# PPO
# ------------------------------------------------------------------------------------------------

class PPOProblem:
    algo = "ppo"
    edges = ("generic", "equal_rewards", "masked_rows", "length_one", "far_ratios", "huge_logits", "tiny_logits")
    params = ("values",)

    dimensions = {
        "kl": ("k1", "k3"),
        "whiten": (True, False),
        "dual_clip": (None, 3.0),
        "score_at": ("first_pad", "last_token"),
    }
    core = ("kl", "whiten", "dual_clip", "score_at")

    def appended_variants(self):
        return []

    def variant(self, kl, whiten, dual_clip, score_at):
        from aha.algos.ppo import PPOConfig

        config = PPOConfig(kl_estimator=kl, whiten_advantages=whiten, dual_clip=dual_clip, reward_position=score_at,
                           gamma=0.99, lam=0.95)
        return config, {}

    def build(self, rng, case, *, logp, mask):
        config = case.config
        kinks = [math.log(1 - config.cliprange), math.log(1 + config.cliprange)]
        kinks += [math.log(config.dual_clip)] if config.dual_clip is not None else []
        d = condition_log_ratio(log_ratio_noise(rng, logp.shape, case.edge), mask, kinks, "token")
        scores = rng.integers(-4, 5, size=case.shape.B) * 0.5
        if case.edge == "equal_rewards":
            scores[:] = 1.0
        old_values = rng.normal(scale=0.5, size=logp.shape)
        # Current value predictions: some inside, some outside the value clip range (margin 0.05 from its edges).
        step = rng.choice([-1.0, 1.0], size=logp.shape) * rng.choice([0.1, 0.35], size=logp.shape)
        return {"old_logp": logp - d, "ref_logp": logp + rng.normal(scale=0.3, size=logp.shape),
                "scores": scores, "old_values": old_values, "values": old_values + step}

    def prepare(self, data, config, groups):
        from aha.algos import ppo

        adv, returns = ppo.advantages(data["scores"], data["old_logp"], data["ref_logp"], data["old_values"],
                                      data["mask"], config=config)
        return {"advantages": adv, "returns": returns}

    def loss(self, logp, params, data, prepared, config):
        from aha.algos import ppo

        return ppo.loss(logp, data["old_logp"], prepared["advantages"], params["values"], data["old_values"],
                        prepared["returns"], data["mask"], config=config)

    def fused_loss(self, losses, model, params, data, prepared, config):
        return losses.ppo_loss(
            model["hidden"], model["weight"], model["targets"], data["mask"], data["old_logp"],
            prepared["advantages"], params["values"], data["old_values"], prepared["returns"], config=config,
            temperature=model["temperature"], bias=model["bias"], implementation=model["implementation"])

    def value_gradient_agree(self, case):
        return True


# ------------------------------------------------------------------------------------------------
# Online DPO
# ------------------------------------------------------------------------------------------------

PAIR_MARGIN = 0.5
"""Minimum |h| of a valid pair (h = policy minus reference log-ratio of chosen over rejected), so that the
`rewards/accuracies` indicator does not flip on a bfloat16 rounding of a sum of up to 2T log-probs."""


class OnlineDPOProblem:
    algo = "online_dpo"
    edges = ("generic", "equal_rewards", "masked_rows", "length_one", "huge_logits", "tiny_logits", "nan_rewards")
    params = ()

    dimensions = {
        "loss": ("sigmoid", "ipo"),
        "G": (2, 4),
        "beta": (0.1, 1.0),
        "eos_penalty": (None, 0.5),
    }
    core = ("loss", "G", "beta", "eos_penalty")

    def appended_variants(self):
        return []

    def variant(self, loss, G, beta, eos_penalty):
        from aha.algos.online_dpo import OnlineDPOConfig

        return OnlineDPOConfig(beta=beta, loss_type=loss, missing_eos_penalty=eos_penalty), {"num_generations": G}

    def build(self, rng, case, *, logp, mask):
        from aha.algos import online_dpo

        rewards = dyadic_rewards(rng, case.shape.B, case.num_generations, case.edge)
        has_eos = rng.random(case.shape.B) < 0.7
        ref_logp = logp + rng.normal(scale=0.5, size=logp.shape)
        penalized = online_dpo.apply_missing_eos_penalty(rewards, has_eos, case.config.missing_eos_penalty)
        chosen, rejected, valid = online_dpo.select_pairs(penalized, num_generations=case.num_generations)
        for c, r in zip(chosen[valid], rejected[valid]):
            h = ((logp[c] - ref_logp[c]) * mask[c]).sum() - ((logp[r] - ref_logp[r]) * mask[r]).sum()
            row = c if mask[c].any() else r
            if abs(h) < PAIR_MARGIN and mask[row].any():
                push = (PAIR_MARGIN if h >= 0 else -PAIR_MARGIN) - h
                ref_logp[row, 0] += -push if row == c else push
        return {"rewards": rewards, "has_eos": has_eos, "ref_logp": ref_logp}

    def prepare(self, data, config, groups):
        from aha.algos import online_dpo

        rewards = online_dpo.apply_missing_eos_penalty(data["rewards"], data["has_eos"], config.missing_eos_penalty)
        chosen, rejected, valid = online_dpo.select_pairs(rewards, num_generations=groups)
        return {"chosen_idx": chosen, "rejected_idx": rejected, "valid": valid}

    def loss(self, logp, params, data, prepared, config):
        from aha.algos import online_dpo

        return online_dpo.loss(logp, data["ref_logp"], data["mask"], prepared["chosen_idx"],
                               prepared["rejected_idx"], prepared["valid"], config=config)

    def fused_loss(self, losses, model, params, data, prepared, config):
        return losses.online_dpo_loss(
            model["hidden"], model["weight"], model["targets"], data["mask"], data["ref_logp"],
            prepared["chosen_idx"], prepared["rejected_idx"], prepared["valid"], config=config,
            temperature=model["temperature"], bias=model["bias"], implementation=model["implementation"])

    def value_gradient_agree(self, case):
        return True


def _available() -> dict[str, Problem]:
    """The problems whose `aha.algos` module exists (algorithms land one by one)."""
    import importlib.util

    problems: dict[str, Problem] = {}
    for problem in (GRPOProblem(), RLOOProblem(), PPOProblem(), OnlineDPOProblem()):
        if importlib.util.find_spec(f"aha.algos.{problem.algo}") is not None:
            problems[problem.algo] = problem
    return problems


PROBLEMS: dict[str, Problem] = _available()

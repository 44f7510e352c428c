"""PPO with a value head and GAE, as TRL's (experimental) PPOTrainer implements it for RLHF.

Spec: spec/ppo.md. TRL semantics: shared/reference/trl.md §5.
Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7 (clipped surrogate), eq. 9 (value loss);
Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", eqs. 11–16 (GAE);
Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", eq. 2 (per-token KL penalty);
Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", eq. 5 (dual clip).

Score placement (``reward_position``, spec/ppo.md eqs. 1–2), with ℓ_i the index of the last active token of
row i (rows are right-padded: active tokens are a prefix; ℓ_i = -1 for a fully masked row):
  "first_pad" (TRL, default): the score is added at e_i = min(ℓ_i + 1, T - 1), the first padding position after
      the completion, or ℓ_i when the row fills all T positions (TRL L777–779, issue huggingface/trl#3750).
      A fully masked row gets its score at position 0.
  "last_token": the score is added at e_i = ℓ_i, the last active token (EOS when present); a fully masked row
      gets no score.
The value mask v⁺ is t <= e_i: values there are kept in GAE and trained; values after e_i are treated as 0
(TRL fills them with 0). The KL penalty and the policy loss use the completion mask (t <= ℓ_i) only, which is
what TRL's INVALID_LOGPROB = 1.0 fill does (equal filled log-probs give KL 0 and ratio 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from array_api_compat import array_namespace, device

from ._common import (
    Array,
    Metrics,
    as_bool,
    as_float,
    check_float,
    check_mask,
    check_shapes,
    kl_estimate,
    masked_mean,
    masked_var,
    stop_gradient,
    whiten,
)


@dataclass(frozen=True)
class PPOConfig:
    gamma: float = 1.0
    """Discount γ of GAE."""
    lam: float = 0.95
    """GAE λ."""
    kl_coef: float = 0.05
    """Coefficient of the per-token KL penalty in the reward, r_t = -kl_coef·kl_t (+ score)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """KL estimator of the penalty, on x = log π_ref - log π_old: k1 = -x, k3 = eˣ - 1 - x."""
    cliprange: float = 0.2
    """Policy ratio clip ε."""
    cliprange_value: float = 0.2
    """Value clip ε_v around the rollout values."""
    vf_coef: float = 0.1
    """Weight of the value loss (which carries TRL's factor 0.5)."""
    whiten_advantages: bool = True
    """Whiten advantages over the active tokens of the batch (TRL always does)."""
    whiten_rewards: bool = False
    """Scale (without shifting) the token rewards over v⁺ before GAE, as TRL's ``whiten_rewards``."""
    whiten_eps: float = 1e-8
    """ε in (x - μ)/sqrt(σ² + ε) (TRL ``masked_whiten``)."""
    whiten_ddof: int = 1
    """Delta degrees of freedom of the whitening variance (1 = Bessel, TRL ``masked_var``)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 (Ye et al. 2020): for A < 0 the policy loss is capped at -c·A; None = off."""
    reward_position: Literal["first_pad", "last_token"] = "first_pad"
    """Where the sequence score is added; see the module docstring."""

    def __post_init__(self):
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator: unknown {self.kl_estimator!r}; expected 'k1' or 'k3'")
        if self.reward_position not in ("first_pad", "last_token"):
            raise ValueError(f"reward_position: unknown {self.reward_position!r}; expected 'first_pad' or 'last_token'")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma: expected 0 <= gamma <= 1, got {self.gamma}")
        if not 0 <= self.lam <= 1:
            raise ValueError(f"lam: expected 0 <= lam <= 1, got {self.lam}")
        if not 0 <= self.cliprange < 1:
            raise ValueError(f"cliprange: expected 0 <= cliprange < 1, got {self.cliprange}")
        if self.cliprange_value < 0:
            raise ValueError(f"cliprange_value: expected >= 0, got {self.cliprange_value}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip: expected > 1, got {self.dual_clip}")
        if self.whiten_eps < 0:
            raise ValueError(f"whiten_eps: expected >= 0, got {self.whiten_eps}")


def _last_active_index(mask: Array) -> Array:
    """ℓ_i = max{t : m_it = 1}, -1 for a fully masked row. [B, T] -> [B] (integer)."""
    xp = array_namespace(mask)
    positions = xp.arange(mask.shape[1], device=device(mask))
    return xp.max(xp.where(as_bool(mask), positions[None, :], -xp.ones_like(positions)[None, :]), axis=1)


def _reward_index(mask: Array, config: PPOConfig) -> Array:
    """e_i: the position of the score (module docstring). [B, T] -> [B] (integer; -1 = nowhere)."""
    xp = array_namespace(mask)
    last = _last_active_index(mask)
    if config.reward_position == "last_token":
        return last
    return xp.clip(last + 1, max=mask.shape[1] - 1)


def value_mask(mask: Array, *, config: PPOConfig) -> Array:
    """v⁺_it = [t <= e_i] (spec/ppo.md eq. 2): positions whose values enter GAE and the value loss. -> [B, T] bool."""
    xp = array_namespace(mask)
    positions = xp.arange(mask.shape[1], device=device(mask))
    return positions[None, :] <= _reward_index(mask, config)[:, None]


def token_rewards(scores: Array, logp: Array, ref_logp: Array, mask: Array, *, config: PPOConfig) -> Array:
    """r_it = -kl_coef·kl_it·m_it + score_i·[t = e_i] (spec/ppo.md eqs. 3–4; trl.md §5.3; Ziegler et al. eq. 2).

    Shapes: scores [B]; logp (rollout policy), ref_logp, mask [B, T] -> [B, T]. kl by ``kl_estimator`` on
    x = ref_logp - logp. Without gradient.
    """
    check_shapes(logp=(logp, "B T"), ref_logp=(ref_logp, "B T"), mask=(mask, "B T"), scores=(scores, "B"))
    check_float(scores=scores, logp=logp, ref_logp=ref_logp)
    check_mask(mask, logp)
    xp = array_namespace(scores, logp, mask)
    kl = kl_estimate(stop_gradient(logp), stop_gradient(ref_logp), config.kl_estimator)
    penalty = xp.where(as_bool(mask), -config.kl_coef * kl, xp.zeros_like(kl))
    positions = xp.arange(mask.shape[1], device=device(mask))
    at_score = positions[None, :] == _reward_index(mask, config)[:, None]
    return penalty + xp.where(at_score, stop_gradient(scores)[:, None], xp.zeros_like(penalty))


def gae(token_rewards: Array, values: Array, mask: Array, *, config: PPOConfig) -> tuple[Array, Array]:
    """Generalized advantage estimation over all T positions (spec/ppo.md eqs. 5–6; Schulman et al. 2016 eq. 16).

    Shapes: token_rewards, values, mask [B, T] -> (advantages [B, T], returns [B, T]).
    V_t := 0 outside v⁺ and V_T := 0; δ_t = r_t + γ V_{t+1} - V_t; Â_t = δ_t + γλ Â_{t+1}; returns R̂ = Â + V
    (from the raw, unwhitened advantages, as TRL). Without gradient.
    """
    check_shapes(token_rewards=(token_rewards, "B T"), values=(values, "B T"), mask=(mask, "B T"))
    check_float(token_rewards=token_rewards, values=values)
    check_mask(mask, values)
    xp = array_namespace(token_rewards, values, mask)
    rewards = stop_gradient(token_rewards)
    values = xp.where(value_mask(mask, config=config), stop_gradient(values), xp.zeros_like(values))
    steps = []
    next_value = xp.zeros_like(values[:, 0])
    running = xp.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + config.gamma * next_value - values[:, t]
        running = delta + config.gamma * config.lam * running
        steps.append(running)
        next_value = values[:, t]
    advantages = xp.stack(steps[::-1], axis=1)
    return advantages, advantages + values


def advantages(
    scores: Array, logp: Array, ref_logp: Array, values: Array, mask: Array, *, config: PPOConfig
) -> tuple[Array, Array]:
    """token_rewards -> (optional reward scaling) -> gae -> whitening (spec/ppo.md eqs. 3–7; trl.md §5.3).

    Shapes: scores [B]; logp (rollout policy), ref_logp, values, mask [B, T] -> (advantages, returns) [B, T].
    Advantages are whitened over the active tokens (Bessel, ``whiten_eps``) and 0 outside the completion mask.
    """
    check_shapes(
        logp=(logp, "B T"), ref_logp=(ref_logp, "B T"), values=(values, "B T"), mask=(mask, "B T"),
        scores=(scores, "B"),
    )
    check_float(values=values, logp=logp)
    xp = array_namespace(scores, logp, mask)
    rewards = token_rewards(scores, logp, ref_logp, mask, config=config)
    if config.whiten_rewards:
        scoring = value_mask(mask, config=config)
        rewards = whiten(rewards, scoring, ddof=config.whiten_ddof, eps=config.whiten_eps, shift_mean=False)
        rewards = xp.where(scoring, rewards, xp.zeros_like(rewards))
    adv, returns = gae(rewards, values, mask, config=config)
    if config.whiten_advantages:
        adv = whiten(adv, mask, ddof=config.whiten_ddof, eps=config.whiten_eps)
    return xp.where(as_bool(mask), adv, xp.zeros_like(adv)), returns


def loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    *,
    config: PPOConfig,
) -> tuple[Array, Metrics]:
    """PPO loss = pg_loss + vf_coef·vf_loss (spec/ppo.md eqs. 8–12, metrics §5; trl.md §5.4).

    Shapes: every input [B, T]. ``values`` are the current value predictions (with gradient), ``old_values`` the
    rollout values. ρ = exp(log π - log π_old);
    pg_loss = masked mean over m of max(-Âρ, -Â clip(ρ, 1-ε, 1+ε)) (PPO eq. 7), and for Â < 0 with dual clip
    min(·, -c Â) (Ye et al. eq. 5);
    vf_loss = ½ · masked mean over v⁺ of max((V - R̂)², (clip(V, V_old ± ε_v) - R̂)²) (PPO eq. 9).
    Metrics include ``return_var`` and ``residual_var`` (of R̂ - V_old) over v⁺: explained variance is
    1 - residual_var / return_var once aggregated over the rollout.
    """
    check_shapes(
        logp=(logp, "B T"), old_logp=(old_logp, "B T"), advantages=(advantages, "B T"), values=(values, "B T"),
        old_values=(old_values, "B T"), returns=(returns, "B T"), mask=(mask, "B T"),
    )
    check_float(
        logp=logp, old_logp=old_logp, advantages=advantages, values=values, old_values=old_values, returns=returns
    )
    check_mask(mask, logp)
    xp = array_namespace(logp, values, mask)
    active = as_bool(mask)
    scoring = value_mask(mask, config=config)
    adv, old_logp = stop_gradient(advantages), stop_gradient(old_logp)
    old_values, returns = stop_gradient(old_values), stop_gradient(returns)

    log_ratio = xp.where(active, logp - old_logp, xp.zeros_like(logp))
    ratio = xp.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * xp.clip(ratio, min=1.0 - config.cliprange, max=1.0 + config.cliprange)
    pg = xp.maximum(pg_unclipped, pg_clipped)
    if config.dual_clip is not None:
        pg = xp.where(adv < 0, xp.minimum(pg, -config.dual_clip * adv), pg)
    pg_loss = masked_mean(pg, active)

    values_clipped = xp.clip(values, min=old_values - config.cliprange_value, max=old_values + config.cliprange_value)
    vf_unclipped = (values - returns) ** 2
    vf_clipped = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(xp.maximum(vf_unclipped, vf_clipped), scoring)

    sg = stop_gradient
    residual = returns - old_values
    return_var = masked_var(returns, scoring, ddof=1)
    metrics: Metrics = {
        "pg_loss": sg(pg_loss),
        "vf_loss": sg(vf_loss),
        "approx_kl": 0.5 * masked_mean(sg(log_ratio) ** 2, active),
        "clipfrac": masked_mean(as_float(sg(pg_clipped) > sg(pg_unclipped), logp.dtype), active),
        "vf_clipfrac": masked_mean(as_float(sg(vf_clipped) > sg(vf_unclipped), logp.dtype), scoring),
        "ratio_mean": masked_mean(sg(ratio), active),
        "value_mean": masked_mean(sg(values), scoring),
        "return_mean": masked_mean(returns, scoring),
        "return_var": return_var,
        "residual_var": masked_var(residual, scoring, ddof=1),
    }
    return pg_loss + config.vf_coef * vf_loss, metrics

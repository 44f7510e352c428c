"""Adapters for verl's `verl.trainer.ppo.core_algos` (tested with verl 0.9.1, installed with --no-deps).

The target is the module; each adapter calls the functions verl's trainer calls for that algorithm, with the
arguments its trainer passes (cited per line), and maps aha's config onto verl's:

| aha                                     | verl                                                              |
|-----------------------------------------|-------------------------------------------------------------------|
| GRPO `scale_rewards` group / none       | `norm_adv_by_std_in_grpo` True / False                            |
| `advantage_epsilon`                     | `epsilon` of the estimator (verl's default is 1e-6, TRL's 1e-4)   |
| `loss_type` grpo                        | `loss_agg_mode` seq-mean-token-mean, global_batch_size = B        |
| bnpo / dapo / cispo                     | token-mean, batch_num_tokens = None / num_items_in_batch          |
| dr_grpo                                 | seq-mean-token-sum-norm, global_batch_size = B, loss_scale_factor = L |
| token / sequence ratios                 | policy loss `vanilla` / `gspo`; `cispo` -> `cispo`                |
| `epsilon`, `epsilon_high`               | `clip_ratio_low`, `clip_ratio_high` (cispo: 1 and cap - 1: upper-only) |
| `delta` (two-sided clip)                | `clip_ratio_c` (dual clip; the same for delta > 1 + eps_high); none -> inf |
| `beta` (k3 in the loss)                 | `use_kl_loss`, `kl_loss_coef`, `kl_loss_type` low_var_kl          |
| mismatch weight ρ^IS (spec/grpo.md §2.5) | `rollout_is_weights` of the policy loss, [B, T] (sequence modes broadcast) |
| PPO `kl_estimator` k1 / k3              | `kl_penalty` kl / low_var_kl, `kl_ctrl` fixed at `kl_coef`        |
| PPO `dual_clip` c / none                | `clip_ratio_c` c / inf (verl's default 3 is always on)            |

global_batch_size = B and batch_num_tokens are what verl's trainer passes (`global_batch_info`: the mini-batch
size, trainer/ppo/v1/trainer_base.py; the global token count, workers/utils/losses.py). Run in float32, the
dtype of verl's log-probs; `--dtype float64` shows the differences below float32's resolution.
"""
from __future__ import annotations

import math

import numpy as np

from ..targets import Call, Output

NAN_REWARDS = "verl has no unscorable-reward convention (reward managers return floats; a NaN propagates)"


def _actor_config(call: Call, **fields):
    from verl.workers.config import ActorConfig

    batch = call.mask.shape[0]
    return ActorConfig(strategy="fsdp", rollout_n=call.num_generations, ppo_mini_batch_size=batch,
                       ppo_micro_batch_size_per_gpu=batch, **fields)


def _outcome_rewards(call: Call, scores):
    """[B, T] token-level rewards with the sequence score on the first column: verl's outcome estimators read only
    their sum over T (core_algos: `scores = token_level_rewards.sum(dim=-1)`)."""
    import torch

    rewards = torch.zeros_like(call.mask)
    rewards[:, 0] = scores
    return rewards


def _group_index(call: Call) -> np.ndarray:
    """verl's `index` (the prompt uid of each row): contiguous groups of G."""
    return np.arange(call.mask.shape[0]) // call.num_generations


class GRPO:
    """compute_grpo_outcome_advantage, then the actor loss of workers/utils/losses.py `ppo_loss`: the policy loss
    (get_policy_loss_fn) + kl_loss_coef · agg_loss(kl_penalty(logp, ref, low_var_kl))."""

    name = "verl-grpo"
    algos = ("grpo",)
    default_target = "verl.trainer.ppo.core_algos"
    dtype = "float32"
    covers = ("advantages (compute_grpo_outcome_advantage), loss and gradients (policy loss vanilla / gspo / cispo "
              "+ agg_loss + k3 KL loss) from the naive log-probs, metric clip_ratio/region_mean (pg_clipfrac)")

    def supports(self, case) -> str | None:
        config = case.config
        if config.scale_rewards == "batch":
            return "no batch-std scaling: verl's GRPO divides by the group std or nothing (norm_adv_by_std_in_grpo)"
        if config.std_ddof != 1:
            return "verl's group std is torch.std (ddof 1)"
        if case.edge == "nan_rewards":
            return NAN_REWARDS
        if config.importance_sampling_level == "sequence" and config.loss_type == "cispo":
            return "verl's cispo loss has token ratios only"
        if config.importance_sampling_level == "sequence" and config.delta is not None:
            return "verl's gspo loss has no dual clip (delta)"
        if config.delta is not None and config.delta <= 1 + config.clip_high:
            return "delta <= 1 + epsilon_high acts on positive advantages too; verl's dual clip does not"
        correction = case.options.get("correction")
        if config.importance_sampling_level == "sequence" and correction and correction[0].startswith("token"):
            return ("verl's gspo loss is GSPO-token (each token's gradient weighted by its own rollout_is_weights); "
                    "with token-level mismatch weights GSPO's gradient shares the row's summed weight")
        return None

    def __call__(self, core_algos, call: Call) -> Output:
        import torch

        config, data = call.config, call.data
        batch = call.mask.shape[0]
        index, rewards = _group_index(call), _outcome_rewards(call, data["rewards"])
        estimate = lambda mask: core_algos.compute_grpo_outcome_advantage(  # noqa: E731
            rewards, mask, index, epsilon=config.advantage_epsilon,
            norm_adv_by_std_in_grpo=config.scale_rewards == "group")[0]
        token_advantages = estimate(call.mask)  # [B, T], zero on padding: what the loss reads
        advantages = estimate(torch.ones_like(call.mask))[:, 0]  # [B]: the same scores, no padding

        cispo = config.loss_type == "cispo"
        mode, batch_info = {
            "grpo": ("seq-mean-token-mean", {"global_batch_size": batch}),
            "bnpo": ("token-mean", {}),
            "dapo": ("token-mean", {"batch_num_tokens": data.get("num_items_in_batch")}),
            "cispo": ("token-mean", {"batch_num_tokens": data.get("num_items_in_batch")}),
            "dr_grpo": ("seq-mean-token-sum-norm", {"global_batch_size": batch,
                                                    "loss_scale_factor": config.max_completion_length}),
        }[config.loss_type]
        actor = _actor_config(
            call, clip_ratio=config.epsilon,
            clip_ratio_low=1.0 if cispo else config.epsilon,  # cispo: lower bound 1 - 1 = 0, an upper-only cap
            clip_ratio_high=config.clip_high - 1.0 if cispo else config.clip_high,
            clip_ratio_c=math.inf if config.delta is None else config.delta, loss_agg_mode=mode,
            use_kl_loss=config.beta != 0, kl_loss_coef=config.beta, kl_loss_type="low_var_kl")
        actor.global_batch_info.update({"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None,
                                        "loss_scale_factor": None, **batch_info})
        loss_mode = "cispo" if cispo else ("gspo" if config.importance_sampling_level == "sequence" else "vanilla")
        response_mask = call.mask > 0
        old_logp = data["old_logp"] if "old_logp" in data else call.logp.detach()
        ratio = call.prepared.get("importance_sampling_ratio")
        loss, pg_metrics = core_algos.get_policy_loss_fn(loss_mode)(
            old_log_prob=old_logp, log_prob=call.logp, advantages=token_advantages, response_mask=response_mask,
            loss_agg_mode=mode, config=actor,
            rollout_is_weights=None if ratio is None else ratio.expand_as(call.mask))
        if actor.use_kl_loss:
            kld = core_algos.kl_penalty(logprob=call.logp, ref_logprob=data["ref_logp"], kl_penalty=actor.kl_loss_type)
            loss = loss + core_algos.agg_loss(loss_mat=kld, loss_mask=response_mask, loss_agg_mode=mode,
                                              **actor.global_batch_info) * actor.kl_loss_coef
        # verl's pg_clipfrac counts tokens whose clipped branch is the larger loss: aha's clip_ratio/region_mean.
        # Its cispo pg_clipfrac counts every capped token whatever the advantage's sign: not mapped.
        metrics = {} if cispo else {"clip_ratio/region_mean": pg_metrics["actor/pg_clipfrac"]}
        return Output(loss=loss, metrics=metrics, outputs={"advantages": advantages})


class RLOO:
    """compute_rloo_outcome_advantage on the score minus the k1 KL penalty in the reward (ray_trainer.py
    `apply_kl_penalty`: token_level_scores - beta · kl_penalty(old_log_prob, ref_log_prob) · response_mask).
    Advantages only: verl trains RLOO advantages with its token-level PPO loss, not TRL's sequence-ratio loss."""

    name = "verl-rloo"
    algos = ("rloo",)
    default_target = "verl.trainer.ppo.core_algos"
    dtype = "float32"
    covers = ("advantages (compute_rloo_outcome_advantage, KL penalty in the reward as apply_kl_penalty); the "
              "loss is not compared: verl has no sequence-ratio RLOO loss")

    def supports(self, case) -> str | None:
        config = case.config
        if config.normalize_advantages:
            return "verl's RLOO estimator does not normalize advantages"
        if config.reward_clip_range is not None:
            return "verl has no reward clip range"
        if case.edge == "nan_rewards":
            return NAN_REWARDS
        return None

    def __call__(self, core_algos, call: Call) -> Output:
        import torch

        config, data = call.config, call.data
        rewards = _outcome_rewards(call, data["rewards"])
        if config.kl_in == "reward" and config.beta != 0:
            kld = core_algos.kl_penalty(data["rollout_logp"], data["ref_logp"], kl_penalty="kl") * call.mask
            rewards = rewards - config.beta * kld
        advantages = core_algos.compute_rloo_outcome_advantage(rewards, torch.ones_like(call.mask),
                                                               _group_index(call))[0][:, 0]
        return Output(outputs={"advantages": advantages})


class PPO:
    """The score on the last response token minus the KL penalty (apply_kl_penalty), compute_gae_advantage_return,
    then the actor's `vanilla` policy loss and the critic's compute_value_loss, both token-mean:
    loss = pg_loss + vf_coef · vf_loss (verl computes the two in separate workers)."""

    name = "verl-ppo"
    algos = ("ppo",)
    default_target = "verl.trainer.ppo.core_algos"
    dtype = "float32"
    covers = ("advantages and returns (compute_gae_advantage_return), loss = pg_loss + vf_coef · vf_loss and its "
              "gradients (hidden states, LM head, value predictions), metrics pg_loss, vf_loss, clipfrac, "
              "vf_clipfrac")

    def supports(self, case) -> str | None:
        config = case.config
        if config.reward_position != "last_token":
            return ("verl puts the score on the last response token (workers/reward_manager/naive.py); "
                    "TRL's first padding position has no verl equivalent")
        if not config.whiten_advantages:
            return "compute_gae_advantage_return always whitens the advantages"
        if config.whiten_rewards or config.whiten_ddof != 1 or config.whiten_eps != 1e-8:
            return "verl's whitening is fixed: Bessel variance + 1e-8, advantages only"
        return None

    def __call__(self, core_algos, call: Call) -> Output:
        import torch

        config, data = call.config, call.data
        mask, response_mask = call.mask, call.mask > 0
        last = (mask * torch.arange(mask.shape[1])).argmax(-1)  # rows are right-padded
        scores = torch.zeros_like(mask)
        scores[torch.arange(mask.shape[0]), last] = data["scores"] * response_mask.any(-1)
        kl_penalty = {"k1": "kl", "k3": "low_var_kl"}[config.kl_estimator]
        kld = core_algos.kl_penalty(data["old_logp"], data["ref_logp"], kl_penalty=kl_penalty) * mask
        old_values = data["old_values"] * mask  # verl's critic has values on response tokens only (padding reads 0)
        advantages, returns = core_algos.compute_gae_advantage_return(
            scores - config.kl_coef * kld, old_values, mask, gamma=config.gamma, lam=config.lam)
        actor = _actor_config(call, clip_ratio=config.cliprange, clip_ratio_low=config.cliprange,
                              clip_ratio_high=config.cliprange,
                              clip_ratio_c=math.inf if config.dual_clip is None else config.dual_clip,
                              loss_agg_mode="token-mean")
        actor.global_batch_info.update({"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None,
                                        "loss_scale_factor": None})
        pg_loss, pg_metrics = core_algos.get_policy_loss_fn("vanilla")(
            old_log_prob=data["old_logp"], log_prob=call.logp, advantages=advantages, response_mask=response_mask,
            loss_agg_mode="token-mean", config=actor)
        vf_loss, vf_clipfrac = core_algos.compute_value_loss(
            vpreds=call.params["values"], returns=returns, values=old_values, response_mask=response_mask,
            cliprange_value=config.cliprange_value, loss_agg_mode="token-mean")
        metrics = {"pg_loss": pg_loss, "vf_loss": vf_loss, "clipfrac": pg_metrics["actor/pg_clipfrac"],
                   "vf_clipfrac": vf_clipfrac}
        # Padding positions are unused by every loss; verl leaves whitened values there, the spec zeros them.
        outputs = {"advantages": advantages * mask, "returns": returns}
        return Output(loss=pg_loss + config.vf_coef * vf_loss, metrics=metrics, outputs=outputs)

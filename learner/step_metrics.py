"""What a RecPO step hands from scoring to its metrics: the scored chains (``Scored``) and the step's
``StepMetrics`` on one rank (``step_metrics``). Pure bookkeeping, no collectives; imports torch only (and the
project's own contracts)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from learner.item_term import score_std_mean
from r2ec.algo.recpo import RewardOutput
from r2ec.protocol import StepMetrics, TrainShard


@dataclass
class Scored:
    """Step 2 of a RecPO step on one rank: the rewards and advantages of its chains (N = U users x G)."""

    reward: RewardOutput  # per chain: rewards (N,), r_d (N,), r_c (N,), rank (N,)
    rewards: torch.Tensor  # (N,) float32 on CPU
    scores: torch.Tensor  # (N, V) the item scores the rewards came from
    adv: torch.Tensor  # (U, G) group-relative advantages
    relabel: torch.Tensor  # (U, G) bool: the chains the item term trains on
    table: torch.Tensor  # (V, d) the table they were scored against (before this step's row writes)
    history_rep: torch.Tensor  # (N, H) long: each chain's user history, -1 padded
    target_rep: torch.Tensor  # (N,) long: each chain's target item


def step_metrics(shard: TrainShard, scored: Scored, ups: list[dict], h_T_learner: torch.Tensor,
                 old_logp: torch.Tensor | None, table_cos: float, t_reward: float, t_old: float, kl: bool
                 ) -> StepMetrics:
    """The step's metrics on this rank (``StepMetrics``: each field says how it combines over ranks) from the
    scored chains, the per-update figures ``ups`` (one dict per mini-batch update) and the step's timers; ``kl``:
    the token term had a KL penalty."""
    rollout, M, N = shard.rollout, len(ups), len(shard.rollout)
    local_tokens = rollout.num_sampled_tokens
    logp_abs_diff = sum(u["logp_abs_diff"] for u in ups)
    if old_logp is not None:  # measured once, in the pass that computed pi_old
        logp_abs_diff += float(((old_logp - rollout.logp.float()).abs() * rollout.logp_mask).sum())
    t_token, t_item, t_opt = (sum(u[k] for u in ups) for k in ("t_token", "t_item", "t_opt"))
    t_train = t_old + t_token + t_item + t_opt
    reward, rewards = scored.reward, scored.rewards
    optional = {}
    if kl:  # this rank's share of the step's token-mean KL, like loss_token
        optional["loss_kl"] = sum(u["loss_kl"] for u in ups) / M
    if "grad_norm_token" in ups[0]:  # measurable at ZeRO-0 with one rank only (_grads_snapshot)
        for key in ("grad_norm_token", "grad_norm_item"):
            optional[key] = sum(u[key] for u in ups) / M
    return StepMetrics(
        loss_token=sum(u["loss_token"] for u in ups) / M,
        loss_item=sum(u["loss_item"] for u in ups) / M,
        reward_mean=float(rewards.mean()),
        reward_std=float(rewards.std()) if N > 1 else 0.0,
        r_d_mean=float(reward.r_d.mean()),
        r_c_mean=float(reward.r_c.mean()),
        target_rank_mean=float(reward.rank.double().mean()),
        adv_abs_mean=float(scored.adv.abs().mean()),
        clip_frac=sum(u["clipped"] for u in ups) / max(local_tokens, 1),
        grad_norm=sum(u["grad_norm"] for u in ups) / M,
        diag_table_cos_mean=table_cos,
        diag_score_std=score_std_mean(scored.scores),
        chain_len_mean=sum(len(c) for c in rollout.chain_ids) / N,
        num_tokens=float(local_tokens),
        tokens_forward_learner=float(sum(u["tokens_forward"] for u in ups)),
        offpolicy_ratio_mean=sum(u["op_ratio_sum"] for u in ups) / max(sum(u["op_tokens"] for u in ups), 1),
        offpolicy_corrected_frac=sum(u["op_corrected"] for u in ups) / max(sum(u["op_tokens"] for u in ups), 1),
        offpolicy_log_ratio_abs_max=max(u["op_log_ratio_max"] for u in ups),
        item_candidates=sum(u["candidates"] for u in ups) / M,
        alarm_h_T_max_diff=float((h_T_learner - rollout.h_T.float()).abs().max()),
        alarm_logp_abs_diff_mean=logp_abs_diff / max(local_tokens, 1),
        time_reward_s=t_reward,
        time_old_logp_s=t_old,
        time_token_s=t_token,
        time_item_s=t_item,
        time_optimizer_s=t_opt,
        time_train_s=t_train,
        tokens_per_s_learner=local_tokens / max(t_train, 1e-9),
        **optional,
    )

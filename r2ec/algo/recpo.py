"""RecPO: the RL objective of R2ec (arXiv 2505.16994), as pure tensor functions.

One LLM writes a reasoning chain about a user; the final hidden state h of the chain scores every
catalogue item by cosine similarity / tau.  Per user, G chains are sampled, and the paper's RecPO
objective is built from:

1. Fused reward.  Scores s_i over the full catalogue (history masked to -inf) give the target's rank
   and a softmax probability.  The discrete part is R_d = NDCG@k_r of the target (1/log2(rank+1) if
   rank <= k_r, else 0); the continuous part is R_c = softmax(s_i)[target].  The reward is
   R = beta * R_c + (1 - beta) * R_d.
2. Group-relative advantages.  Within each user's group of G chains the reward is normalised:
   GRPO, A_i = (R_i - mean_G R) / std_G R; or leave-one-out, A_i = R_i - mean_{j != i} R_j.
3. Reasoning (token) term.  A PPO-style clipped surrogate on the chain's reasoning tokens,
   -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) with rho = pi / pi_old per token.
4. Item (recommendation) term.  For the best chain(s) of each group (i* = argmax_i A_i; the official
   launch script keeps the top 2) the target is "relabelled" as a positive, and the advantage-weighted
   in-batch softmax loss -A_i * log p(target | h_i) over the batch's target items is added.

All normalisers (number of trained tokens, number of chains) are arguments: pass the global value over
all data-parallel shards and micro-batches, and the per-shard losses sum to the global loss.

Deviations from the paper / official code
-----------------------------------------
* ``item_loss`` is written as -A * log p.  The official code writes -A * p / sg(p), clipped to
  [1 - eps_low, 1 + eps_high]; for the single on-policy step the ratio is exactly 1, so the loss value
  differs but the gradient is identical (-A * grad log p).
* ``rloo_advantages`` is true leave-one-out, A_i = R_i - mean_{j != i} R_j = G / (G - 1) (R_i - mean_G).
  The official code's "leave-one-out" option computes R_i (1 + 1/G) - mean_G, which is not RLOO; we do
  not reproduce it.
* ``grpo_advantages`` raises for G == 1 (the unbiased std is undefined) instead of returning NaN.
* ``kl_penalty`` (k3 estimator against a reference policy) is not in the paper; it is optional and off
  by default (the caller adds kl_coef * kl).
* Rewards and similarity scores are computed in at least float32 even when the model runs in bf16.
* Like the official code, duplicate targets in a batch stay separate in-batch candidates (``labels``
  index chains' targets, not unique items); the caller decides the candidate set h_items.
* ``catalogue_item_loss`` is not in the paper or the official code: the item term's softmax over the whole
  catalogue (the cached table, history masked as in evaluation).
"""

from dataclasses import dataclass
from typing import Literal

import torch

from r2ec.algo.metrics import mask_history, ndcg_at_k, target_rank

Normaliser = int | float | torch.Tensor | None


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # Softmax / normalisation over large catalogues loses too much precision in half / bf16.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _resolve_normaliser(default_count: torch.Tensor, normaliser: Normaliser) -> torch.Tensor | float:
    """Global normaliser if given, else the local count (at least 1 so empty batches give 0, not NaN)."""
    if normaliser is None:
        return default_count.clamp(min=1)
    if not isinstance(normaliser, torch.Tensor) and normaliser <= 0:
        raise ValueError(f"normaliser must be positive, got {normaliser}")
    return normaliser


def centred_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows minus their mean row: (N, d) -> (N, d). ``model.center_items`` (not in the paper): cosine scores against
    a nearly collinear zero-shot table then rank by what sets the items apart (docs/results.md)."""
    return x - x.mean(dim=0)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows L2-normalised (eps 1e-8), in at least float32: (N, d) -> (N, d).

    Normalise a fixed item table once with this and pass ``items_unit=True`` to ``cosine_scores``: at inference
    the table does not change between calls, and re-normalising it costs a full pass over V x d floats plus a
    V x d temporary per call, more than the matmul itself for one user (docs/performance.md, section 2)."""
    return torch.nn.functional.normalize(_upcast(x), dim=-1, eps=1e-8)


def cosine_scores(h_user: torch.Tensor, h_items: torch.Tensor, tau: float, items_unit: bool = False) -> torch.Tensor:
    """cos(h_user, h_items) / tau, L2-normalising both sides (eps 1e-8), in at least float32.

    Args:
        h_user: (N, d) float, final hidden states of the chains (or user encodings).
        h_items: (M, d) float, item encodings; with ``items_unit`` already unit rows (``unit_rows``).
        tau: temperature (> 0).
        items_unit: skip normalising ``h_items`` (the caller did it once).

    Returns:
        (N, M) float32 (float64 if the inputs are float64).
    """
    # 1/tau scales the N user rows rather than the (N, M) result: one pass over N x d instead of N x M.
    u = unit_rows(h_user) / tau
    v = _upcast(h_items) if items_unit else unit_rows(h_items)
    return u @ v.T


@dataclass
class RewardOutput:
    rewards: torch.Tensor  # (N,) beta * r_c + (1 - beta) * r_d
    r_d: torch.Tensor  # (N,) NDCG@k_r of the target
    r_c: torch.Tensor  # (N,) softmax probability of the target
    rank: torch.Tensor  # (N,) long, 1-based rank of the target


@torch.no_grad()
def fused_reward(
    item_scores: torch.Tensor,
    target_idx: torch.Tensor,
    beta: float = 0.05,
    k_r: int = 1000,
) -> RewardOutput:
    """RecPO fused reward R = beta * R_c + (1 - beta) * R_d (no gradient: rewards are constants).

    Args:
        item_scores: (N, V) float, already history-masked (-inf) and already divided by tau.
        target_idx: (N,) long, catalogue index of each chain's target.
        beta: weight of the continuous (softmax) part.
        k_r: cut-off of the discrete NDCG part.

    Returns:
        RewardOutput with (N,) fields in float32 (float64 if item_scores is float64).
    """
    rank = target_rank(item_scores, target_idx)  # also rejects NaN and masked targets
    scores = _upcast(item_scores)
    r_d = ndcg_at_k(rank, k_r).to(scores.dtype)
    # -inf (masked) entries get probability exactly 0 in the full-catalogue softmax.
    r_c = torch.softmax(scores, dim=-1).gather(1, target_idx.unsqueeze(-1)).squeeze(-1)
    rewards = beta * r_c + (1.0 - beta) * r_d
    return RewardOutput(rewards=rewards, r_d=r_d, r_c=r_c, rank=rank)


def _check_groups(rewards: torch.Tensor, what: str) -> int:
    if rewards.dim() != 2:
        raise ValueError(f"{what} expects rewards of shape (num_groups, G), got {tuple(rewards.shape)}")
    group_size = rewards.shape[-1]
    if group_size < 2:
        raise ValueError(
            f"{what} needs G >= 2 chains per group (got G={group_size}): with one chain the "
            "group baseline / std is undefined"
        )
    return group_size


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """GRPO: A = (R - mean_G R) / (std_G R + eps), unbiased std over the group.

    rewards: (B, G) float.  Returns (B, G).  Raises ValueError if G < 2.
    """
    _check_groups(rewards, "grpo_advantages")
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True)  # correction=1 (unbiased), as in GRPO
    return (rewards - mean) / (std + eps)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """True leave-one-out: A_i = R_i - mean_{j != i} R_j = G / (G - 1) * (R_i - mean_G R).

    rewards: (B, G) float.  Returns (B, G).  Raises ValueError if G < 2.
    (Not the official code's R_i (1 + 1/G) - mean_G; see the module docstring.)
    """
    group_size = _check_groups(rewards, "rloo_advantages")
    mean = rewards.mean(dim=-1, keepdim=True)
    return group_size / (group_size - 1) * (rewards - mean)


def compute_advantages(
    rewards: torch.Tensor, kind: Literal["grpo", "rloo"], eps: float = 1e-8
) -> torch.Tensor:
    """Dispatch on ``kind``.  rewards: (B, G) float.  Returns (B, G)."""
    if kind == "grpo":
        return grpo_advantages(rewards, eps=eps)
    if kind == "rloo":
        return rloo_advantages(rewards)
    raise ValueError(f"unknown advantage kind {kind!r}; expected 'grpo' or 'rloo'")


def relabel_mask(adv: torch.Tensor, topk: int) -> torch.Tensor:
    """True for the top-``topk`` chains of each group by advantage (ties: lower chain index first).

    topk = 1 is the paper's i* = argmax_i A_i; the official launch script uses 2.  topk is clipped to G.

    Args:
        adv: (B, G) float.
        topk: number of chains per group to relabel (>= 0).

    Returns:
        (B, G) bool.
    """
    if adv.dim() != 2:
        raise ValueError(f"relabel_mask expects adv of shape (num_groups, G), got {tuple(adv.shape)}")
    if topk < 0:
        raise ValueError(f"topk must be >= 0, got {topk}")
    if torch.isnan(adv).any():
        raise ValueError("adv contains NaN; cannot pick the best chains")
    k = min(topk, adv.shape[-1])
    # Stable descending sort keeps the original (chain index) order among equal advantages.
    order = torch.sort(adv, dim=-1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(adv, dtype=torch.bool)
    return mask.scatter(1, order, True)


@dataclass
class TokenLossOutput:
    loss: torch.Tensor  # scalar, this shard's share of the global token-mean loss
    clip_frac: torch.Tensor  # scalar (no grad), share of masked tokens where the clipped branch is active


def token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    num_tokens: Normaliser = None,
    weights: torch.Tensor | None = None,
) -> TokenLossOutput:
    """Clipped surrogate on the reasoning tokens, token-mean over the global number of trained tokens.

    per-token loss = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A), rho = exp(logp - old_logp);
    loss = sum(mask * weights * per-token loss) / num_tokens.

    Args:
        logp: (N, T) float, log pi(token) under the current policy (with grad).
        old_logp: (N, T) float, log pi_old(token) from the sampling policy (no grad needed).
        adv: (N,) float, one advantage per chain (treated as a constant).
        mask: (N, T) bool or float, 1 on the reasoning tokens that are trained on.
        eps_low, eps_high: clip range (asymmetric, "clip-higher").
        num_tokens: global number of masked tokens across all shards / micro-batches; default the local
            ``mask.sum()``.  With the global value the per-shard losses sum to the global loss.
        weights: (N, T) per-token multipliers, treated as constants (an off-policy correction,
            ``r2ec.algo.off_policy``); default 1.  The normaliser stays ``num_tokens``.

    Returns:
        TokenLossOutput(loss, clip_frac), both scalars over the same normaliser.

    Masked-out positions contribute exactly 0 to value and gradient even if logp there is -inf / NaN.
    """
    keep = mask.bool()
    logp = _upcast(logp)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # torch.where (not multiplication) so -inf / NaN at padding never reaches exp or the gradient.
    log_ratio = torch.where(keep, logp - _upcast(old_logp).detach(), zero)
    ratio = torch.exp(log_ratio)
    a = adv.detach().to(logp.dtype).unsqueeze(-1)  # (N, 1)
    unclipped = ratio * a
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * a
    per_token = -torch.minimum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights.detach().to(per_token.dtype)
    per_token = torch.where(keep, per_token, zero)
    denom = _resolve_normaliser(keep.sum(), num_tokens)
    loss = per_token.sum() / denom
    # Clipped branch active <=> it is strictly the smaller one <=> this token's gradient is zero.
    clip_active = keep & (clipped < unclipped)
    clip_frac = (clip_active.sum().to(logp.dtype) / denom).detach()
    return TokenLossOutput(loss=loss, clip_frac=clip_frac)


def kl_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    num_tokens: Normaliser = None,
) -> torch.Tensor:
    """k3 KL estimator exp(ref - logp) - (ref - logp) - 1, token-mean over the global normaliser.

    Not in the paper; optional (the caller adds kl_coef * kl, off by default).

    Args:
        logp: (N, T) float, current policy log-probs (with grad).
        ref_logp: (N, T) float, reference policy log-probs (no grad).
        mask: (N, T) bool or float, 1 on trained tokens.
        num_tokens: global number of masked tokens; default the local ``mask.sum()``.

    Returns:
        scalar.
    """
    keep = mask.bool()
    logp = _upcast(logp)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    delta = torch.where(keep, _upcast(ref_logp).detach() - logp, zero)
    k3 = torch.where(keep, torch.exp(delta) - delta - 1.0, zero)
    return k3.sum() / _resolve_normaliser(keep.sum(), num_tokens)


def _weighted_nll(logits: torch.Tensor, labels: torch.Tensor, adv: torch.Tensor, relabel: torch.Tensor,
                  num_chains: Normaliser) -> torch.Tensor:
    """-sum_i relabel_i * A_i * log_softmax(logits_i)[labels_i] / num_chains; logits (N, M), the rest (N,)."""
    log_p = torch.log_softmax(logits, dim=-1).gather(1, labels.unsqueeze(-1)).squeeze(-1)  # (N,)
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    # Zero the weight itself with where (not the product): a non-relabelled chain's advantage may be
    # anything (even NaN) and must not leak into the loss or, via 0 * NaN, into the gradient.
    weight = torch.where(relabel.bool(), adv.detach().to(log_p.dtype), zero)
    per_chain = -weight * log_p
    count = torch.tensor(logits.shape[0], device=log_p.device, dtype=log_p.dtype)
    return per_chain.sum() / _resolve_normaliser(count, num_chains)


def item_loss(
    h_user: torch.Tensor,
    h_items: torch.Tensor,
    labels: torch.Tensor,
    adv: torch.Tensor,
    relabel: torch.Tensor,
    tau: float = 0.02,
    num_chains: Normaliser = None,
) -> torch.Tensor:
    """Advantage-weighted in-batch softmax item term of RecPO.

    logits = cos(h_user, h_items) / tau; log p_i = log_softmax(logits_i)[labels_i];
    loss = -sum_i relabel_i * A_i * log p_i / num_chains.

    The official code writes the term as -A * p / sg(p) clipped to [1 - eps_low, 1 + eps_high]; for the
    single on-policy step the ratio is 1, so the value differs but the gradient equals -A * grad log p,
    which is what this log form gives.  Duplicate targets stay separate candidates (as in the official
    code): ``labels`` index rows of ``h_items``, whatever the caller put there.

    Args:
        h_user: (N, d) float, final hidden states of the chains (with grad).
        h_items: (M, d) float, encodings of the batch's target items (with grad; recomputed by the caller).
        labels: (N,) long, index into the M candidates of each chain's own target.
        adv: (N,) float, advantages (treated as constants).
        relabel: (N,) bool, chains whose target is relabelled as a positive (``relabel_mask(...).flatten()``).
        tau: temperature.
        num_chains: GLOBAL number of chains in the optimisation batch (all chains, relabelled or not, as
            the official code averages over the batch); default N.

    Returns:
        scalar.
    """
    return _weighted_nll(cosine_scores(h_user, h_items, tau), labels, adv, relabel, num_chains)


def catalogue_item_loss(
    h_user: torch.Tensor,
    candidates: torch.Tensor,
    target_idx: torch.Tensor,
    history_idx: torch.Tensor,
    adv: torch.Tensor,
    relabel: torch.Tensor,
    tau: float = 0.02,
    num_chains: Normaliser = None,
) -> torch.Tensor:
    """The item term with the whole catalogue as negatives (not in the paper; ``item_negatives: catalogue``).

    logits = cos(h_user, candidates) / tau with each user's history masked to -inf (never the target), exactly the
    scores the full-ranking evaluation ranks; loss = -sum_i relabel_i * A_i * log_softmax(logits_i)[target_i] /
    num_chains. With V candidates every chain gets V - 1 - |history| negatives instead of the batch's few.

    Args:
        h_user: (N, d) float, final hidden states (with grad).
        candidates: (V, d) float, the catalogue's encodings (the learner passes its cached table, detached).
        target_idx: (N,) long, catalogue index of each chain's target.
        history_idx: (N, H) long, the users' earlier items, -1 padded.
        adv, relabel, tau, num_chains: as in ``item_loss``.

    Returns:
        scalar.
    """
    logits = mask_history(cosine_scores(h_user, candidates, tau), history_idx, target_idx)
    return _weighted_nll(logits, target_idx, adv, relabel, num_chains)


__all__ = [
    "RewardOutput",
    "TokenLossOutput",
    "compute_advantages",
    "catalogue_item_loss",
    "cosine_scores",
    "fused_reward",
    "grpo_advantages",
    "item_loss",
    "kl_penalty",
    "relabel_mask",
    "rloo_advantages",
    "token_loss",
    "unit_rows",
]

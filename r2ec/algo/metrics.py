"""Full-ranking evaluation metrics for a single held-out target item per sample.

R2ec (arXiv 2505.16994, "RecPO") evaluates the recommender by ranking the target item against the
whole catalogue: the user's history items are removed from the candidate list (their scores are set
to -inf), the target's 1-based rank r is computed, and

* Hit@k  = 1 if r <= k else 0,
* NDCG@k = 1 / log2(r + 1) if r <= k else 0 (one relevant item, so the ideal DCG is 1).

The same rank feeds the discrete part of the RecPO reward (NDCG@k_r, see ``recpo.fused_reward``).

Ties are broken deterministically and pessimistically for later catalogue indices: an item outranks
the target if its score is strictly higher, or equal with a smaller catalogue index.  ``topk_items``
uses the same order, so ``topk_items`` and ``target_rank`` always agree.

Deviations from the paper / official code
-----------------------------------------
* ``mask_history`` never masks the target itself, even when it also occurs in the history (repeat
  consumption).  Masking it would make the target unrankable (rank undefined / reward 0 regardless of
  the model); we keep it as a candidate instead.  This is a deliberate choice, not from the paper.
* Tie-breaking is explicit (by catalogue index) rather than whatever order ``torch.topk`` returns, so
  metrics are reproducible across devices and batch sizes.
* NaN scores raise ``ValueError`` instead of silently producing an arbitrary rank.
"""

from collections.abc import Iterable, Sequence

import torch

Number = int | float


def _check_no_nan(item_scores: torch.Tensor) -> None:
    # A NaN compares False with everything, so it would silently count as "lower" and hide a bug upstream.
    if torch.isnan(item_scores).any():
        bad_rows = torch.isnan(item_scores).any(dim=-1).nonzero().flatten().tolist()
        raise ValueError(f"item_scores contains NaN in rows {bad_rows[:10]} (showing at most 10)")


def mask_history(
    item_scores: torch.Tensor,
    history_idx: torch.Tensor,
    target_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return a copy of ``item_scores`` with the user's history items set to -inf.

    Args:
        item_scores: (N, V) float, scores over the full catalogue.
        history_idx: (N, H) long, catalogue indices of history items, right-padded with -1 (ignored).
        target_idx: (N,) long or None.  If given, the target is never masked, even if it appears in the
            history: with repeat consumption masking it would make the target unrankable.

    Returns:
        (N, V) tensor of the same dtype as ``item_scores``.
    """
    masked = item_scores.clone()
    keep = history_idx >= 0
    if target_idx is not None:
        keep = keep & (history_idx != target_idx.unsqueeze(-1))
    rows = torch.arange(item_scores.shape[0], device=item_scores.device).unsqueeze(-1)
    rows = rows.expand_as(history_idx)
    masked[rows[keep], history_idx[keep]] = float("-inf")
    return masked


def target_rank(item_scores: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
    """1-based rank of each sample's target among all catalogue items.

    rank = 1 + #(items with a strictly higher score) + #(items with an equal score and a smaller
    catalogue index).  -inf items (masked history) simply rank below everything finite.

    Args:
        item_scores: (N, V) float.
        target_idx: (N,) long, catalogue index of the target.

    Returns:
        (N,) long.

    Raises:
        ValueError: if any score is NaN, or a target's own score is -inf (masked: it has no rank).
    """
    _check_no_nan(item_scores)
    target_score = item_scores.gather(1, target_idx.unsqueeze(-1))  # (N, 1)
    if torch.isneginf(target_score).any():
        bad_rows = torch.isneginf(target_score).flatten().nonzero().flatten().tolist()
        raise ValueError(f"target score is -inf (masked) in rows {bad_rows[:10]}; it cannot be ranked")
    higher = (item_scores > target_score).sum(dim=-1)
    index = torch.arange(item_scores.shape[-1], device=item_scores.device)
    tied_before = ((item_scores == target_score) & (index < target_idx.unsqueeze(-1))).sum(dim=-1)
    return 1 + higher + tied_before


def hit_at_k(rank: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample Hit@k.  rank: (N,) long, 1-based.  Returns (N,) float64 (exact sums over big eval sets)."""
    return (rank <= k).to(torch.float64)


def ndcg_at_k(rank: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample NDCG@k with one relevant item: 1/log2(rank+1) if rank <= k else 0.

    rank: (N,) long, 1-based.  Returns (N,) float64.
    """
    gain = 1.0 / torch.log2(rank.to(torch.float64) + 1.0)
    return torch.where(rank <= k, gain, torch.zeros_like(gain))


def metric_names(ks: Iterable[int]) -> list[str]:
    """``hit@K``, ``ndcg@K`` for each K, in that order: the metric keys every evaluation reports."""
    return [f"{m}@{k}" for k in ks for m in ("hit", "ndcg")]


def is_point_metric(key: str) -> bool:
    """``hit@K`` / ``ndcg@K`` keys of an evaluation result, not their ``_ci95`` intervals or other fields."""
    return key.startswith(("hit@", "ndcg@")) and not key.endswith("_ci95")


def per_sample_metrics(rank: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """(N, M) float64: each sample's value of each named metric (``hit@K`` / ``ndcg@K``).  rank: (N,) long."""
    fns = {"hit": hit_at_k, "ndcg": ndcg_at_k}
    return torch.stack([fns[n.split("@")[0]](rank, int(n.split("@")[1])) for n in names], dim=1)


class RankingAccumulator:
    """Streams Hit@k / NDCG@k over batches of ranks; sums are kept in float64.

    Usage: ``acc = RankingAccumulator((5, 10)); acc.add(rank_batch); ...; acc.compute()``.
    ``merge`` combines accumulators (e.g. after gathering the per-shard states).
    """

    def __init__(self, ks: Sequence[int] = (5, 10, 20)):
        self.ks = tuple(int(k) for k in ks)
        self.hit_sums = [0.0] * len(self.ks)
        self.ndcg_sums = [0.0] * len(self.ks)
        self.num_samples = 0

    def add(self, rank: torch.Tensor) -> None:
        """rank: (N,) long, 1-based ranks of one batch."""
        rank = rank.flatten()
        for j, k in enumerate(self.ks):
            self.hit_sums[j] += hit_at_k(rank, k).sum().item()
            self.ndcg_sums[j] += ndcg_at_k(rank, k).sum().item()
        self.num_samples += rank.numel()

    def merge(self, other: "RankingAccumulator") -> None:
        if other.ks != self.ks:
            raise ValueError(f"cannot merge accumulators with different ks: {self.ks} vs {other.ks}")
        self.hit_sums = [a + b for a, b in zip(self.hit_sums, other.hit_sums, strict=True)]
        self.ndcg_sums = [a + b for a, b in zip(self.ndcg_sums, other.ndcg_sums, strict=True)]
        self.num_samples += other.num_samples

    def compute(self) -> dict[str, Number]:
        """Means over all samples seen: keys hit@k, ndcg@k for each k, plus num_samples (int)."""
        if self.num_samples == 0:
            raise ValueError("RankingAccumulator.compute() called before any sample was added")
        out: dict[str, Number] = {}
        for j, k in enumerate(self.ks):
            out[f"hit@{k}"] = self.hit_sums[j] / self.num_samples
            out[f"ndcg@{k}"] = self.ndcg_sums[j] / self.num_samples
        out["num_samples"] = self.num_samples
        return out


def ranking_metrics(rank: torch.Tensor, ks: Iterable[int] = (5, 10, 20)) -> dict[str, Number]:
    """Mean Hit@k / NDCG@k over samples.  rank: (N,) long, 1-based.

    Returns a dict with keys ``hit@k``, ``ndcg@k`` (floats) for every k, and ``num_samples`` (int).
    """
    acc = RankingAccumulator(tuple(ks))
    acc.add(rank)
    return acc.compute()


def topk_items(item_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best items per row, best first; equal scores: smaller catalogue index first.

    Consistent with ``target_rank``: item ``topk_items(s, V)[n, r - 1]`` has rank r.  ``torch.topk`` gives no order
    among ties, and a full stable sort of the catalogue costs O(V log V) per row (at 1M items x 64 users it took 100x
    longer than ``torch.topk``; bench/rec_head_scoring.py).  So: ``torch.topk`` finds the k-th best score; every item
    above it is in, and the items equal to it are taken in catalogue order until there are k; then only those k are
    sorted (stable, so equal scores keep catalogue order).

    Args:
        item_scores: (N, V) float.
        k: number of items, 1 <= k <= V.

    Returns:
        (N, k) long.
    """
    num_items = item_scores.shape[-1]
    if not 1 <= k <= num_items:
        raise ValueError(f"k must be in [1, {num_items}], got {k}")
    _check_no_nan(item_scores)
    top = torch.topk(item_scores, k, dim=-1)
    kth = top.values[:, -1:]  # (N, 1) the k-th best score of each row
    if bool(((item_scores >= kth).sum(dim=-1) == k).all()):  # no tie crosses the boundary: topk's set is the set
        idx = top.indices.sort(dim=-1).values  # (N, k) ascending catalogue index
    else:
        above = item_scores > kth  # (N, V) fewer than k per row
        tied = item_scores == kth  # (N, V) at least one per row
        need = k - above.sum(dim=-1, keepdim=True)  # (N, 1) tied items still needed, >= 1
        chosen = above | (tied & (tied.cumsum(dim=-1) <= need))  # (N, V) exactly k per row
        idx = chosen.nonzero()[:, 1].view(-1, k)  # (N, k) ascending catalogue index within each row
    order = torch.sort(item_scores.gather(-1, idx), dim=-1, descending=True, stable=True).indices
    return idx.gather(-1, order)


__all__ = [
    "RankingAccumulator",
    "hit_at_k",
    "is_point_metric",
    "mask_history",
    "metric_names",
    "ndcg_at_k",
    "per_sample_metrics",
    "ranking_metrics",
    "target_rank",
    "topk_items",
]

"""Tests for r2ec.algo.metrics: hand-derived values, shard/stream == global, loop == vectorised."""

import math

import pytest
import torch

from r2ec.algo.metrics import (
    RankingAccumulator,
    hit_at_k,
    mask_history,
    ndcg_at_k,
    ranking_metrics,
    target_rank,
    topk_items,
)

NEG_INF = float("-inf")


# ---------------------------------------------------------------- python-loop references


def ref_rank(row: list[float], target: int) -> int:
    t = row[target]
    return 1 + sum(1 for j, s in enumerate(row) if s > t or (s == t and j < target))


def ref_topk(row: list[float], k: int) -> list[int]:
    return sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]


def ref_ndcg(rank: int, k: int) -> float:
    return 1.0 / math.log2(rank + 1) if rank <= k else 0.0


def random_tied_scores(seed: int, n: int = 16, v: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer-valued scores (many ties), some entries masked to -inf but never the target."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (n, v), generator=g).float()
    target = torch.randint(0, v, (n,), generator=g)
    drop = torch.rand(n, v, generator=g) < 0.2
    drop[torch.arange(n), target] = False
    return scores.masked_fill(drop, NEG_INF), target


# ---------------------------------------------------------------- mask_history


def test_mask_history_hand_example():
    scores = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    history = torch.tensor([[0, 2, -1], [4, 4, 1]])  # -1 is padding; duplicates are fine
    out = mask_history(scores, history)
    assert out[0].tolist() == [NEG_INF, 1.0, NEG_INF, 3.0, 4.0]
    assert out[1].tolist() == [5.0, NEG_INF, 7.0, 8.0, NEG_INF]
    # the input is not modified
    assert torch.equal(scores, torch.arange(10, dtype=torch.float32).reshape(2, 5))


def test_mask_history_never_masks_the_target():
    scores = torch.zeros(2, 5)
    history = torch.tensor([[0, 3, -1], [4, 1, 1]])
    target = torch.tensor([3, 1])  # both targets also occur in the history (repeat consumption)
    out = mask_history(scores, history, target)
    assert out[0].tolist() == [NEG_INF, 0.0, 0.0, 0.0, 0.0]
    assert out[1].tolist() == [0.0, 0.0, 0.0, 0.0, NEG_INF]
    assert torch.isfinite(out[torch.arange(2), target]).all()
    target_rank(out, target)  # rankable: does not raise


def test_mask_history_loop_equals_vectorised():
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        scores = torch.randn(8, 30, generator=g)
        history = torch.randint(-1, 30, (8, 12), generator=g)
        target = torch.randint(0, 30, (8,), generator=g)
        out = mask_history(scores, history, target)
        for n in range(8):
            banned = {h for h in history[n].tolist() if h >= 0 and h != target[n].item()}
            for j in range(30):
                expected = NEG_INF if j in banned else scores[n, j].item()
                assert out[n, j].item() == expected


# ---------------------------------------------------------------- target_rank


def test_target_rank_hand_example():
    # scores [2, 1, 1]: item 0 is strictly higher than items 1 and 2; items 1 and 2 tie and the
    # smaller catalogue index wins, so target 2 has rank 1 + 1 (higher) + 1 (tie, index 1 < 2) = 3.
    scores = torch.tensor([[2.0, 1.0, 1.0]] * 3)
    assert target_rank(scores, torch.tensor([0, 1, 2])).tolist() == [1, 2, 3]
    # -inf entries count as lower: [-inf, 0.5, 0.7] target 1 -> only item 2 is higher -> rank 2
    assert target_rank(torch.tensor([[NEG_INF, 0.5, 0.7]]), torch.tensor([1])).tolist() == [2]


def test_target_rank_errors():
    with pytest.raises(ValueError, match="NaN"):
        target_rank(torch.tensor([[1.0, float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="-inf"):
        target_rank(torch.tensor([[1.0, NEG_INF, 0.0]]), torch.tensor([1]))


def test_target_rank_loop_equals_vectorised_with_ties():
    for seed in range(5):
        scores, target = random_tied_scores(seed)
        got = target_rank(scores, target)
        assert got.dtype == torch.long
        expected = [ref_rank(scores[n].tolist(), target[n].item()) for n in range(scores.shape[0])]
        assert got.tolist() == expected


def test_target_rank_sharded_equals_global():
    scores, target = random_tied_scores(7, n=20)
    parts = [target_rank(scores[a:b], target[a:b]) for a, b in [(0, 6), (6, 7), (7, 20)]]
    assert torch.equal(torch.cat(parts), target_rank(scores, target))


# ---------------------------------------------------------------- topk_items


def test_topk_items_hand_example():
    # [2, 1, 1, 3]: 3 (item 3) > 2 (item 0) > 1 (items 1, 2; smaller index first)
    scores = torch.tensor([[2.0, 1.0, 1.0, 3.0], [NEG_INF, 0.0, 0.0, 0.0]])
    assert topk_items(scores, 4).tolist() == [[3, 0, 1, 2], [1, 2, 3, 0]]
    assert topk_items(scores, 2).tolist() == [[3, 0], [1, 2]]


def test_topk_items_loop_equals_vectorised_and_agrees_with_rank():
    for seed in range(5):
        scores, target = random_tied_scores(seed)
        v = scores.shape[1]
        for k in (1, 5, v):
            got = topk_items(scores, k)
            assert got.tolist() == [ref_topk(row, k) for row in scores.tolist()]
        # the item at position r - 1 of the full order is the item of rank r
        full = topk_items(scores, v)
        pos = (full == target.unsqueeze(-1)).nonzero()[:, 1]
        assert torch.equal(pos + 1, target_rank(scores, target))


def test_topk_items_errors():
    with pytest.raises(ValueError):
        topk_items(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="NaN"):
        topk_items(torch.tensor([[0.0, float("nan")]]), 1)


# ---------------------------------------------------------------- hit / ndcg / ranking_metrics


RANKS = torch.tensor([1, 3, 11, 30])


def test_hit_ndcg_hand_values():
    assert hit_at_k(RANKS, 5).tolist() == [1.0, 1.0, 0.0, 0.0]
    # 1/log2(2) = 1, 1/log2(4) = 0.5, beyond k -> 0
    assert ndcg_at_k(RANKS, 5).tolist() == [1.0, 0.5, 0.0, 0.0]
    assert ndcg_at_k(RANKS, 11)[2].item() == pytest.approx(1 / math.log2(12))


def test_ranking_metrics_hand_values():
    m = ranking_metrics(RANKS)
    assert list(m) == ["hit@5", "ndcg@5", "hit@10", "ndcg@10", "hit@20", "ndcg@20", "num_samples"]
    assert m["hit@5"] == pytest.approx(0.5)
    assert m["ndcg@5"] == pytest.approx((1 + 0.5) / 4)
    assert m["hit@10"] == pytest.approx(0.5)
    assert m["ndcg@10"] == pytest.approx((1 + 0.5) / 4)
    assert m["hit@20"] == pytest.approx(0.75)
    assert m["ndcg@20"] == pytest.approx((1 + 0.5 + 1 / math.log2(12)) / 4)
    assert m["num_samples"] == 4 and isinstance(m["num_samples"], int)
    m30 = ranking_metrics(RANKS, ks=(30,))
    assert m30["hit@30"] == pytest.approx(1.0)
    assert m30["ndcg@30"] == pytest.approx((1 + 0.5 + 1 / math.log2(12) + 1 / math.log2(31)) / 4)


def test_hit_ndcg_loop_equals_vectorised():
    g = torch.Generator().manual_seed(0)
    rank = torch.randint(1, 60, (200,), generator=g)
    for k in (1, 5, 10, 20, 50):
        assert hit_at_k(rank, k).tolist() == [1.0 if r <= k else 0.0 for r in rank.tolist()]
        ref = [ref_ndcg(r, k) for r in rank.tolist()]
        assert ndcg_at_k(rank, k).tolist() == pytest.approx(ref, abs=1e-12)
        m = ranking_metrics(rank, ks=(k,))
        assert m[f"ndcg@{k}"] == pytest.approx(sum(ref) / len(ref), abs=1e-12)


def test_accumulator_streamed_and_merged_equals_global():
    g = torch.Generator().manual_seed(1)
    rank = torch.randint(1, 40, (101,), generator=g)
    expected = ranking_metrics(rank, ks=(1, 5, 20))

    acc = RankingAccumulator(ks=(1, 5, 20))
    for chunk in rank.split(17):
        acc.add(chunk)
    streamed = acc.compute()

    shard_a, shard_b = RankingAccumulator((1, 5, 20)), RankingAccumulator((1, 5, 20))
    shard_a.add(rank[:40])
    shard_b.add(rank[40:])
    shard_a.merge(shard_b)
    merged = shard_a.compute()

    for got in (streamed, merged):
        assert got.keys() == expected.keys()
        assert got["num_samples"] == 101
        for key in expected:
            assert got[key] == pytest.approx(expected[key], abs=1e-12)


def test_accumulator_errors():
    with pytest.raises(ValueError):
        RankingAccumulator().compute()
    with pytest.raises(ValueError):
        RankingAccumulator((5,)).merge(RankingAccumulator((10,)))


def test_topk_items_ties_across_the_boundary_and_inside_it():
    # row 0: the boundary (k=3) cuts through four items scoring 1 -> the smallest indices win;
    # row 1: no tie crosses the boundary (fast path), but two tied items inside the top 3 keep catalogue order.
    scores = torch.tensor([[1.0, 5.0, 1.0, 1.0, 0.0, 1.0],
                           [0.0, 2.0, 3.0, 2.0, 1.0, 0.5]])
    assert topk_items(scores, 3).tolist() == [[1, 0, 2], [2, 1, 3]]
    big = torch.randn(3, 5000)
    assert torch.equal(topk_items(big, 50), torch.sort(big, dim=-1, descending=True, stable=True).indices[:, :50])

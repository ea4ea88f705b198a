"""The leak probe (study/leak_probe.py): its id-order rebuild reproduces an item-id tie-break, and its next-ids
scorer ranks the following catalogue ids first. docs/results.md's "what the leak was worth" rests on both."""

import torch

from r2ec.algo.metrics import target_rank
from r2ec.data.samples import build_samples
from r2ec.data.schema import Interaction, Item, SourceTables
from study.leak_probe import id_order, next_ids_scorer

SCALE = (1.0, 5.0)


def _tables(rows: list[tuple[str, str, int]]) -> SourceTables:
    inter = [Interaction(u, i, float(t), 4.0, n + 2) for n, (u, i, t) in enumerate(rows)]
    items = [Item(i, f"title {i}", None, None, None, [], n + 2) for n, i in enumerate(sorted({r[1] for r in rows}))]
    return SourceTables("files", inter, items, "inter.csv", "items.csv")


def _sequences(built) -> dict[str, list[str]]:
    ids = built.items["item_id"]
    return {u: [ids[i] for i in idx]
            for u, idx in zip(built.user_sequences["user_id"], built.user_sequences["item_idx"], strict=True)}


ROWS = [("v", "d", 5), ("u", "c", 1), ("u", "a", 1), ("v", "b", 5), ("u", "b", 1), ("u", "e", 2), ("v", "a", 3)]


def test_id_order_reproduces_an_item_id_tie_break():
    as_filed = _sequences(build_samples(_tables(ROWS), 20, 0.5, 0.2, SCALE))
    assert as_filed == {"u": ["c", "a", "b", "e"], "v": ["a", "d", "b"]}  # ties in file order
    by_id = build_samples(id_order(_tables(ROWS)), 20, 0.5, 0.2, SCALE)
    assert _sequences(by_id) == {"u": ["a", "b", "c", "e"], "v": ["a", "b", "d"]}
    # globally: (timestamp, user_id, item_id), the old rule
    ids = by_id.items["item_id"]
    order = [(u, ids[t]) for split in ("train", "valid", "test")
             for u, t in zip(by_id.splits[split]["user_id"], by_id.splits[split]["target_item_idx"], strict=True)]
    assert order == [("u", "b"), ("u", "c"), ("u", "e"), ("v", "b"), ("v", "d")]


def test_next_ids_scorer_ranks_the_following_ids_first_then_popularity():
    pop = torch.tensor([9.0, 1.0, 0.0, 0.0, 5.0, 3.0, 0.0, 0.0])
    score = next_ids_scorer(pop)
    rows = [{"history_item_idx": [0, 1]}, {"history_item_idx": [6]}]
    earlier = torch.tensor([[0, 1], [6, -1]])
    target = torch.tensor([2, 0])
    scores, _ = score(rows, earlier, target)
    # user 0: last item 1 -> ids 2, 3, 4, ... first (nearest first); earlier items 0 and 1 masked
    assert target_rank(scores, torch.tensor([2, 0])).tolist()[0] == 1
    assert scores[0, 2] > scores[0, 3] > scores[0, 4] > scores[0, 7] and torch.isinf(scores[0, :2]).all()
    # user 1: last item 6 -> only id 7 follows; then popularity (item 0 first, 6 masked)
    assert target_rank(scores, torch.tensor([7, 0])).tolist()[1] == 2

"""Next-item samples and the global chronological train / valid / test split (the paper's protocol).

1. The catalogue is checked (item ids unique) and sorted by ``item_id`` (string order); an item's position in
   that order is its ``item_idx``. Every catalogue item is kept, also those no interaction mentions, because
   ranking is over the whole catalogue; their number is reported.
2. Every interaction must name a catalogue item (else :class:`DataError`), every rating and every catalogue
   ``average_rating`` must lie inside the rating scale the user prompt states (``data.prompt.rating_scale``;
   else :class:`DataError`), and exact duplicate interaction rows (same user, item, timestamp and rating) are
   dropped and counted.
3. Order rule. Each user's interactions are ordered by ``(timestamp, row)``, ``row`` being the interaction's
   row in the input file: equal timestamps keep the file's row order. Every interaction after the first is a
   sample whose history is the up to ``max_history`` preceding items, oldest first. Users with a single
   interaction give no sample (counted).
4. All samples are sorted by ``(target timestamp, target row)`` and cut into train / valid / test:
   ``n_train = floor(n * train_frac)``, ``n_valid = floor(n * valid_frac)``, the rest is test. Rows are unique
   within the one interactions file, so this order is total and the split is deterministic.

Ties are never broken by item id (nor by user id): under an id tie-break, a target that shares its timestamp
with the previous item always has a larger id than it, which a model, or a "rank the ids right after the last
history item" heuristic, can exploit without learning anything about the user. On MovieLens-100k 52% of test
targets share their timestamp with the previous item, and that heuristic (the 20 following ids first, then
popularity) scores test NDCG@10 .0387 under an id tie-break against .0173 without, popularity .0308
(``python -m study.leak_probe``, docs/results.md). The input row order carries no such signal (unless the file
itself was sorted by id, which is then the data's own order).

Deviations from the official code (YRYangang/RRec, preprocess.py):

* Within a user the order is the official one (a stable sort on the timestamp keeps the input order of ties).
  Globally the official code stable-sorts on the target timestamp alone, so equal timestamps stay in the order
  it built the samples (users in order of first appearance, then position); we take the target row's position
  in the file, which interleaves users whose ties interleave in the file. Both come from the file, never ids.
* The official code cuts at ``int(n * 0.8)`` and ``int(n * 0.9)``; we use ``floor(n * valid_frac)`` for the
  valid size, so for n = 7 the split is 5 / 0 / 2 here and 5 / 1 / 1 there (at most one sample moves between
  valid and test). The products are computed exactly on the fractions as written in decimal (``0.29 * 100`` is
  29, where binary floating point gives 28.999...).
* The official code keeps exact duplicate rows; we drop them (and count them).
* The official code does not check ratings against the scale its prompt states ("out of 5").
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from r2ec.data import io
from r2ec.data.errors import DataError
from r2ec.data.schema import Dropped, Interaction, Item, SourceTables

SPLITS = ("train", "valid", "test")
# The order rule in one line, for the prepared summary (and so for `r2ec prepare`'s output).
ORDER_RULE = (
    "each user's interactions by (timestamp, input row); samples by (target timestamp, target input row); "
    "ties keep the input file's row order, never item ids"
)
# (timestamp, item_idx, rating, row) of one interaction in a user's time-ordered sequence; ``row`` is its row in
# the interactions file, kept only to order the samples (it is not a sample column).
Event = tuple[float, int, float | None, int]


@dataclass
class BuiltData:
    """Column dicts (name -> list) of the catalogue, the three splits and the user sequences, plus counts."""

    items: dict[str, list[Any]]
    splits: dict[str, dict[str, list[Any]]]
    user_sequences: dict[str, list[Any]]
    stats: dict[str, Any]  # users, items, items_without_interactions, interactions, samples, dropped, order_rule


def samples_sha256(sample_ids: Sequence[int], user_ids: Sequence[str], target_item_ids: Sequence[str]) -> str:
    """A fingerprint of a set of samples (order-free): equal exactly when the same (sample_id, user_id, target
    item_id) triples are in it. Used for evaluated subsets and for the train split a checkpoint continues."""
    triples = sorted(zip(sample_ids, user_ids, target_item_ids, strict=True))
    return hashlib.sha256(json.dumps(triples).encode()).hexdigest()


def split_sizes(n: int, train_frac: float, valid_frac: float) -> tuple[int, int, int]:
    """``(floor(n * train_frac), floor(n * valid_frac), rest)``, computed exactly on the decimal fractions."""
    n_train = math.floor(n * Fraction(repr(train_frac)))
    n_valid = math.floor(n * Fraction(repr(valid_frac)))
    return n_train, n_valid, n - n_train - n_valid


def build_samples(
    tables: SourceTables,
    max_history: int,
    train_frac: float,
    valid_frac: float,
    rating_scale: tuple[float, float],
) -> BuiltData:
    """Turn validated generic tables into the catalogue, the chronological splits and the user sequences.

    ``rating_scale`` is ``[min, max]`` of ``data.prompt.rating_scale``: the user prompt states the max, so a
    rating or average_rating outside the scale is a :class:`DataError` rather than a prompt that misleads.
    """
    catalogue = sorted_catalogue(tables)
    index = {item.item_id: i for i, item in enumerate(catalogue)}
    check_known_items(tables, index)
    check_rating_scale(tables, rating_scale)
    interactions, n_duplicates = drop_duplicate_rows(tables.interactions)
    dropped = list(tables.dropped)
    if n_duplicates:
        dropped.append(
            Dropped(
                n_duplicates,
                "interactions",
                "exact duplicate interaction rows (same user, item, timestamp and rating)",
            )
        )
    sequences = user_sequences(interactions, index)
    singles = sum(1 for events in sequences.values() if len(events) < 2)
    if singles:
        reason = "users with a single interaction give no sample (nothing precedes the target)"
        dropped.append(Dropped(singles, "users", reason))
    samples = make_samples(sequences, max_history)
    if not samples:
        raise DataError(tables.interactions_file, "no samples: every user has a single interaction")
    splits = _split(samples, train_frac, valid_frac)
    used = {event[1] for events in sequences.values() for event in events}
    stats = {
        "users": len(sequences),
        "items": len(catalogue),
        "items_without_interactions": len(catalogue) - len(used),
        "interactions": len(interactions),
        "samples": {name: len(splits[name]["sample_id"]) for name in SPLITS},
        "dropped": [d.as_dict() for d in dropped],
        "order_rule": ORDER_RULE,
    }
    return BuiltData(_item_columns(catalogue), splits, _sequence_columns(sequences), stats)


def sorted_catalogue(tables: SourceTables) -> list[Item]:
    """The catalogue sorted by item_id; a repeated item_id is a :class:`DataError` naming both rows."""
    first_row: dict[str, int] = {}
    for item in tables.items:
        if item.item_id in first_row:
            path = tables.items_file
            first = io.location(path, first_row[item.item_id])
            raise DataError(
                path,
                f"duplicate item_id {item.item_id!r} (first seen on {first})",
                io.location(path, item.row),
            )
        first_row[item.item_id] = item.row
    if not tables.items:
        raise DataError(tables.items_file, "the catalogue is empty")
    return sorted(tables.items, key=lambda item: item.item_id)


def check_known_items(tables: SourceTables, index: dict[str, int]) -> None:
    """Every interaction must name a catalogue item; the error names the first unknown one and the count."""
    unknown = [x for x in tables.interactions if x.item_id not in index]
    if unknown:
        first, path = unknown[0], tables.interactions_file
        raise DataError(
            path,
            f"unknown item_id {first.item_id!r} (not in the catalogue {tables.items_file}); "
            f"{len(unknown)} interaction row(s) in total have unknown item ids",
            io.location(path, first.row),
        )


def check_rating_scale(tables: SourceTables, scale: tuple[float, float]) -> None:
    """Every interaction rating and catalogue average_rating must lie in ``[min, max]`` (absent ones are fine).

    The error names the first offending row of the file and how many rows in total are outside the scale, so a
    file on another scale (0-10, 0.5-5 stars) is reported once, not row by row.
    """
    low, high = scale
    checks = [
        (tables.interactions_file, "rating", [(x.row, x.rating) for x in tables.interactions]),
        (tables.items_file, "average_rating", [(i.row, i.average_rating) for i in tables.items]),
    ]
    for path, name, values in checks:
        bad = sorted((row, v) for row, v in values if v is not None and not low <= v <= high)
        if bad:
            row, value = bad[0]
            raise DataError(
                path,
                f"{name} {_num(value)} is outside data.prompt.rating_scale [{_num(low)}, {_num(high)}] "
                f"({len(bad)} row(s) in total); set data.prompt.rating_scale to the file's scale",
                io.location(path, row),
            )


def _num(x: float) -> str:
    """A number as short as it reads exactly: 7.0 -> '7', 0.5 -> '0.5', 5.0000001 stays (never rounded to 5)."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def drop_duplicate_rows(interactions: list[Interaction]) -> tuple[list[Interaction], int]:
    """Keep the first of each group of exact duplicate rows; returns the kept rows and the number dropped."""
    seen: set[tuple[str, str, float, float | None]] = set()
    kept = []
    for x in interactions:
        key = (x.user_id, x.item_id, x.timestamp, x.rating)
        if key not in seen:
            seen.add(key)
            kept.append(x)
    return kept, len(interactions) - len(kept)


def user_sequences(interactions: list[Interaction], index: dict[str, int]) -> dict[str, list[Event]]:
    """user_id -> events ordered by (timestamp, row); users in user_id order (only the table's order)."""
    by_user: dict[str, list[Interaction]] = defaultdict(list)
    for x in interactions:
        by_user[x.user_id].append(x)
    sequences = {}
    for user in sorted(by_user):
        # The row, not the item id, breaks timestamp ties (see the module doc). It is explicit rather than left
        # to the sort's stability so that an adapter handing rows over in another order (Amazon's window
        # re-sorts them) cannot change the result.
        events = sorted(by_user[user], key=lambda x: (x.timestamp, x.row))
        sequences[user] = [(x.timestamp, index[x.item_id], x.rating, x.row) for x in events]
    return sequences


def make_samples(sequences: dict[str, list[Event]], max_history: int) -> list[dict]:
    """One sample per (user, position >= 1), globally sorted by (target timestamp, target row)."""
    samples = []
    for user, events in sequences.items():
        for position in range(1, len(events)):
            history = events[max(0, position - max_history) : position]
            ts, idx, rating, row = events[position]
            samples.append(
                {
                    "user_id": user,
                    "position": position,
                    "history_item_idx": [e[1] for e in history],
                    "history_ratings": [e[2] for e in history],
                    "history_timestamps": [e[0] for e in history],
                    "target_item_idx": idx,
                    "target_rating": rating,
                    "target_timestamp": ts,
                    "_row": row,  # the sort key only; not in SAMPLE_COLUMNS, so not saved
                }
            )
    samples.sort(key=lambda s: (s["target_timestamp"], s["_row"]))
    for i, sample in enumerate(samples):
        sample["sample_id"] = i
    return samples


SAMPLE_COLUMNS = (
    "sample_id",
    "user_id",
    "position",
    "history_item_idx",
    "history_ratings",
    "history_timestamps",
    "target_item_idx",
    "target_rating",
    "target_timestamp",
)


def _split(samples: list[dict], train_frac: float, valid_frac: float) -> dict[str, dict[str, list[Any]]]:
    n_train, n_valid, _ = split_sizes(len(samples), train_frac, valid_frac)
    bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, None)}
    return {
        name: {col: [s[col] for s in samples[lo:hi]] for col in SAMPLE_COLUMNS}
        for name, (lo, hi) in bounds.items()
    }


def _item_columns(catalogue: list[Item]) -> dict[str, list[Any]]:
    return {
        "item_idx": list(range(len(catalogue))),
        "item_id": [i.item_id for i in catalogue],
        "title": [i.title for i in catalogue],
        "description": [i.description for i in catalogue],
        "average_rating": [i.average_rating for i in catalogue],
        "rating_number": [i.rating_number for i in catalogue],
        "categories": [i.categories for i in catalogue],
    }


def _sequence_columns(sequences: dict[str, list[Event]]) -> dict[str, list[Any]]:
    return {
        "user_id": list(sequences),
        "item_idx": [[e[1] for e in events] for events in sequences.values()],
        "timestamps": [[e[0] for e in events] for events in sequences.values()],
        "ratings": [[e[2] for e in events] for events in sequences.values()],
    }

"""Tests of the generic readers, bad-input errors, sample building and splitting, MovieLens, the cache."""

from __future__ import annotations

import csv
import gzip
import json
import math
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import r2ec.data.prepare as prepare_module
from r2ec.config import DataConfig, FilesConfig
from r2ec.data import DataError, format_summary, prepare_data
from r2ec.data.io import iter_rows
from r2ec.data.movielens import load_movielens
from r2ec.data.samples import SAMPLE_COLUMNS, build_samples, split_sizes
from r2ec.data.schema import Interaction, Item, SourceTables, load_files, read_catalogue, read_interactions

PROMPT = {"category": "movies", "item_singular": "movie", "history_items": 2}
SCALE = (1.0, 5.0)  # the default data.prompt.rating_scale

INTERACTIONS = [
    {"user_id": "007", "item_id": "a", "timestamp": 10, "rating": 4.5},
    {"user_id": "007", "item_id": "b", "timestamp": 20, "rating": None},
    {"user_id": "u2", "item_id": "a", "timestamp": 30, "rating": 3.0},
]
ITEMS = [
    {
        "item_id": "a",
        "title": "Alpha",
        "description": ["First part.", "Second part."],
        "average_rating": 4.1,
        "rating_number": 12,
        "categories": ["Drama", "Crime"],
    },
    {
        "item_id": "b",
        "title": "Beta",
        "description": None,
        "average_rating": None,
        "rating_number": None,
        "categories": [],
    },
]


# -------------------------------------------------------------------------------------------------- writers
def _csv_value(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return "|".join(v) if v and "." not in v[0] else " ".join(v)
    return str(v)


def write_table(path: Path, rows: list[dict]) -> Path:
    """Write rows as CSV / JSONL / Parquet (optionally .gz) according to the file name."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(".parquet"):
        table = pa.Table.from_pylist(rows)
        if path.name.endswith(".gz"):
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf)
            path.write_bytes(gzip.compress(buf.getvalue().to_pybytes()))
        else:
            pq.write_table(table, path)
        return path
    if name.endswith(".csv"):
        lines = [",".join(rows[0])] + [",".join(_csv_value(v) for v in r.values()) for r in rows]
        text = "\n".join(lines) + "\n"
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_text(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def data_cfg(interactions: Path, items: Path, max_history: int = 5, **prompt: object) -> DataConfig:
    return DataConfig(
        source="files",
        files=FilesConfig(interactions=str(interactions), items=str(items)),
        max_history=max_history,
        prompt={**PROMPT, "history_items": min(2, max_history), **prompt},
    )


def tables(interactions: list[tuple], items: list[str] | None = None) -> SourceTables:
    """In-memory tables: interactions as (user, item, timestamp[, rating])."""
    rows = [
        Interaction(u, i, float(t), r[0] if r else None, n + 2)
        for n, (u, i, t, *r) in enumerate(interactions)
    ]
    ids = items if items is not None else sorted({x.item_id for x in rows})
    cat = [Item(i, f"title {i}", None, None, None, [], n + 2) for n, i in enumerate(ids)]
    return SourceTables("files", rows, cat, "inter.csv", "items.csv")


# -------------------------------------------------------------------------------------------------- readers
FORMATS = ["csv", "csv.gz", "jsonl", "jsonl.gz", "json", "parquet", "parquet.gz"]


@pytest.mark.parametrize("ext", FORMATS)
def test_readers_give_identical_tables(tmp_path: Path, ext: str) -> None:
    inter = read_interactions(str(write_table(tmp_path / f"inter.{ext}", INTERACTIONS)))
    items = read_catalogue(str(write_table(tmp_path / f"items.{ext}", ITEMS)))
    assert [x[:4] for x in inter] == [
        ("007", "a", 10.0, 4.5),
        ("007", "b", 20.0, None),
        ("u2", "a", 30.0, 3.0),
    ]
    assert [x[:6] for x in items] == [
        ("a", "Alpha", "First part. Second part.", 4.1, 12, ["Drama", "Crime"]),
        ("b", "Beta", None, None, None, []),
    ]


def test_row_numbers_are_lines_or_rows(tmp_path: Path) -> None:
    assert [n for n, _ in iter_rows(write_table(tmp_path / "x.csv", INTERACTIONS))] == [2, 3, 4]
    assert [n for n, _ in iter_rows(write_table(tmp_path / "x.jsonl", INTERACTIONS))] == [1, 2, 3]
    assert [n for n, _ in iter_rows(write_table(tmp_path / "x.parquet", INTERACTIONS))] == [1, 2, 3]


def test_ids_are_strings(tmp_path: Path) -> None:
    csv_rows = read_interactions(
        str(write_text(tmp_path / "i.csv", "user_id,item_id,timestamp\n007,0042,1\n"))
    )
    assert csv_rows[0][:2] == ("007", "0042")
    json_rows = read_interactions(
        str(write_text(tmp_path / "i.jsonl", '{"user_id": 7, "item_id": 42, "timestamp": 1}\n'))
    )
    assert json_rows[0][:2] == ("7", "42")


def test_timestamps_iso_and_milliseconds(tmp_path: Path) -> None:
    path = write_text(
        tmp_path / "i.csv",
        "user_id,item_id,timestamp\nu,a,2023-01-02T03:04:05Z\nu,b,2023-01-02T03:04:05\nu,c,1672628645500\n",
    )
    rows = read_interactions(str(path), unit="ms")
    assert [x.timestamp for x in rows] == [1672628645.0, 1672628645.0, 1672628645.5]


def test_milliseconds_read_as_seconds_are_refused(tmp_path: Path) -> None:
    inter = write_text(tmp_path / "inter.csv", "user_id,item_id,timestamp\nu,a,1696118400\nu,b,1696118400000\n")
    items = write_text(tmp_path / "items.csv", "item_id,title\na,A\nb,B\n")
    msg = _error(prepare_data, data_cfg(inter, items), tmp_path / "cache")
    assert msg.startswith(f"{inter}, line 3: timestamp 1696118400000 read as seconds is in the year 55717; ")
    assert msg.endswith("expected a date between 1970 and 2100 (milliseconds? set data.files.timestamp_unit: ms)")
    # With the unit set as the hint says, the second row is 2023-10-01 and the first (seconds) is January 1970.
    rows = read_interactions(str(inter), unit="ms")
    assert rows[1].timestamp == 1696118400.0 and rows[0].timestamp == 1696118.4


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        ("-1", "s", "timestamp -1 read as seconds is in the year 1969; expected a date between 1970 and 2100"),
        ("4102444800", "s", "timestamp 4102444800 read as seconds is in the year 2100"),
        ("1696118400000000", "ms", "timestamp 1696118400000000 read as milliseconds is in the year 55717"),
        ("1969-12-31T23:59:59Z", "s", "timestamp '1969-12-31T23:59:59Z' is in the year 1969; expected a date"),
        ("2100-01-01", "ms", "timestamp '2100-01-01' is in the year 2100; expected a date between 1970 and 2100"),
    ],
)
def test_implausible_timestamps(tmp_path: Path, value: str, unit: str, expected: str) -> None:
    path = write_text(tmp_path / "i.csv", f"user_id,item_id,timestamp\nu,a,{value}\n")
    msg = _error(read_interactions, str(path), unit)
    assert f"i.csv, line 2: {expected}" in msg
    assert "set data.files" not in msg  # no unit would make these plausible, so no unit hint


def test_timestamp_range_bounds(tmp_path: Path) -> None:
    path = write_text(
        tmp_path / "i.csv", "user_id,item_id,timestamp\nu,a,0\nu,b,4102444799.5\nu,c,2099-12-31T23:59:59Z\n"
    )
    assert [x.timestamp for x in read_interactions(str(path))] == [0.0, 4102444799.5, 4102444799.0]


def test_extra_columns_ignored_and_quoted_csv(tmp_path: Path) -> None:
    path = write_text(tmp_path / "items.csv", 'item_id,title,extra,categories\n1,"Hello, ""World""",x,A|B\n')
    (item,) = read_catalogue(str(path))
    assert (item.title, item.categories) == ('Hello, "World"', ["A", "B"])


# ------------------------------------------------------------------------------------------------ bad input
def _error(fn, *args) -> str:  # noqa: ANN001
    with pytest.raises(DataError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg, "a DataError message is one line"
    assert isinstance(info.value, ValueError)
    return msg


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "bad.csv",
            b"user_id,item_id,timestamp\nu,a,1\nu,\xff\xfe,2\n",
            ["bad.csv, line 3:", "invalid UTF-8 byte 0xff", "byte offset 34"],
        ),
        ("empty.csv", b"", ["empty.csv:", "empty file"]),
        ("empty.jsonl", b"\n\n", ["empty.jsonl:", "empty file"]),
        ("header.csv", b"user_id,item_id,timestamp\n", ["header.csv:", "no data rows", "only a header"]),
        (
            "missing.csv",
            b"user_id,item_id\nu,a\n",
            [
                "missing.csv, line 1 (header):",
                "missing required column(s) 'timestamp'",
                "columns found: 'user_id', 'item_id'",
            ],
        ),
        (
            "missing.jsonl",
            b'{"user_id": "u", "item_id": "a", "timestamp": 1}\n{"user_id": "u", "item_id": "b"}\n',
            ["missing.jsonl, line 2:", "missing required column(s) 'timestamp'"],
        ),
        (
            "when.csv",
            b"user_id,item_id,timestamp\nu,a,1\nu,b,yesterday\n",
            ["when.csv, line 3:", "unparsable timestamp 'yesterday'"],
        ),
        (
            "rate.csv",
            b"user_id,item_id,timestamp,rating\nu,a,1,5\nu,b,2,five\n",
            ["rate.csv, line 3:", "unparsable rating 'five'"],
        ),
        (
            "bad.jsonl",
            b'{"user_id": "u", "item_id": "a", "timestamp": 1}\n{"user_id": "u",\n',
            ["bad.jsonl, line 2:", "malformed JSON"],
        ),
        ("array.json", b'[{"user_id": "u"}]\n', ["array.json, line 1:", "JSON array"]),
        (
            "fields.csv",
            b"user_id,item_id,timestamp\nu,a,1\nu,b,2,9\n",
            ["fields.csv, line 3:", "4 fields but the header has 3"],
        ),
        ("noid.csv", b"user_id,item_id,timestamp\nu,,1\n", ["noid.csv, line 2:", "missing item_id"]),
        ("data.txt", b"x\n", ["data.txt:", "unsupported file extension '.txt'"]),
    ],
)
def test_bad_interaction_files(tmp_path: Path, name: str, content: bytes, expected: list[str]) -> None:
    msg = _error(read_interactions, str(write_text(tmp_path / name, content)))
    for part in expected:
        assert part in msg, (part, msg)


def test_non_utf8_in_gzip_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv.gz"
    path.write_bytes(gzip.compress(b"user_id,item_id,timestamp\nu,\xe9,1\n"))
    msg = _error(read_interactions, str(path))
    assert "bad.csv.gz, line 2:" in msg and "decompressed" in msg


def test_parquet_errors_name_rows(tmp_path: Path) -> None:
    rows = [
        {"user_id": "u", "item_id": "a", "timestamp": 1, "rating": "4"},
        {"user_id": "u", "item_id": "b", "timestamp": 2, "rating": "five"},
    ]
    msg = _error(read_interactions, str(write_table(tmp_path / "r.parquet", rows)))
    assert "r.parquet, row 2:" in msg and "unparsable rating 'five'" in msg
    msg = _error(
        read_interactions, str(write_table(tmp_path / "m.parquet", [{"user_id": "u", "item_id": "a"}]))
    )
    assert "missing required column(s) 'timestamp'" in msg and "columns found: 'user_id', 'item_id'" in msg
    empty = pa.Table.from_pylist(
        [], schema=pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64())])
    )
    pq.write_table(empty, tmp_path / "e.parquet")
    assert "no data rows" in _error(read_interactions, str(tmp_path / "e.parquet"))


def test_missing_file(tmp_path: Path) -> None:
    assert "file not found" in _error(read_interactions, str(tmp_path / "nope.csv"))


def test_catalogue_errors(tmp_path: Path) -> None:
    items = write_text(tmp_path / "items.csv", "item_id,title\n1,One\n42,Answer\n3,Three\n42,Again\n")
    inter = write_text(tmp_path / "inter.csv", "user_id,item_id,timestamp\nu,1,1\nu,3,2\n")
    msg = _error(
        build_samples, load_files(FilesConfig(interactions=str(inter), items=str(items))), 20, 0.8, 0.1, SCALE
    )
    assert "items.csv, line 5:" in msg and "duplicate item_id '42' (first seen on line 3)" in msg
    no_title = write_text(tmp_path / "t.csv", "item_id,title\n1,One\n2,\n")
    assert "t.csv, line 3: empty title" in _error(read_catalogue, str(no_title))
    bad_num = write_text(tmp_path / "n.jsonl", '{"item_id": "1", "title": "x", "rating_number": 2.5}\n')
    assert "n.jsonl, line 1:" in _error(read_catalogue, str(bad_num))


def test_unknown_item_ids(tmp_path: Path) -> None:
    items = write_text(tmp_path / "items.csv", "item_id,title\n1,One\n2,Two\n")
    inter = write_text(
        tmp_path / "inter.csv", "user_id,item_id,timestamp\nu,1,1\nu,2,2\nu,zzz,3\nv,9,4\nv,1,5\n"
    )
    msg = _error(
        build_samples, load_files(FilesConfig(interactions=str(inter), items=str(items))), 20, 0.8, 0.1, SCALE
    )
    assert "inter.csv, line 4:" in msg
    assert "unknown item_id 'zzz'" in msg and "2 interaction row(s) in total" in msg


def test_ratings_outside_the_scale_are_refused(tmp_path: Path) -> None:
    inter = write_text(
        tmp_path / "inter.csv", "user_id,item_id,timestamp,rating\nu,a,1,5\nu,b,2,7\nv,a,3,\nv,b,4,8.5\n"
    )
    items = write_text(tmp_path / "items.jsonl", '{"item_id": "a", "title": "A"}\n{"item_id": "b", "title": "B"}\n')
    msg = _error(prepare_data, data_cfg(inter, items), tmp_path / "cache")
    assert msg == (
        f"{inter}, line 3: rating 7 is outside data.prompt.rating_scale [1, 5] (2 row(s) in total); "
        "set data.prompt.rating_scale to the file's scale"
    )
    # The file's own scale is accepted; the cache key holds the scale, so going back to [1, 5] validates again
    # instead of reusing the data prepared under [0.5, 10].
    wide = data_cfg(inter, items, rating_scale=[0.5, 10])
    assert prepare_data(wide, tmp_path / "cache", log=lambda _: None).summary["samples"]["test"] == 1
    assert "rating 7 is outside" in _error(prepare_data, data_cfg(inter, items), tmp_path / "cache")
    # a rating below the minimum
    assert "line 2: rating 0 is outside data.prompt.rating_scale [0.5, 10]" in _error(
        build_samples, tables([("u", "a", 1, 0.0), ("u", "b", 2, 3.0)]), 20, 0.8, 0.1, (0.5, 10.0)
    )


def test_average_ratings_outside_the_scale_are_refused(tmp_path: Path) -> None:
    inter = write_text(tmp_path / "inter.csv", "user_id,item_id,timestamp,rating\nu,a,1,5\nu,b,2,1\n")
    items = write_table(
        tmp_path / "items.jsonl",
        [{"item_id": "a", "title": "A", "average_rating": 4.2}, {"item_id": "b", "title": "B", "average_rating": 9}],
    )
    msg = _error(prepare_data, data_cfg(inter, items), tmp_path / "cache")
    assert msg.startswith(f"{items}, line 2: average_rating 9 is outside data.prompt.rating_scale [1, 5] ")
    assert msg.endswith("set data.prompt.rating_scale to the file's scale")
    assert prepare_data(data_cfg(inter, items, rating_scale=[0, 10]), tmp_path / "cache", log=lambda _: None)


def test_no_samples_is_an_error() -> None:
    msg = _error(build_samples, tables([("u", "a", 1), ("v", "a", 2)]), 20, 0.8, 0.1, SCALE)
    assert "no samples" in msg


# -------------------------------------------------------------------------------------------------- samples
def test_hand_made_samples() -> None:
    t = tables(
        [
            ("u1", "b", 10, 5.0),
            ("u1", "a", 10, 4.0),
            ("u1", "c", 20),
            ("u1", "d", 30, 2.0),
            ("u2", "e", 5, 1.0),
            ("u2", "a", 20, 3.0),
            ("u2", "f", 25, 4.0),
            ("u3", "a", 1, 1.0),
        ],
        items=["f", "e", "d", "c", "b", "a", "z"],
    )
    built = build_samples(t, max_history=2, train_frac=0.6, valid_frac=0.2, rating_scale=SCALE)
    assert built.items["item_id"] == ["a", "b", "c", "d", "e", "f", "z"]  # sorted by item_id -> item_idx
    rows = [
        dict(zip(split, vals, strict=True))
        for name in ("train", "valid", "test")
        for split in [built.splits[name]]
        for vals in zip(*split.values(), strict=True)
    ]
    assert all(list(split) == list(SAMPLE_COLUMNS) for split in built.splits.values())  # the row is not a column
    # global order by (target timestamp, target row): (10,row 3,u1,a) (20,row 4,u1,c) (20,row 7,u2,a)
    # (25,row 8,u2,f) (30,row 5,u1,d)
    assert [(r["user_id"], r["target_item_idx"], r["target_timestamp"]) for r in rows] == [
        ("u1", 0, 10.0),
        ("u1", 2, 20.0),
        ("u2", 0, 20.0),
        ("u2", 5, 25.0),
        ("u1", 3, 30.0),
    ]
    assert [r["sample_id"] for r in rows] == [0, 1, 2, 3, 4]
    # u1's sequence is b, a (the tie at t=10 keeps the file's row order, although a < b), c, d; max_history=2
    # cuts the oldest.
    last = rows[4]
    assert last["position"] == 3
    assert last["history_item_idx"] == [0, 2]
    assert last["history_ratings"] == [4.0, None]
    assert last["history_timestamps"] == [10.0, 20.0]
    assert last["target_rating"] == 2.0
    assert rows[0]["history_item_idx"] == [1] and rows[0]["position"] == 1
    assert rows[2]["history_item_idx"] == [4]
    assert {k: len(v["sample_id"]) for k, v in built.splits.items()} == {"train": 3, "valid": 1, "test": 1}
    seqs = dict(zip(built.user_sequences["user_id"], built.user_sequences["item_idx"], strict=True))
    assert seqs == {"u1": [1, 0, 2, 3], "u2": [4, 0, 5], "u3": [0]}
    stats = built.stats
    assert (stats["users"], stats["items"], stats["items_without_interactions"], stats["interactions"]) == (
        3,
        7,
        1,
        8,
    )
    assert {
        "count": 1,
        "what": "users",
        "reason": "users with a single interaction give no sample (nothing precedes the target)",
    } in stats["dropped"]


def _sequences(built) -> dict[str, list[str]]:  # noqa: ANN001
    """user_id -> item ids in sequence order."""
    ids = built.items["item_id"]
    seqs = built.user_sequences
    return {u: [ids[i] for i in idx] for u, idx in zip(seqs["user_id"], seqs["item_idx"], strict=True)}


def _ordered_targets(built) -> list[tuple[str, str]]:  # noqa: ANN001
    """(user_id, target item_id) of every sample, train + valid + test in sample order."""
    ids = built.items["item_id"]
    return [
        (u, ids[t])
        for name in ("train", "valid", "test")
        for u, t in zip(built.splits[name]["user_id"], built.splits[name]["target_item_idx"], strict=True)
    ]


def test_ties_keep_input_row_order_within_a_user() -> None:
    # z, a, m share t=5; an item-id tie-break would give a, m, z.
    rows = [("u", "z", 5), ("u", "a", 5), ("u", "m", 5), ("u", "b", 6)]
    assert _sequences(build_samples(tables(rows), 20, 0.8, 0.1, SCALE)) == {"u": ["z", "a", "m", "b"]}
    flipped = [rows[2], rows[1], rows[0], rows[3]]
    assert _sequences(build_samples(tables(flipped), 20, 0.8, 0.1, SCALE)) == {"u": ["m", "a", "z", "b"]}
    # The row number decides, not the list order: an adapter may hand over rows reordered (Amazon's window sorts
    # them by time), so rows listed as 4, 2, 3 must come out as 2, 3, 4.
    t = tables(rows)
    t.interactions = [t.interactions[2], t.interactions[0], t.interactions[1], t.interactions[3]]
    assert [x.row for x in t.interactions] == [4, 2, 3, 5]
    assert _sequences(build_samples(t, 20, 0.8, 0.1, SCALE)) == {"u": ["z", "a", "m", "b"]}


def test_ties_keep_input_row_order_across_users() -> None:
    rows = [
        ("zed", "x", 1),  # row 2
        ("amy", "y", 1),  # row 3
        ("zed", "q", 5),  # row 4: a target at t=5 before amy's (user_id order would put amy first)
        ("amy", "b", 5),  # row 5
        ("amy", "a", 7),  # row 6: a target at t=7 before zed's (grouping by user would put zed first)
        ("zed", "c", 7),  # row 7
    ]
    built = build_samples(tables(rows), 20, 0.5, 0.25, SCALE)
    assert _ordered_targets(built) == [("zed", "q"), ("amy", "b"), ("amy", "a"), ("zed", "c")]
    assert built.splits["test"]["user_id"] == ["zed"]  # the split follows that order: 2 / 1 / 1


def _next_id_hits(pairs: list[tuple[int, int]]) -> float:
    """Hit@1 of the catalogue-order heuristic "the next item is the id right after the last one"."""
    return sum(nxt == last + 1 for last, nxt in pairs) / len(pairs)


def _built_pairs(built) -> list[tuple[int, int]]:  # noqa: ANN001
    """(last history item_idx, target item_idx) of every sample."""
    return [
        (history[-1], target)
        for split in built.splits.values()
        for history, target in zip(split["history_item_idx"], split["target_item_idx"], strict=True)
    ]


def test_catalogue_order_heuristic_gains_nothing_from_ties(tmp_path: Path) -> None:
    # Ten users each rate a block of 6 consecutive catalogue ids in one sitting (one timestamp per user), the
    # file's rows shuffled: the situation of MovieLens, where a same-timestamp group is often a run of ids.
    block, n_users = 6, 10
    rows = [
        {"user_id": f"u{u}", "item_id": f"i{u * block + k:03d}", "timestamp": 1_000_000 + 60 * u, "rating": 4}
        for u in range(n_users)
        for k in range(block)
    ]
    random.Random(0).shuffle(rows)
    items = write_table(tmp_path / "items.csv", [{"item_id": f"i{k:03d}", "title": f"T{k}"} for k in range(60)])
    tied = load_files(FilesConfig(interactions=str(write_table(tmp_path / "tied.csv", rows)), items=str(items)))
    # The same rows, in the same file order, with distinct timestamps increasing in row order: no ties at all.
    distinct_rows = [{**r, "timestamp": 1_000_000 + n} for n, r in enumerate(rows)]
    distinct = load_files(
        FilesConfig(interactions=str(write_table(tmp_path / "distinct.csv", distinct_rows)), items=str(items))
    )
    built_tied = build_samples(tied, 20, 0.8, 0.1, SCALE)
    built_distinct = build_samples(distinct, 20, 0.8, 0.1, SCALE)
    score = _next_id_hits(_built_pairs(built_tied))
    assert len(_built_pairs(built_tied)) == n_users * (block - 1)
    # Ties give nothing: the heuristic scores exactly what it scores when no two timestamps are equal.
    assert score == _next_id_hits(_built_pairs(built_distinct))
    assert _sequences(built_tied) == _sequences(built_distinct)
    # Under an item-id tie-break (computed here, independently of the code under test) every block would come out
    # in ascending id order and the heuristic would be right every time: the test can tell the two rules apart.
    by_user: dict[str, list[tuple[int, str]]] = {}
    for r in rows:
        by_user.setdefault(r["user_id"], []).append((r["timestamp"], r["item_id"]))
    idx = {item_id: i for i, item_id in enumerate(built_tied.items["item_id"])}
    id_pairs = []
    for events in by_user.values():
        seq = [idx[item_id] for _, item_id in sorted(events)]
        id_pairs += list(zip(seq, seq[1:], strict=False))
    assert _next_id_hits(id_pairs) == 1.0
    assert score < 0.4


@pytest.mark.parametrize(
    ("n", "expected"), [(10, (8, 1, 1)), (7, (5, 0, 2)), (100, (80, 10, 10)), (1, (0, 0, 1))]
)
def test_split_sizes(n: int, expected: tuple[int, int, int]) -> None:
    assert split_sizes(n, 0.8, 0.1) == expected


def test_split_sizes_exact_decimal() -> None:
    assert math.floor(100 * 0.29) == 28  # binary floating point
    assert split_sizes(100, 0.29, 0.1) == (29, 10, 61)


@pytest.mark.parametrize(("n", "expected"), [(10, (8, 1, 1)), (7, (5, 0, 2))])
def test_split_of_built_samples(n: int, expected: tuple[int, int, int]) -> None:
    built = build_samples(tables([("u", f"i{k:02d}", k) for k in range(n + 1)]), 3, 0.8, 0.1, SCALE)
    sizes = tuple(len(built.splits[s]["sample_id"]) for s in ("train", "valid", "test"))
    assert sizes == expected
    ids = [i for s in ("train", "valid", "test") for i in built.splits[s]["sample_id"]]
    assert ids == list(range(n))
    assert built.splits["test"]["history_item_idx"][-1] == [n - 3, n - 2, n - 1]


def test_duplicate_rows_dropped_and_counted() -> None:
    rows = [
        ("u", "a", 1, 5.0),
        ("u", "a", 1, 5.0),
        ("u", "b", 2, 4.0),
        ("u", "b", 2, 3.0),  # rating differs: kept
        ("u", "c", 3),
        ("u", "c", 3),
        ("u", "c", 3),
        ("v", "a", 1),
    ]
    built = build_samples(tables(rows), 20, 0.8, 0.1, SCALE)
    dropped = {d["reason"]: d["count"] for d in built.stats["dropped"]}
    dup = dropped["exact duplicate interaction rows (same user, item, timestamp and rating)"]
    assert dup == 3
    assert built.stats["interactions"] + dup == len(rows)
    assert built.stats["interactions"] == sum(len(s) for s in built.user_sequences["item_idx"])


# ------------------------------------------------------------------------------------------------ MovieLens
ML_ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    "2\tGoldenEye\t1995\tAction Adventure Thriller\n"
    "267\tunknown\t\tunknown\n"
    '4\t"Great Day in Harlem, A"\t1994\tDocumentary\n'
)
ML_INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "196\t1\t3\t881250949\n196\t2\t4\t881250950\n196\t267\t1\t881250951\n22\t1\t5\t881250000\n"
    "22\t4\t2\t881250100\n"
)


def write_movielens(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ml-100k.item").write_text(ML_ITEM, encoding="utf-8")
    (folder / "ml-100k.inter").write_text(ML_INTER, encoding="utf-8")
    return folder


def test_movielens_adapter(tmp_path: Path) -> None:
    t = load_movielens(write_movielens(tmp_path / "ml"))
    items = {i.item_id: i for i in t.items}
    assert items["1"][:6] == (
        "1",
        "Toy Story (1995)",
        None,
        None,
        None,
        ["Animation", "Children's", "Comedy"],
    )
    assert items["267"].title == "unknown"
    assert items["4"].title == '"Great Day in Harlem, A" (1994)'
    assert t.interactions[0][:4] == ("196", "1", 881250949.0, 3.0)
    assert t.dropped == []
    built = build_samples(t, 20, 0.8, 0.1, SCALE)
    assert built.items["item_id"] == ["1", "2", "267", "4"]
    assert sum(len(s["sample_id"]) for s in built.splits.values()) == 3


def test_movielens_errors(tmp_path: Path) -> None:
    assert "MovieLens folder not found" in _error(load_movielens, tmp_path / "nothing")
    folder = write_movielens(tmp_path / "ml")
    (folder / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t3\tsoon\n", encoding="utf-8"
    )
    msg = _error(load_movielens, folder)
    assert "ml-100k.inter, line 2:" in msg and "unparsable timestamp 'soon'" in msg
    # MovieLens timestamps are always seconds: no setting to change, the hint says so.
    (folder / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t3\t881250949000\n", encoding="utf-8"
    )
    msg = _error(load_movielens, folder)
    assert "ml-100k.inter, line 2: timestamp 881250949000 read as seconds is in the year 29895" in msg
    assert "this source's timestamps are always seconds" in msg and "set data." not in msg


# ------------------------------------------------------------------------------------------ prepare + cache
def _files(tmp_path: Path) -> tuple[Path, Path]:
    rows = [{"user_id": "u1", "item_id": f"i{k}", "timestamp": k, "rating": 4} for k in range(30)]
    rows += [
        {"user_id": "u2", "item_id": "i1", "timestamp": 3, "rating": 5},
        {"user_id": "u2", "item_id": "i2", "timestamp": 40, "rating": 1},
        {"user_id": "u3", "item_id": "i0", "timestamp": 1, "rating": 2},
    ]
    items = [{"item_id": f"i{k}", "title": f"Item {k}"} for k in range(32)]
    return write_table(tmp_path / "inter.csv", rows), write_table(tmp_path / "items.jsonl", items)


def _dump(prepared) -> dict:  # noqa: ANN001
    return {
        "items": prepared.items.to_list(),
        "user_sequences": prepared.user_sequences.to_list(),
        **{k: v.to_list() for k, v in prepared.splits.items()},
        "summary": prepared.summary,
    }


def test_prepare_data_cache_hit(tmp_path: Path) -> None:
    inter, items = _files(tmp_path)
    cfg = data_cfg(inter, items, max_history=5)
    logs: list[str] = []
    first = prepare_data(cfg, tmp_path / "cache", log=logs.append)
    assert not any("cache hit" in m for m in logs)
    logs.clear()
    second = prepare_data(cfg, tmp_path / "cache", log=logs.append)
    assert any("cache hit" in m for m in logs)
    assert _dump(first) == _dump(second)
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 1
    # the prompt wording does not change the prepared data: same cache entry
    other_prompt = cfg.model_copy(update={"prompt": cfg.prompt.model_copy(update={"category": "films"})})
    logs.clear()
    prepare_data(other_prompt, tmp_path / "cache", log=logs.append)
    assert any("cache hit" in m for m in logs)
    # a new format version of the code is a miss (old caches are rebuilt, not reused)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare_module, "FORMAT_VERSION", prepare_module.FORMAT_VERSION + 1)
        logs.clear()
        prepare_data(cfg, tmp_path / "cache", log=logs.append)
        assert not any("cache hit" in m for m in logs)
    # a changed input file is a miss
    write_text(items, items.read_text() + '{"item_id": "new", "title": "New"}\n')
    logs.clear()
    third = prepare_data(cfg, tmp_path / "cache", log=logs.append)
    assert not any("cache hit" in m for m in logs)
    assert third.summary["items"] == 33
    logs.clear()
    forced = prepare_data(cfg, tmp_path / "cache", force=True, log=logs.append)
    assert not any("cache hit" in m for m in logs) and _dump(forced) == _dump(third)


def test_prepared_data_api(tmp_path: Path) -> None:
    inter, items = _files(tmp_path)
    cfg = data_cfg(inter, items, max_history=5)
    p = prepare_data(cfg, tmp_path / "cache", log=lambda _: None)
    s = p.summary
    assert s["source"] == "files" and s["users"] == 3 and s["items"] == 32 and s["interactions"] == 33
    assert s["items_without_interactions"] == 2  # i30, i31
    assert s["samples"] == {"train": 24, "valid": 3, "test": 3}
    assert p.item_ids() == sorted(f"i{k}" for k in range(32))
    idx = {item_id: i for i, item_id in enumerate(p.item_ids())}
    test = p.splits["test"]
    last = test[len(test) - 1]
    assert last["user_id"] == "u2" and last["target_item_idx"] == idx["i2"]
    # the latest u1 sample: history keeps 5 items, earlier_items keeps all 29
    row = max(i for i in range(len(test)) if test[i]["user_id"] == "u1")
    assert len(test[row]["history_item_idx"]) == 5
    assert p.earlier_items("test", row) == [idx[f"i{k}"] for k in range(29)]
    assert p.earlier_items("test", len(test) - 1) == [idx["i1"]]
    assert p.splits["valid"].features["history_ratings"].feature.dtype == "float64"
    text = format_summary(s)
    assert "users            3" in text and "train 24 | valid 3 | test 3" in text
    assert "order            each user's interactions by (timestamp, input row)" in text
    assert s["order_rule"].endswith("ties keep the input file's row order, never item ids")
    assert "users with a single interaction" in text


def test_prepare_movielens(tmp_path: Path) -> None:
    folder = write_movielens(tmp_path / "ml")
    cfg = DataConfig(source="movielens100k", prompt=PROMPT)
    p = prepare_data(cfg, tmp_path / "cache", movielens_dir=folder, log=lambda _: None)
    assert p.summary["source"] == "movielens100k" and p.summary["items"] == 4
    assert p.items[0]["title"] == "Toy Story (1995)" and p.items[0]["description"] is None
    # 3 samples split 2 / 0 / 1: the empty valid split survives the cache with its column types
    assert p.summary["samples"] == {"train": 2, "valid": 0, "test": 1}
    again = prepare_data(cfg, tmp_path / "cache", movielens_dir=folder, log=lambda _: None)
    assert len(again.splits["valid"]) == 0
    assert again.splits["valid"].features == p.splits["train"].features
    with pytest.raises(ValueError, match="movielens_dir"):
        prepare_data(cfg, tmp_path / "cache", log=lambda _: None)
    cfg2 = DataConfig(source="movielens100k", movielens_dir=str(folder), prompt=PROMPT)
    assert prepare_data(cfg2, tmp_path / "cache", log=lambda _: None).summary == p.summary


def test_real_csv_module_roundtrip(tmp_path: Path) -> None:
    # A CSV written by the csv module (CRLF line ends, a quoted multi-line title) reads back unchanged.
    path = tmp_path / "items.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "description"])
        w.writerow(["1", "Line one\nline two", "Pokémon"])
        w.writerow(["2", "Two", ""])
    items = read_catalogue(str(path))
    assert [(i.item_id, i.title, i.description, i.row) for i in items] == [
        ("1", "Line one\nline two", "Pokémon", 2),
        ("2", "Two", None, 4),
    ]


def test_corrupt_binary_files(tmp_path: Path) -> None:
    msg = _error(read_interactions, str(write_text(tmp_path / "x.parquet", b"not parquet at all")))
    assert "x.parquet:" in msg and "not a readable Parquet file" in msg
    msg = _error(read_interactions, str(write_text(tmp_path / "x.csv.gz", b"not gzip")))
    assert "x.csv.gz:" in msg and "cannot read the gzip data" in msg


def test_cfg_cache_dir_overrides_cache_root(tmp_path: Path) -> None:
    inter, items = _files(tmp_path)
    cfg = data_cfg(inter, items).model_copy(update={"cache_dir": str(tmp_path / "mine")})
    prepare_data(cfg, tmp_path / "default", log=lambda _: None)
    assert not (tmp_path / "default").exists()
    assert [p.name.split("-")[0] for p in (tmp_path / "mine").iterdir()] == ["files"]

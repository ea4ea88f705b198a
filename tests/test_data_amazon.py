"""Tests of the Amazon Reviews 2023 adapter on tiny files written in the real formats."""

from __future__ import annotations

import gzip
import http.server
import json
import threading
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from r2ec.config import AmazonConfig, DataConfig
from r2ec.data import DataError, format_summary, prepare_data
from r2ec.data.amazon import clean_title, fetch_input, k_core, load_amazon, minus_months
from r2ec.data.samples import build_samples
from r2ec.data.schema import Interaction, SourceTables

PROMPT = {"category": "video games", "item_singular": "video game", "history_items": 2}
LONG_TITLE = " ".join(f"w{i}" for i in range(21))  # 21 words > max_title_words 20

META = [
    {
        "parent_asin": "A",
        "title": "Good &amp; Game <b>Deluxe</b>\n Edition",
        "average_rating": 4.5,
        "rating_number": 10,
        "description": ["Line one\nnext", "Line &quot;two&quot;", "Line one\nnext"],
        "categories": ["Video Games", "PC"],
        "price": "None",
        "store": "X",
        "details": {"a": 1},
    },
    {
        "parent_asin": "B",
        "title": ' "Quoted Title" ',
        "average_rating": 3.0,
        "rating_number": 2,
        "description": [],
        "categories": [],
        "price": 9.99,
    },
    {
        "parent_asin": "C",
        "title": "Cee",
        "average_rating": None,
        "rating_number": None,
        "description": [],
        "categories": [],
        "price": None,
    },
    {
        "parent_asin": "D",
        "average_rating": 1.0,
        "rating_number": 1,
        "description": [],
        "price": 1,
    },  # no title
    {"parent_asin": "E", "title": None, "description": []},  # null title
    {"parent_asin": "F", "title": "<span id='x'>Bad</span>", "description": []},
    {"parent_asin": "G", "title": LONG_TITLE, "description": []},
    {"parent_asin": "H", "title": "<i>x</i>", "description": []},  # one character after cleaning
    {"parent_asin": "I", "title": "Never Reviewed", "description": []},
    {
        "parent_asin": "J",
        "title": "Older Item",
        "description": ["Old."],
        "average_rating": 5,
        "rating_number": 1,
    },
]


def ms(day: str, extra_ms: int = 0) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() * 1000) + extra_ms


REVIEWS = [
    ("u1", "A", 5.0, ms("2023-08-01", 123)),
    ("u1", "B", 4.0, ms("2023-08-02")),
    ("u1", "C", 3.0, ms("2023-08-03")),
    ("u2", "A", 5.0, ms("2023-09-01")),
    ("u2", "B", 2.0, ms("2023-10-01")),  # exactly at the window end: inside (inclusive)
    ("u2", "C", 2.0, ms("2023-10-01", 1)),  # after the window end
    ("u3", "J", 4.0, ms("2023-05-01")),  # only inside the widened window
    ("u3", "A", 1.0, ms("2023-08-15")),
    ("u4", "D", 5.0, ms("2023-08-01")),  # item dropped: no title
    ("u4", "F", 5.0, ms("2023-08-01")),  # item dropped: <span id
    ("u5", "Q", 5.0, ms("2023-08-01")),  # item without a metadata row
    ("u6", "A", 3.0, ms("2022-01-05")),  # the earliest review; outside every window tried below
    ("u1", "C", 3.0, ms("2023-08-03")),  # exact duplicate row
]


def write_amazon(folder: Path, meta: list[dict] = META, reviews: list[tuple] = REVIEWS) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    meta_path, reviews_path = folder / "meta_Cat.jsonl.gz", folder / "Cat.csv.gz"
    meta_path.write_bytes(gzip.compress("".join(json.dumps(m) + "\n" for m in meta).encode()))
    lines = ["user_id,parent_asin,rating,timestamp"] + [f"{u},{a},{r},{t}" for u, a, r, t in reviews]
    reviews_path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return reviews_path, meta_path


def amazon_cfg(reviews: Path, meta: Path, **kw: object) -> AmazonConfig:
    base = {
        "category": "Cat",
        "reviews": str(reviews),
        "meta": str(meta),
        "window_end": "2023-10-01",
        "window_months": 3,
        "widen_months": 3,
        "min_items": 4,
        "max_title_words": 20,
        "k_core": 0,
    }
    return AmazonConfig(**{**base, **kw})


def dropped(source: SourceTables | dict, what: str) -> dict[str, int]:
    """reason -> count of the dropped ``what`` in a SourceTables or a summary dict."""
    rows = [d.as_dict() for d in source.dropped] if isinstance(source, SourceTables) else source["dropped"]
    return {d["reason"]: d["count"] for d in rows if d["what"] == what}


def test_amazon_filters_window_and_cleaning(tmp_path: Path) -> None:
    reviews, meta = write_amazon(tmp_path / "raw")
    t = load_amazon(amazon_cfg(reviews, meta), tmp_path / "dl", log=lambda _: None)
    items = {i.item_id: i for i in t.items}
    assert sorted(items) == ["A", "B", "C", "J"]
    a = items["A"]
    assert a.title == "Good & Game Deluxe Edition"  # entities unescaped, tags stripped, newline -> space
    assert a.description == 'Line one next Line "two"'  # original order, repeat removed
    assert (a.average_rating, a.rating_number, a.categories) == (4.5, 10, [])
    assert items["B"].title == "Quoted Title" and items["B"].description is None
    assert items["C"].average_rating is None and items["C"].rating_number is None

    item_drops = dropped(t, "items")
    assert item_drops == {
        "metadata rows without a title": 2,
        "metadata rows whose title contains '<span id'": 1,
        "metadata rows whose title has more than 20 words": 1,
        "metadata rows whose title has at most 1 character after cleaning": 1,
        "items with no review left after the time window and k-core (or never reviewed)": 1,
    }
    assert len(t.items) + sum(item_drops.values()) == len(META)

    review_drops = dropped(t, "interactions")
    assert review_drops == {
        "reviews of items dropped by the title filters": 2,
        "reviews of items that have no row in the metadata file": 1,
        "reviews outside the time window 2023-04-01 .. 2023-10-01": 2,
    }
    assert len(t.interactions) + sum(review_drops.values()) == len(REVIEWS)

    # milliseconds -> seconds, the fraction kept
    first = min(t.interactions, key=lambda x: x.timestamp if x.item_id == "A" and x.user_id == "u1" else 1e18)
    assert first.timestamp == pytest.approx(
        ms("2023-08-01", 123) / 1000
    ) and first.timestamp % 1 == pytest.approx(0.123)

    w = t.info["window"]
    assert (w["start"], w["end"], w["initial_start"], w["widenings"], w["items"]) == (
        "2023-04-01",
        "2023-10-01",
        "2023-07-01",
        1,
        4,
    )
    assert w["min_items_reached"] is True and "widened 1 time(s) by 3 months" in w["note"]


def test_amazon_prepare_summary_accounts_for_every_row(tmp_path: Path) -> None:
    reviews, meta = write_amazon(tmp_path / "raw")
    cfg = DataConfig(source="amazon2023", amazon=amazon_cfg(reviews, meta).model_dump(), prompt=PROMPT)
    p = prepare_data(cfg, tmp_path / "cache", log=lambda _: None)
    s = p.summary
    assert s["source"] == "amazon2023" and s["items"] == 4 and s["items_without_interactions"] == 0
    review_drops = dropped(s, "interactions")
    assert review_drops["exact duplicate interaction rows (same user, item, timestamp and rating)"] == 1
    assert s["interactions"] + sum(review_drops.values()) == len(REVIEWS)
    assert s["items"] + sum(dropped(s, "items").values()) == len(META)
    assert s["window"]["widenings"] == 1
    text = format_summary(s)
    assert "window           2023-04-01 .. 2023-10-01" in text and "widened 1 time(s)" in text
    assert p.items[0]["categories"] == [] and p.items[0]["title"] == "Good & Game Deluxe Edition"
    # u2's review exactly at the window end is the last sample: 2023-10-01 00:00:00 UTC in seconds
    test = p.splits["test"]
    assert test[len(test) - 1]["target_timestamp"] == ms("2023-10-01") / 1000


def test_amazon_min_items_not_reached(tmp_path: Path) -> None:
    reviews, meta = write_amazon(tmp_path / "raw")
    t = load_amazon(amazon_cfg(reviews, meta, min_items=100), tmp_path / "dl", log=lambda _: None)
    w = t.info["window"]
    # 2023-07-01 back in 3-month steps to 2022-01-01: the first start at or before the earliest review
    # (2022-01-05)
    assert (w["start"], w["widenings"], w["min_items_reached"]) == ("2022-01-01", 6, False)
    assert "NOT reached" in w["note"] and "2022-01-05" in w["note"]
    assert "reviews outside the time window 2022-01-01 .. 2023-10-01" in dropped(t, "interactions")
    summary = {
        "source": "amazon2023",
        "users": 0,
        "items": 0,
        "items_without_interactions": 0,
        "interactions": 0,
        "samples": {"train": 0, "valid": 0, "test": 0},
        "dropped": [],
        "window": w,
    }
    assert "NOT reached" in format_summary(summary)


def test_amazon_k_core(tmp_path: Path) -> None:
    reviews, meta = write_amazon(tmp_path / "raw")
    t = load_amazon(amazon_cfg(reviews, meta, k_core=2, min_items=0), tmp_path / "dl", log=lambda _: None)
    # window 2023-07-01 .. 2023-10-01: u1 A B C C(dup), u2 A B, u3 A. 2-core: u3 goes (1 review); then
    # every user has >= 2 and items A (3), B (2), C (2: u1's duplicate rows) stay.
    assert dropped(t, "interactions")["reviews removed by the 2-core filter"] == 1
    assert sorted({x.user_id for x in t.interactions}) == ["u1", "u2"]
    assert len(t.interactions) + sum(dropped(t, "interactions").values()) == len(REVIEWS)


def test_k_core_is_iterative() -> None:
    def x(u: str, i: str) -> Interaction:
        return Interaction(u, i, 0.0, None, 0)

    # round 1 drops u3 (one review) and item c (one review); that leaves u2 with one review: round 2
    rows = [x("u1", "a"), x("u1", "b"), x("u2", "a"), x("u2", "c"), x("u3", "d"), x("u4", "a"), x("u4", "b")]
    kept = k_core(rows, 2)
    assert sorted((r.user_id, r.item_id) for r in kept) == [
        ("u1", "a"),
        ("u1", "b"),
        ("u4", "a"),
        ("u4", "b"),
    ]
    assert k_core(rows, 1) == rows and k_core(rows, 0) == rows


def test_minus_months() -> None:
    assert minus_months(date(2023, 10, 1), 3) == date(2023, 7, 1)
    assert minus_months(date(2023, 10, 1), 12) == date(2022, 10, 1)
    assert minus_months(date(2023, 2, 1), 3) == date(2022, 11, 1)
    assert minus_months(date(2023, 5, 31), 3) == date(2023, 2, 28)


def test_clean_title() -> None:
    assert clean_title("  'Tom &amp; Jerry'  ") == "Tom & Jerry"
    assert clean_title('"Weird Al" Yankovic') == '"Weird Al" Yankovic'  # not a surrounding pair
    assert clean_title("A\t\tB  <br/>C") == "A B C"


def test_amazon_bad_inputs(tmp_path: Path) -> None:
    reviews, meta = write_amazon(tmp_path / "raw")
    bad = tmp_path / "bad"
    r2, _ = write_amazon(bad, reviews=[*REVIEWS[:3], ("u9", "A", "five", ms("2023-08-01"))])
    with pytest.raises(DataError, match=r"Cat\.csv\.gz, line 5: unparsable rating 'five'"):
        load_amazon(amazon_cfg(r2, meta), tmp_path / "dl", log=lambda _: None)
    _, m2 = write_amazon(bad, meta=[*META, {"parent_asin": "A", "title": "Again"}])
    with pytest.raises(
        DataError,
        match=r"meta_Cat\.jsonl\.gz, line 11: duplicate parent_asin 'A' \(first seen on "
        r"line 1\)",
    ):
        load_amazon(amazon_cfg(reviews, m2), tmp_path / "dl", log=lambda _: None)
    m3 = bad / "meta_Bad.jsonl.gz"
    m3.write_bytes(gzip.compress(b'{"parent_asin": "A", "title": "x"}\n{"parent_asin": "B", "title": \n'))
    with pytest.raises(DataError, match=r"meta_Bad\.jsonl\.gz, line 2: malformed JSON"):
        load_amazon(amazon_cfg(reviews, m3), tmp_path / "dl", log=lambda _: None)
    r4, _ = write_amazon(bad, reviews=[("u1", "Q", 1.0, ms("2023-08-01"))])
    with pytest.raises(DataError, match="no review is left"):
        load_amazon(amazon_cfg(r4, meta), tmp_path / "dl", log=lambda _: None)


def test_amazon_implausible_timestamps_and_ratings(tmp_path: Path) -> None:
    _, meta = write_amazon(tmp_path / "raw")
    # A timestamp in microseconds is read as milliseconds (Amazon's fixed unit) and lands in the year 55717.
    r1, _ = write_amazon(tmp_path / "us", reviews=[*REVIEWS[:2], ("u9", "A", 5.0, ms("2023-10-01") * 1000)])
    with pytest.raises(DataError) as info:
        load_amazon(amazon_cfg(r1, meta), tmp_path / "dl", log=lambda _: None)
    assert str(info.value).startswith(
        f"{r1}, line 4: timestamp 1696118400000000 read as milliseconds is in the year 55717; expected a date "
        "between 1970 and 2100"
    )
    # Ratings and average ratings are checked against data.prompt.rating_scale once the filters have run.
    r2, _ = write_amazon(tmp_path / "r7", reviews=[*REVIEWS[:2], ("u9", "A", 7.0, ms("2023-09-01"))])
    cfg = DataConfig(source="amazon2023", amazon=amazon_cfg(r2, meta).model_dump(), prompt=PROMPT)
    with pytest.raises(DataError) as info:
        prepare_data(cfg, tmp_path / "cache", log=lambda _: None)
    assert str(info.value) == (
        f"{r2}, line 4: rating 7 is outside data.prompt.rating_scale [1, 5] (1 row(s) in total); "
        "set data.prompt.rating_scale to the file's scale"
    )
    r3, m3 = write_amazon(tmp_path / "m7", meta=[{**META[0], "average_rating": 7.5}, *META[1:]])
    cfg = DataConfig(source="amazon2023", amazon=amazon_cfg(r3, m3).model_dump(), prompt=PROMPT)
    with pytest.raises(DataError, match=r"meta_Cat\.jsonl\.gz, line 1: average_rating 7\.5 is outside "):
        prepare_data(cfg, tmp_path / "cache", log=lambda _: None)
    # the same file on its own scale is accepted
    wide = cfg.model_copy(update={"prompt": cfg.prompt.model_copy(update={"rating_scale": (0.0, 10.0)})})
    assert prepare_data(wide, tmp_path / "cache", log=lambda _: None).summary["items"] == 4


def test_fetch_input_downloads_once(tmp_path: Path) -> None:
    served = tmp_path / "srv"
    served.mkdir()
    (served / "Cat.csv.gz").write_bytes(b"payload")
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(served), **kw)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            hits.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/Cat.csv.gz"
        dl = tmp_path / "downloads"
        got = fetch_input(url, dl, log=lambda _: None)
        assert got == dl / "Cat.csv.gz" and got.read_bytes() == b"payload"
        assert fetch_input(url, dl, log=lambda _: None) == got
        assert len(hits) == 1 and not list(dl.glob(".*part"))
        with pytest.raises(DataError, match="download failed"):
            fetch_input(url.replace("Cat.csv.gz", "Missing.csv.gz"), dl, log=lambda _: None)
        assert not list(dl.glob(".*part"))
    finally:
        server.shutdown()
        server.server_close()
    assert fetch_input(str(tmp_path / "local.csv"), dl) == tmp_path / "local.csv"


def test_build_on_amazon_tables(tmp_path: Path) -> None:
    reviews, meta = write_amazon(tmp_path / "raw")
    t = load_amazon(amazon_cfg(reviews, meta), tmp_path / "dl", log=lambda _: None)
    built = build_samples(t, 20, 0.8, 0.1, (1.0, 5.0))
    assert built.items["item_id"] == ["A", "B", "C", "J"]
    seqs = dict(zip(built.user_sequences["user_id"], built.user_sequences["item_idx"], strict=True))
    assert seqs == {"u1": [0, 1, 2], "u2": [0, 1], "u3": [3, 0]}

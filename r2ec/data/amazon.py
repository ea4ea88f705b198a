"""Amazon Reviews 2023 (McAuley lab) -> the generic tables, filtered like the official R2ec preprocessing.

Inputs: ``{Category}.csv.gz`` (the 5-core rating-only benchmark file; header
``user_id,parent_asin,rating,timestamp``, timestamps in milliseconds) and ``meta_{Category}.jsonl.gz`` (one
JSON object per item with ``parent_asin``, ``title``, ``description``, ``average_rating``, ``rating_number``,
...). Either may be a local path or an http(s) URL; URLs are downloaded once into ``<download_dir>`` (temp
file + rename, so an interrupted download never leaves a truncated file under the final name).

Filters, each counted in :attr:`SourceTables.dropped`:

* items (metadata rows): no / null title; title containing ``<span id``; title of more than
  ``max_title_words`` words (the raw title split on single spaces, as the official code does); title of at
  most one character after cleaning. Strings are cleaned with ``html.unescape``, tags ``<...>`` removed,
  newlines / tabs turned into spaces and runs of spaces squeezed; titles also lose a surrounding pair of
  quotes.
* reviews of dropped items, and reviews of items that have no metadata row at all.
* the time window ``[window_end - window_months, window_end]`` (calendar months, dates at 00:00 UTC), then an
  iterative k-core (users and items with fewer than ``k_core`` reviews removed until none is; 0 or 1 = off).
  If fewer than ``min_items`` items remain, the window start moves back by ``widen_months`` and both steps are
  redone from scratch; this stops once the window start is at or before the earliest review (widening cannot
  add anything), and the summary says that ``min_items`` was not reached.
* items left without any review after the window and k-core (the catalogue is the items of the kept reviews).

Timestamps are converted from milliseconds to seconds and must then fall in 1970..2100, else :class:`DataError`
naming the line (a file in seconds read as milliseconds lands in January 1970 and is not caught). Ratings and
``average_rating`` are checked against ``data.prompt.rating_scale`` when the samples are built
(:mod:`r2ec.data.samples`); the real files' are 1-5.

Deviations from the official code (YRYangang/RRec, preprocess.py):

* Items with a non-numeric price are kept (the official code drops them; price is not used anywhere).
* The window end is inclusive (the official end is exclusive) and the start moves back until it reaches the
  earliest review (the official code stops when the start's *year* reaches the earliest review's year).
* ``description`` keeps its paragraphs in their original order, exact repeats removed; the official code
  builds a ``set``, so its order is arbitrary. Description paragraphs are cleaned like titles (the official
  code cleans only plain-string fields, and description is a list).
* Non-ASCII characters are kept (the official code replaces each with a space, which mangles e.g. "Pokémon").
* ``categories`` is left empty: the official item prompt does not show it.
"""

from __future__ import annotations

import bisect
import calendar
import html
import os
import re
import shutil
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from r2ec.config import AmazonConfig
from r2ec.data import io
from r2ec.data.errors import DataError
from r2ec.data.schema import (
    Dropped,
    Interaction,
    Item,
    SourceTables,
    interaction_from_row,
    parse_count,
    parse_id,
    parse_rating,
)

Log = Callable[[str], Any]
REVIEW_COLUMNS = ("user_id", "parent_asin", "timestamp")
_TAG = re.compile(r"<[^>]+>")
_SPACES = re.compile(r" +")
_QUOTES = ('"', "'")


# --------------------------------------------------------------------------------------------------- inputs
def is_url(spec: str) -> bool:
    return urlparse(spec).scheme in ("http", "https")


def fetch_input(spec: str, download_dir: Path, log: Log = print) -> Path:
    """A local path as it is; an http(s) URL downloaded once into ``download_dir`` (atomically)."""
    if not is_url(spec):
        return Path(spec)
    name = Path(urlparse(spec).path).name
    if not name:
        raise DataError(spec, "the URL does not end in a file name")
    dest = Path(download_dir) / name
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{name}.{os.getpid()}.part")
    log(f"data: downloading {spec} -> {dest}")
    try:
        with urllib.request.urlopen(spec) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
        os.replace(tmp, dest)
    except OSError as e:  # URLError and HTTPError are OSErrors
        tmp.unlink(missing_ok=True)
        raise DataError(spec, f"download failed ({e})") from None
    return dest


# ------------------------------------------------------------------------------------------------- cleaning
def clean_text(text: str) -> str:
    text = html.unescape(text)
    text = _TAG.sub("", text)
    text = text.replace("\n", " ").replace("\t", " ").replace("\r", " ")
    return _SPACES.sub(" ", text).strip()


def clean_title(title: str) -> str:
    title = clean_text(title)
    while len(title) >= 2 and title[0] == title[-1] and title[0] in _QUOTES:
        title = title[1:-1].strip()
    return title


def clean_description(value: Any) -> str | None:
    if value is None:
        return None
    parts = value if isinstance(value, list) else [value]
    if not all(isinstance(p, str) for p in parts):
        raise ValueError(f"description must be a string or a list of strings, got {value!r}")
    cleaned = [clean_text(p) for p in parts]
    # dict.fromkeys: drop exact repeats (as the official set() does) but keep the original order.
    return " ".join(p for p in dict.fromkeys(cleaned) if p) or None


# ------------------------------------------------------------------------------------------------- metadata
@dataclass
class Meta:
    items: dict[str, Item]  # parent_asin -> kept item
    title_dropped: set[str]  # parent_asins dropped by the title filters
    dropped: Counter = field(default_factory=Counter)  # reason -> number of metadata rows
    rows: int = 0


def title_problem(raw: Any, max_words: int) -> str | None:
    """Why a raw title is dropped, or None if it is kept (the checks of the official code, in its order)."""
    if raw is None:
        return "metadata rows without a title"
    if "<span id" in raw:
        return "metadata rows whose title contains '<span id'"
    if len(raw.split(" ")) > max_words:
        return f"metadata rows whose title has more than {max_words} words"
    if len(clean_title(raw)) <= 1:
        return "metadata rows whose title has at most 1 character after cleaning"
    return None


def read_meta(path: Path, max_title_words: int) -> Meta:
    meta = Meta(items={}, title_dropped=set())
    first_line: dict[str, int] = {}
    for number, row in io.iter_rows(path, ("parent_asin",)):
        meta.rows += 1
        asin = _meta_asin(path, number, row, first_line)
        raw = row.get("title")
        if raw is not None and not isinstance(raw, str):
            raw = str(raw)
        problem = title_problem(raw, max_title_words)
        if problem is not None:
            meta.dropped[problem] += 1
            meta.title_dropped.add(asin)
            continue
        meta.items[asin] = _meta_item(path, number, row, asin, clean_title(raw))
    return meta


def _meta_asin(path: Path, number: int, row: dict[str, Any], first_line: dict[str, int]) -> str:
    try:
        asin = parse_id(row.get("parent_asin"), "parent_asin")
    except ValueError as e:
        raise DataError(path, str(e), io.location(path, number)) from None
    if asin in first_line:
        raise DataError(
            path,
            f"duplicate parent_asin {asin!r} (first seen on line {first_line[asin]})",
            io.location(path, number),
        )
    first_line[asin] = number
    return asin


def _meta_item(path: Path, number: int, row: dict[str, Any], asin: str, title: str) -> Item:
    try:
        return Item(
            item_id=asin,
            title=title,
            description=clean_description(row.get("description")),
            average_rating=parse_rating(row.get("average_rating"), "average_rating"),
            rating_number=parse_count(row.get("rating_number")),
            categories=[],
            row=number,
        )
    except ValueError as e:
        raise DataError(path, str(e), io.location(path, number)) from None


# -------------------------------------------------------------------------------------------------- reviews
def read_reviews(path: Path) -> list[Interaction]:
    return [
        interaction_from_row(str(path), n, row, unit="ms", item_key="parent_asin")
        for n, row in io.iter_rows(path, REVIEW_COLUMNS)
    ]


def keep_reviews_of_items(reviews: list[Interaction], meta: Meta) -> tuple[list[Interaction], list[Dropped]]:
    kept = [r for r in reviews if r.item_id in meta.items]
    of_dropped = sum(1 for r in reviews if r.item_id in meta.title_dropped)
    no_meta = len(reviews) - len(kept) - of_dropped
    dropped = [
        Dropped(of_dropped, "interactions", "reviews of items dropped by the title filters"),
        Dropped(no_meta, "interactions", "reviews of items that have no row in the metadata file"),
    ]
    return kept, [d for d in dropped if d.count]


# ------------------------------------------------------------------------------------------ window + k-core
def minus_months(day: date, months: int) -> date:
    """Calendar months back, the day clamped to the month's length (2023-05-31 - 3 months = 2023-02-28)."""
    year, month0 = divmod(day.year * 12 + day.month - 1 - months, 12)
    month = month0 + 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def epoch_seconds(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def k_core(reviews: list[Interaction], k: int) -> list[Interaction]:
    """Drop reviews of users and items with fewer than ``k`` reviews until none is left; k <= 1: off."""
    if k <= 1:
        return reviews
    users = Counter(r.user_id for r in reviews)
    items = Counter(r.item_id for r in reviews)
    while True:
        kept, removed = [], []
        for r in reviews:
            (kept if users[r.user_id] >= k and items[r.item_id] >= k else removed).append(r)
        if not removed:
            return kept
        # Update the counts by what was removed instead of recounting everything each round.
        for r in removed:
            users[r.user_id] -= 1
            items[r.item_id] -= 1
        reviews = kept


@dataclass
class WindowResult:
    reviews: list[Interaction]
    outside: int  # reviews outside the final window
    removed_by_k_core: int
    info: dict[str, Any]


def select_window(reviews: list[Interaction], cfg: AmazonConfig, log: Log = print) -> WindowResult:
    """Time window + k-core, widening the window until ``min_items`` items remain (see the module doc)."""
    ordered = sorted(reviews, key=lambda r: r.timestamp)
    times = [r.timestamp for r in ordered]
    end = date.fromisoformat(cfg.window_end)
    hi = bisect.bisect_right(times, epoch_seconds(end))
    start = initial_start = minus_months(end, cfg.window_months)
    widenings = 0
    while True:
        window = ordered[bisect.bisect_left(times, epoch_seconds(start)) : hi]
        kept = k_core(window, cfg.k_core)
        n_items = len({r.item_id for r in kept})
        log(
            f"data: window {start} .. {end}: {len(kept)} reviews, {n_items} items (min_items {cfg.min_items})"
        )
        exhausted = not times or epoch_seconds(start) <= times[0]
        if n_items >= cfg.min_items or exhausted:
            break
        start = minus_months(start, cfg.widen_months)
        widenings += 1
    info = _window_info(cfg, start, initial_start, widenings, n_items, times)
    return WindowResult(kept, len(ordered) - len(window), len(window) - len(kept), info)


def _window_info(
    cfg: AmazonConfig, start: date, initial_start: date, widenings: int, n_items: int, times: list[float]
) -> dict[str, Any]:
    reached = n_items >= cfg.min_items
    if reached and widenings == 0:
        note = f"{n_items} items >= min_items {cfg.min_items}; the window was not widened"
    elif reached:
        note = (
            f"widened {widenings} time(s) by {cfg.widen_months} months (from {initial_start}) "
            f"to reach min_items {cfg.min_items}"
        )
    else:
        earliest = datetime.fromtimestamp(times[0], UTC).date() if times else None
        note = (
            f"min_items {cfg.min_items} NOT reached: only {n_items} items after widening {widenings} "
            "time(s); "
            f"the window start {start} is at or before the earliest review ({earliest}), so it cannot be "
            "widened further; kept what is there"
        )
    return {
        "start": start.isoformat(),
        "end": cfg.window_end,
        "initial_start": initial_start.isoformat(),
        "widenings": widenings,
        "widen_months": cfg.widen_months,
        "k_core": cfg.k_core,
        "min_items": cfg.min_items,
        "items": n_items,
        "min_items_reached": reached,
        "note": note,
    }


# -------------------------------------------------------------------------------------------------- adapter
def load_amazon(cfg: AmazonConfig, download_dir: Path, log: Log = print) -> SourceTables:
    """Read, filter and window one Amazon Reviews 2023 category (see the module doc for every step)."""
    meta_path = fetch_input(cfg.meta, download_dir, log)
    reviews_path = fetch_input(cfg.reviews, download_dir, log)
    meta = read_meta(meta_path, cfg.max_title_words)
    reviews = read_reviews(reviews_path)
    reviews, dropped = keep_reviews_of_items(reviews, meta)
    if not reviews:
        raise DataError(reviews_path, "no review is left after dropping reviews of filtered or unknown items")
    result = select_window(reviews, cfg, log)
    dropped += _window_drops(result, cfg)
    used = {r.item_id for r in result.reviews}
    items = [item for asin, item in meta.items.items() if asin in used]
    dropped = _meta_drops(meta, len(meta.items) - len(items)) + dropped
    return SourceTables(
        source="amazon2023",
        interactions=result.reviews,
        items=items,
        interactions_file=str(reviews_path),
        items_file=str(meta_path),
        dropped=dropped,
        info={"window": result.info},
    )


def _window_drops(result: WindowResult, cfg: AmazonConfig) -> list[Dropped]:
    window = f"{result.info['start']} .. {result.info['end']}"
    k_core_reason = f"reviews removed by the {cfg.k_core}-core filter"
    dropped = [
        Dropped(result.outside, "interactions", f"reviews outside the time window {window}"),
        Dropped(result.removed_by_k_core, "interactions", k_core_reason),
    ]
    return [d for d in dropped if d.count]


def _meta_drops(meta: Meta, unreviewed: int) -> list[Dropped]:
    dropped = [Dropped(n, "items", reason) for reason, n in meta.dropped.items()]
    if unreviewed:
        reason = "items with no review left after the time window and k-core (or never reviewed)"
        dropped.append(Dropped(unreviewed, "items", reason))
    return dropped

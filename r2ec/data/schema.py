"""The generic tables every data source is converted to, the parsers of their fields, the ``files`` source.

Interactions: ``user_id`` (str), ``item_id`` (str), ``timestamp`` (seconds, float), ``rating`` (float or
None). Catalogue items: ``item_id`` (str, unique), ``title`` (non-empty str), ``description`` (str or None),
``average_rating`` (float or None), ``rating_number`` (int or None), ``categories`` (list of str).

Ids are always strings: CSV text is kept verbatim (``"007"`` stays ``"007"``) and JSON / Parquet numbers are
converted with ``str()``. Timestamps are numbers in the configured unit (seconds or milliseconds) or ISO-8601
date-times (``2023-01-02T03:04:05Z``; a date-time without a zone is taken as UTC). After conversion to seconds a
timestamp must lie in [1970-01-01, 2100-01-01): milliseconds read as seconds land tens of thousands of years
ahead, and the error says what the value became and which setting to change. (Seconds read as milliseconds land
in January 1970, inside the range: that mistake is not caught here.) A ``description`` given as
a list of strings is joined with spaces; ``categories`` given as one string is split on ``|``.

Every row keeps its 1-based row number (``row``) so that checks made later (duplicate item ids, unknown item
ids) can still name the row; :class:`SourceTables` keeps the file names for the same reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, NamedTuple

from r2ec.config import FilesConfig
from r2ec.data import io
from r2ec.data.errors import DataError

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "title")
_MS_PER_S = 1000.0
# Plausible timestamps, in seconds: [1970-01-01, 2100-01-01) UTC. Real interaction logs lie well inside, and a
# unit mistake (ms read as s) lands far outside it.
TS_MIN = 0.0
TS_END = datetime(2100, 1, 1, tzinfo=UTC).timestamp()
_SECONDS_PER_YEAR = 365.2425 * 86400
_UNIT_NAMES = {"s": "seconds", "ms": "milliseconds"}


class Interaction(NamedTuple):
    user_id: str
    item_id: str
    timestamp: float  # seconds since the Unix epoch
    rating: float | None
    row: int  # 1-based row / line number in the interactions file


class Item(NamedTuple):
    item_id: str
    title: str
    description: str | None
    average_rating: float | None
    rating_number: int | None
    categories: list[str]
    row: int  # 1-based row / line number in the catalogue file


@dataclass(frozen=True)
class Dropped:
    """``count`` things of kind ``what`` ("interactions", "items" or "users") were filtered out, and why."""

    count: int
    what: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "what": self.what, "reason": self.reason}


@dataclass
class SourceTables:
    """What a source adapter returns: the generic tables plus everything it filtered out and why."""

    source: str
    interactions: list[Interaction]
    items: list[Item]
    interactions_file: str  # for error messages about interaction rows
    items_file: str  # for error messages about catalogue rows
    dropped: list[Dropped] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # extra summary entries, e.g. Amazon's time window


# -------------------------------------------------------------------------------------------- field parsers
# Each parser raises ValueError(problem); the row-level functions below add the file and row to it.
def parse_id(value: Any, name: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"missing {name}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        # ValueError, not TypeError: this is bad input data (reported as DataError), not a programming error.
        problem = f"{name} must be a string or a number, got {type(value).__name__} {value!r}"
        raise ValueError(problem)  # noqa: TRY004
    return value if isinstance(value, str) else str(value)


def parse_timestamp(value: Any, unit: str = "s", unit_setting: str | None = None) -> float:
    """Seconds since the epoch from a number in ``unit`` ("s" or "ms") or an ISO-8601 date-time.

    The result must lie in [1970, 2100) (:data:`TS_MIN`, :data:`TS_END`), else ValueError. ``unit_setting`` is
    the config key that sets the unit (``data.files.timestamp_unit``), named in the hint when the value would be
    plausible in the other unit; None for a source whose unit is fixed.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError("missing timestamp")
    if isinstance(value, datetime | date):
        return _check_date(_datetime_seconds(value), value)
    number = _number_or_none(value)
    if number is None:
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value.strip())
            except ValueError:
                pass
            else:
                return _check_date(_datetime_seconds(parsed), value)
        raise ValueError(
            f"unparsable timestamp {value!r} (expected a number of {_UNIT_NAMES[unit]} or an ISO-8601 date-time "
            "such as 2023-01-02T03:04:05Z)"
        )
    if not math.isfinite(number):
        raise ValueError(f"timestamp {value!r} is not a finite number")
    seconds = number / _MS_PER_S if unit == "ms" else number
    if TS_MIN <= seconds < TS_END:
        return seconds
    other = "s" if unit == "ms" else "ms"
    as_other = number / _MS_PER_S if other == "ms" else number
    if not TS_MIN <= as_other < TS_END:
        hint = ""
    elif unit_setting is not None:
        hint = f" ({_UNIT_NAMES[other]}? set {unit_setting}: {other})"
    else:
        # The unit of this source is fixed (MovieLens: s, Amazon: ms): the file, not a setting, is wrong.
        hint = (
            f" (plausible as {_UNIT_NAMES[other]}, but this source's timestamps are always {_UNIT_NAMES[unit]}: "
            "is it the right file?)"
        )
    shown = value.strip() if isinstance(value, str) else str(value)  # the number as written, unquoted
    raise ValueError(
        f"timestamp {shown} read as {_UNIT_NAMES[unit]} is in the year {_year(seconds)}; expected a date "
        f"between 1970 and 2100{hint}"
    )


def _check_date(seconds: float, value: Any) -> float:
    """The range check for date-times (no unit involved, so no unit hint)."""
    if TS_MIN <= seconds < TS_END:
        return seconds
    shown = repr(value) if isinstance(value, str) else value.isoformat()
    raise ValueError(f"timestamp {shown} is in the year {_year(seconds)}; expected a date between 1970 and 2100")


def _year(seconds: float) -> int:
    try:
        return datetime.fromtimestamp(seconds, UTC).year
    except (OverflowError, OSError, ValueError):
        # Beyond datetime's years 1..9999: the mean Gregorian year is exact enough to show the mistake.
        return math.floor(1970 + seconds / _SECONDS_PER_YEAR)


def parse_rating(value: Any, name: str = "rating") -> float | None:
    """A float, or None when the value is absent (empty, null or NaN)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = _number_or_none(value)
    if number is None:
        raise ValueError(f"unparsable {name} {value!r} (expected a number)")
    if math.isnan(number):
        return None
    if math.isinf(number):
        raise ValueError(f"{name} {value!r} is not finite")
    return number


def parse_count(value: Any, name: str = "rating_number") -> int | None:
    """A non-negative integer, or None when absent; ``12.0`` is accepted, ``12.5`` is not."""
    number = parse_rating(value, name)
    if number is None:
        return None
    if not number.is_integer() or number < 0:
        raise ValueError(f"{name} {value!r} is not a non-negative whole number")
    return int(number)


def parse_title(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)  # a film called "1917" may arrive as a JSON number
    if not isinstance(value, str):
        problem = "missing title" if value is None else f"title must be a string, got {value!r}"
        raise ValueError(problem)  # noqa: TRY004
    if not value.strip():
        raise ValueError("empty title")
    return value.strip()


def parse_description(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise ValueError(f"description must be a string or a list of strings, got {value!r}")
        value = " ".join(v.strip() for v in value if v.strip())
    if not isinstance(value, str):
        raise ValueError(f"description must be a string or a list of strings, got {value!r}")  # noqa: TRY004
    return value.strip() or None


def parse_categories(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split("|")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"categories must be a list of strings or a '|'-separated string, got {value!r}")
    return [v.strip() for v in value if v.strip()]


def _number_or_none(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _datetime_seconds(value: date | datetime) -> float:
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # no zone given: UTC, never the machine's local time
    return value.timestamp()


# ---------------------------------------------------------------------------------------------- row parsers
def interaction_from_row(
    path: str,
    number: int,
    row: dict[str, Any],
    unit: str = "s",
    item_key: str = "item_id",
    unit_setting: str | None = None,
) -> Interaction:
    """An :class:`Interaction` from a raw row; a bad field raises :class:`DataError` naming file and row.

    ``unit_setting``: see :func:`parse_timestamp`."""
    try:
        return Interaction(
            user_id=parse_id(row.get("user_id"), "user_id"),
            item_id=parse_id(row.get(item_key), item_key),
            timestamp=parse_timestamp(row.get("timestamp"), unit, unit_setting),
            rating=parse_rating(row.get("rating")),
            row=number,
        )
    except ValueError as e:
        raise DataError(path, str(e), io.location(path, number)) from None


def item_from_row(path: str, number: int, row: dict[str, Any]) -> Item:
    """An :class:`Item` from a raw catalogue row; a bad field raises :class:`DataError` naming file, row."""
    try:
        return Item(
            item_id=parse_id(row.get("item_id"), "item_id"),
            title=parse_title(row.get("title")),
            description=parse_description(row.get("description")),
            average_rating=parse_rating(row.get("average_rating"), "average_rating"),
            rating_number=parse_count(row.get("rating_number")),
            categories=parse_categories(row.get("categories")),
            row=number,
        )
    except ValueError as e:
        raise DataError(path, str(e), io.location(path, number)) from None


def read_interactions(path: str, unit: str = "s", unit_setting: str | None = None) -> list[Interaction]:
    return [
        interaction_from_row(path, n, row, unit, unit_setting=unit_setting)
        for n, row in io.iter_rows(path, INTERACTION_COLUMNS)
    ]


def read_catalogue(path: str) -> list[Item]:
    return [item_from_row(path, n, row) for n, row in io.iter_rows(path, ITEM_COLUMNS)]


def load_files(cfg: FilesConfig) -> SourceTables:
    """The ``files`` source: user-supplied interaction and catalogue files, used as they are (no filters)."""
    return SourceTables(
        source="files",
        interactions=read_interactions(cfg.interactions, cfg.timestamp_unit, "data.files.timestamp_unit"),
        items=read_catalogue(cfg.items),
        interactions_file=cfg.interactions,
        items_file=cfg.items,
    )

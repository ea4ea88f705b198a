"""MovieLens-100k in RecBole's atomic-file format -> the generic tables.

The folder holds ``ml-100k.inter`` and ``ml-100k.item``: tab-separated, one header line whose fields carry
RecBole type suffixes (``item_id:token``, ``movie_title:token_seq``, ...), no quoting (titles contain quote
characters)::

    ml-100k.item:  item_id:token  movie_title:token_seq  release_year:token  class:token_seq
    ml-100k.inter: user_id:token  item_id:token  rating:float  timestamp:float

Mapping: ``title = "{movie_title} ({release_year})"`` (just the title when the year is empty), ``categories``
= the genre words of ``class`` (space separated), no description / average_rating / rating_number (None: the
item prompt leaves absent fields out), timestamps in seconds (a value outside 1970..2100 is a :class:`DataError`
naming the line; the real file's are 1997-98). Ratings are 1-5 and checked against ``data.prompt.rating_scale``
when the samples are built. Nothing is filtered here; every catalogue item is kept.
"""

from __future__ import annotations

import csv
from pathlib import Path

from r2ec.data import io
from r2ec.data.errors import DataError
from r2ec.data.schema import (
    Interaction,
    Item,
    SourceTables,
    interaction_from_row,
    parse_categories,
    parse_id,
    parse_title,
)

INTER_FILE = "ml-100k.inter"
ITEM_FILE = "ml-100k.item"


def _strip_type(name: str) -> str:
    return name.split(":", 1)[0]


def _rows(path: Path, required: tuple[str, ...]):
    return io.iter_delimited(
        path, delimiter="\t", quoting=csv.QUOTE_NONE, required=required, header_map=_strip_type, gz=False
    )


def load_movielens(folder: Path) -> SourceTables:
    """Read ``ml-100k.inter`` and ``ml-100k.item`` from ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, f"MovieLens folder not found (expected {INTER_FILE} and {ITEM_FILE} in it)")
    item_path, inter_path = folder / ITEM_FILE, folder / INTER_FILE
    return SourceTables(
        source="movielens100k",
        interactions=read_inter(inter_path),
        items=read_items(item_path),
        interactions_file=str(inter_path),
        items_file=str(item_path),
    )


def read_items(path: Path) -> list[Item]:
    return [_item(str(path), n, row) for n, row in _rows(path, ("item_id", "movie_title"))]


def read_inter(path: Path) -> list[Interaction]:
    return [
        interaction_from_row(str(path), n, row, unit="s")
        for n, row in _rows(path, ("user_id", "item_id", "timestamp"))
    ]


def _item(path: str, number: int, row: dict[str, str]) -> Item:
    try:
        title = parse_title(row.get("movie_title"))
        year = (row.get("release_year") or "").strip()
        return Item(
            item_id=parse_id(row.get("item_id"), "item_id"),
            title=f"{title} ({year})" if year else title,
            description=None,
            average_rating=None,
            rating_number=None,
            categories=parse_categories((row.get("class") or "").split()),
            row=number,
        )
    except ValueError as e:
        raise DataError(path, str(e), io.location(path, number)) from None

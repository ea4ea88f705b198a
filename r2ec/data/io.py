"""Row readers for CSV, JSON lines and Parquet files, each optionally gzip-compressed (``.gz``).

:func:`iter_rows` yields ``(row_number, row_dict)`` so that every later error can name the row. Row numbers
are 1-based: for CSV and other delimited text they are the physical line of the row's first line (the header
is line 1), for JSON lines the physical line, and for Parquet the data row. :func:`location` turns a row
number into the ``line N`` / ``row N`` text used in error messages.

Text is decoded as strict UTF-8 line by line, so a bad byte is reported with its line and byte offset instead
of a bare ``UnicodeDecodeError`` from somewhere inside a buffered stream. A leading UTF-8 byte order mark is
removed (spreadsheet programs write one, and it would otherwise become part of the first column's name).

What is *not* an error: extra columns (ignored by the callers), blank lines (they hold no data). What is: a
missing or empty file, a file with a header but no rows, a CSV row with the wrong number of fields, a JSON
line that does not parse or is not an object, a required column that is absent, an unsupported extension.
"""

from __future__ import annotations

import csv
import gzip
import io as _io
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from r2ec.data.errors import DataError

Row = dict[str, Any]
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_PARQUET_BATCH = 65_536
_JSON_KINDS = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def file_format(path: str | os.PathLike) -> tuple[str, bool]:
    """``(format, gzipped)`` from the file name, e.g. ``items.jsonl.gz`` -> ``("jsonl", True)``."""
    name = Path(path).name.lower()
    gz = name.endswith(".gz")
    stem = name[: -len(".gz")] if gz else name
    suffix = Path(stem).suffix
    if suffix not in FORMATS:
        expected = ", ".join(FORMATS)
        raise DataError(
            path,
            f"unsupported file extension {suffix or '(none)'!r} "
            f"(expected one of {expected}, optionally followed by .gz)",
        )
    return FORMATS[suffix], gz


def location(path: str | os.PathLike, number: int) -> str:
    """``row N`` for Parquet files, ``line N`` for everything else (all other inputs are line-based text)."""
    name = Path(path).name.lower()
    return f"row {number}" if ".parquet" in name else f"line {number}"


def iter_rows(path: str | os.PathLike, required: Sequence[str] = ()) -> Iterator[tuple[int, Row]]:
    """Yield ``(row_number, row)`` for every data row of a CSV / JSON lines / Parquet file (maybe ``.gz``).

    ``required`` names columns that must be present (checked once against the CSV header or Parquet schema,
    and on every line of a JSON lines file, whose keys may differ from line to line). Values are returned as
    read: CSV values are strings, JSON and Parquet values keep their types; the callers parse them.
    """
    fmt, gz = file_format(path)
    _check_exists(path)
    if fmt == "csv":
        yield from iter_delimited(path, required=required, gz=gz)
    elif fmt == "jsonl":
        yield from _iter_jsonl(path, required, gz)
    else:
        yield from _iter_parquet(path, required, gz)


def iter_delimited(
    path: str | os.PathLike,
    *,
    delimiter: str = ",",
    quoting: int = csv.QUOTE_MINIMAL,
    required: Sequence[str] = (),
    header_map: Callable[[str], str] | None = None,
    gz: bool | None = None,
) -> Iterator[tuple[int, Row]]:
    """Yield ``(line_number, row)`` for a delimited text file with a header line.

    ``header_map`` renames header fields before the ``required`` check (RecBole's ``item_id:token`` ->
    ``item_id``).
    ``gz`` defaults to "the name ends in .gz".
    """
    _check_exists(path)
    if gz is None:
        gz = str(path).lower().endswith(".gz")
    lines = iter_text_lines(path, gz)
    reader = csv.reader((text for _, text in lines), delimiter=delimiter, quoting=quoting, strict=True)
    header, header_line = _read_header(path, reader, header_map)
    _check_columns(path, header, required, f"line {header_line} (header)")
    n_rows = 0
    while True:
        start = reader.line_num + 1  # a quoted field may span lines: report the line where the row starts
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(path, f"malformed CSV ({e})", f"line {start}") from None
        if not fields:  # a blank line holds no data
            continue
        if len(fields) != len(header):
            raise DataError(
                path,
                f"{len(fields)} fields but the header has {len(header)} ({', '.join(header)})",
                f"line {start}",
            )
        n_rows += 1
        yield start, dict(zip(header, fields, strict=True))
    if n_rows == 0:
        raise DataError(path, "no data rows (the file has only a header)")


def iter_text_lines(path: str | os.PathLike, gz: bool) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` decoded as strict UTF-8; the line ending is kept (csv needs it)."""
    offset = 0
    try:
        with _open_binary(path, gz) as f:
            for number, raw in enumerate(f, start=1):
                text = _decode(path, raw, number, offset, gz)
                if number == 1 and text.startswith("\ufeff"):
                    text = text[1:]
                offset += len(raw)
                yield number, text
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(path, f"cannot read the gzip data ({e})") from None


def _decode(path: str | os.PathLike, raw: bytes, number: int, offset: int, gz: bool) -> str:
    try:
        return raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        where = " of the decompressed data" if gz else ""
        raise DataError(
            path,
            f"invalid UTF-8 byte 0x{raw[e.start]:02x} at byte offset {offset + e.start}{where} "
            f"(column {e.start + 1}); the file must be UTF-8 encoded",
            f"line {number}",
        ) from None


def _open_binary(path: str | os.PathLike, gz: bool) -> Any:
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _check_exists(path: str | os.PathLike) -> None:
    p = Path(path)
    if not p.exists():
        raise DataError(path, "file not found")
    if not p.is_file():
        raise DataError(path, "not a regular file")


def _read_header(
    path: str | os.PathLike, reader: Any, header_map: Callable[[str], str] | None
) -> tuple[list[str], int]:
    try:
        for fields in reader:
            if fields:
                names = [f.strip() for f in fields]
                if header_map is not None:
                    names = [header_map(n) for n in names]
                _check_unique_header(path, names, reader.line_num)
                return names, reader.line_num
    except csv.Error as e:
        raise DataError(path, f"malformed CSV header ({e})", f"line {reader.line_num}") from None
    raise DataError(path, "empty file (no header and no data rows)")


def _check_unique_header(path: str | os.PathLike, names: list[str], line: int) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(path, f"duplicate column {name!r} in the header", f"line {line} (header)")
        seen.add(name)


def _check_columns(
    path: str | os.PathLike, found: Iterable[str], required: Sequence[str], where: str
) -> None:
    found = list(found)
    missing = [c for c in required if c not in found]
    if missing:
        raise DataError(
            path,
            f"missing required column(s) {', '.join(map(repr, missing))} "
            f"(columns found: {', '.join(map(repr, found)) or 'none'})",
            where,
        )


def _iter_jsonl(path: str | os.PathLike, required: Sequence[str], gz: bool) -> Iterator[tuple[int, Row]]:
    n_rows = 0
    for number, text in iter_text_lines(path, gz):
        if not text.strip():
            continue
        obj = _parse_json_line(path, number, text, first=n_rows == 0)
        _check_columns(path, obj.keys(), required, f"line {number}")
        n_rows += 1
        yield number, obj
    if n_rows == 0:
        raise DataError(path, "empty file (no data rows)")


def _parse_json_line(path: str | os.PathLike, number: int, text: str, first: bool) -> Row:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ""
        if first and text.lstrip().startswith("["):
            hint = "; expected JSON lines (one object per line), this looks like a JSON array"
        problem = f"malformed JSON ({e.msg} at column {e.colno}){hint}"
        raise DataError(path, problem, f"line {number}") from None
    if not isinstance(obj, dict):
        kind = _JSON_KINDS.get(type(obj), type(obj).__name__)
        hint = "; expected JSON lines (one object per line)" if isinstance(obj, list) else ""
        raise DataError(path, f"expected a JSON object, found a JSON {kind}{hint}", f"line {number}")
    return obj


def _iter_parquet(path: str | os.PathLike, required: Sequence[str], gz: bool) -> Iterator[tuple[int, Row]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # Parquet needs random access; a gzipped one is decompressed into memory.
        source: Any = _io.BytesIO(gzip.decompress(Path(path).read_bytes())) if gz else str(path)
        pf = pq.ParquetFile(source)
    except (gzip.BadGzipFile, EOFError, zlib.error, pa.ArrowException, OSError) as e:
        raise DataError(path, f"not a readable Parquet file ({e})") from None
    _check_columns(path, pf.schema_arrow.names, required, "schema")
    number = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH):
        for row in _batch_rows(path, batch, number):
            number += 1
            yield number, row
    if number == 0:
        raise DataError(path, "no data rows")


def _batch_rows(path: str | os.PathLike, batch: Any, first: int) -> list[Row]:
    try:
        return batch.to_pylist()
    except (UnicodeDecodeError, ValueError):
        # Find the offending row so the message can name it.
        for i in range(batch.num_rows):
            try:
                batch.slice(i, 1).to_pylist()
            except (UnicodeDecodeError, ValueError) as e:
                raise DataError(path, f"cannot convert the row ({e})", f"row {first + i + 1}") from None
        raise

"""Prepare a data source once and cache the result: the catalogue, the three splits and the user sequences.

:func:`prepare_data` reads the source named by ``cfg.source`` (MovieLens-100k in RecBole format, Amazon
Reviews 2023, or user ``files``), builds the samples and splits (:mod:`r2ec.data.samples`) and saves
everything under ``cache_root / f"{source}-{key}"`` with ``datasets.DatasetDict.save_to_disk`` plus
``summary.json``.

The cache key hashes the data-relevant part of the config (everything but ``prompt`` and ``cache_dir``, which
do not change the prepared data, except ``prompt.rating_scale``: the ratings are validated against it, so a
changed scale must validate again), a format version of this code, and each local input file's absolute path,
size and modification time; a URL input is keyed by the URL itself (so a cache hit needs no download). The
folder is written under a temporary name and renamed into place, so a crashed or concurrent run never leaves a
half-written cache that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from r2ec.config import DataConfig
from r2ec.data.amazon import is_url, load_amazon
from r2ec.data.errors import DataError
from r2ec.data.movielens import INTER_FILE, ITEM_FILE, load_movielens
from r2ec.data.samples import SPLITS, BuiltData, build_samples, samples_sha256
from r2ec.data.schema import SourceTables, load_files

Log = Callable[[str], Any]
# Bump when the prepared data would change for the same inputs and config, to invalidate old caches.
# 2: ties ordered by input row, no longer by item id / user id (r2ec.data.samples); ratings checked against
# data.prompt.rating_scale; timestamps checked to lie in 1970..2100.
FORMAT_VERSION = 2
SUMMARY_FILE = "summary.json"

_INT = datasets.Value("int64")
_FLOAT = datasets.Value("float64")
_STR = datasets.Value("string")
ITEM_FEATURES = datasets.Features(
    {
        "item_idx": _INT,
        "item_id": _STR,
        "title": _STR,
        "description": _STR,
        "average_rating": _FLOAT,
        "rating_number": _INT,
        "categories": datasets.List(_STR),
    }
)
SAMPLE_FEATURES = datasets.Features(
    {
        "sample_id": _INT,
        "user_id": _STR,
        "position": _INT,
        "history_item_idx": datasets.List(_INT),
        "history_ratings": datasets.List(_FLOAT),
        "history_timestamps": datasets.List(_FLOAT),
        "target_item_idx": _INT,
        "target_rating": _FLOAT,
        "target_timestamp": _FLOAT,
    }
)
SEQUENCE_FEATURES = datasets.Features(
    {
        "user_id": _STR,
        "item_idx": datasets.List(_INT),
        "timestamps": datasets.List(_FLOAT),
        "ratings": datasets.List(_FLOAT),
    }
)


@dataclass
class PreparedData:
    # item_idx, item_id, title, description, average_rating, rating_number, categories
    items: datasets.Dataset
    splits: dict[str, datasets.Dataset]  # 'train' | 'valid' | 'test'
    user_sequences: datasets.Dataset  # user_id, item_idx, timestamps, ratings (time-ordered)
    summary: dict[str, Any]
    _earlier: dict[str, list[int]] | None = field(default=None, init=False, repr=False, compare=False)

    def item_ids(self) -> list[str]:
        """item_id of every catalogue item, in item_idx order."""
        return list(self.items["item_id"])

    def split_sha256(self, split: str) -> str:
        """:func:`samples_sha256` of a whole split (sample ids fix its order): equal for equal splits."""
        ds, ids = self.splits[split], self.item_ids()
        return samples_sha256(list(ds["sample_id"]), list(ds["user_id"]), [ids[t] for t in ds["target_item_idx"]])

    def earlier_items(self, split: str, row: int) -> list[int]:
        """item_idx of ALL the user's items before the target of ``splits[split][row]`` (not just history)."""
        sample = self.splits[split][row]
        return self.earlier_items_of(sample["user_id"], sample["position"])

    def earlier_items_of(self, user_id: str, position: int) -> list[int]:
        """The same for a sample row already in hand (its ``user_id`` and ``position``)."""
        if self._earlier is None:
            # Built once on first use: one pass over the user sequences.
            seqs = self.user_sequences
            self._earlier = dict(zip(seqs["user_id"], seqs["item_idx"], strict=True))
        return list(self._earlier[user_id][:position])


def prepare_data(
    cfg: DataConfig,
    cache_root: Path,
    movielens_dir: Path | None = None,
    force: bool = False,
    log: Log = print,
) -> PreparedData:
    """Prepared data for ``cfg``, from the cache when an identical preparation exists (unless ``force``).

    The cache lives in ``cfg.cache_dir`` when that is set, else in ``cache_root`` (callers pass their default,
    ``<cache>/data``); downloads of URL inputs go to its ``downloads/`` folder. ``movielens_dir`` is used for
    the ``movielens100k`` source when ``cfg.movielens_dir`` is not set (the caller passes the folder prepared
    by ``r2ec assets``). Only one-line progress messages go to ``log``; print :func:`format_summary` of the
    result's ``summary`` for the full table.
    """
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else Path(cache_root)
    inputs = input_files(cfg, movielens_dir)
    folder = cache_root / f"{cfg.source}-{cache_key(cfg, inputs)}"
    if not force and (folder / SUMMARY_FILE).is_file():
        log(f"data: cache hit {folder}")
    else:
        log(f"data: preparing {cfg.source} -> {folder}")
        tables = load_source(cfg, inputs, cache_root, log)
        built = build_samples(tables, cfg.max_history, cfg.train_frac, cfg.valid_frac, cfg.prompt.rating_scale)
        save_prepared(to_prepared(built, make_summary(tables, built)), folder)
    # Always the saved copy: memory-mapped, and identical whether this call built it or found it.
    prepared = load_prepared(folder)
    n = prepared.summary["samples"]
    log(
        f"data: {prepared.summary['items']} items, samples train {n['train']} / valid {n['valid']} / "
        f"test {n['test']}"
    )
    return prepared


# -------------------------------------------------------------------------------------------------- sources
def input_files(cfg: DataConfig, movielens_dir: Path | None) -> list[str]:
    """The input files (or URLs) of the configured source, in a fixed order."""
    if cfg.source == "movielens100k":
        folder = cfg.movielens_dir or movielens_dir
        if folder is None:
            # A DataError so that the CLI reports it like any other data problem.
            raise DataError(
                "data.movielens_dir", "not set, and no MovieLens asset folder was passed (run `r2ec assets`)"
            )
        return [str(Path(folder) / INTER_FILE), str(Path(folder) / ITEM_FILE)]
    if cfg.source == "amazon2023":
        assert cfg.amazon is not None  # guaranteed by DataConfig's validator
        return [cfg.amazon.reviews, cfg.amazon.meta]
    assert cfg.files is not None
    return [cfg.files.interactions, cfg.files.items]


def load_source(cfg: DataConfig, inputs: list[str], cache_root: Path, log: Log = print) -> SourceTables:
    if cfg.source == "movielens100k":
        return load_movielens(Path(inputs[0]).parent)
    if cfg.source == "amazon2023":
        assert cfg.amazon is not None
        return load_amazon(cfg.amazon, cache_root / "downloads", log)
    assert cfg.files is not None
    return load_files(cfg.files)


def cache_key(cfg: DataConfig, inputs: list[str]) -> str:
    """A short hash of the data-relevant config, the code's format version and the inputs' identities."""
    blob = {
        "version": FORMAT_VERSION,
        "config": cfg.model_dump(mode="json", exclude={"prompt", "cache_dir"}),
        # The only prompt setting that changes what prepare accepts (it rejects ratings outside the scale).
        "rating_scale": list(cfg.prompt.rating_scale),
        "inputs": [_input_identity(spec) for spec in inputs],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _input_identity(spec: str) -> list[Any]:
    if is_url(spec):
        return ["url", spec]
    path = Path(spec)
    if not path.is_file():
        raise DataError(spec, "file not found")
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


# -------------------------------------------------------------------------------------------------- summary
def make_summary(tables: SourceTables, built: BuiltData) -> dict[str, Any]:
    """The summary dict (JSON-compatible: it is saved as summary.json and compares equal after loading)."""
    summary: dict[str, Any] = {"source": tables.source, **built.stats}
    summary.update(tables.info)
    return json.loads(json.dumps(summary))


def format_summary(summary: dict[str, Any]) -> str:
    """A human-readable multi-line table of a summary."""
    samples = summary["samples"]
    lines = [
        f"data source      {summary['source']}",
        f"users            {summary['users']:,}",
        f"items            {summary['items']:,} "
        f"({summary['items_without_interactions']:,} without interactions)",
        f"interactions     {summary['interactions']:,}",
        "samples          "
        + " | ".join(f"{name} {samples[name]:,}" for name in SPLITS)
        + f" (total {sum(samples.values()):,})",
    ]
    if "order_rule" in summary:  # absent only in hand-made summaries
        lines.append(f"order            {summary['order_rule']}")
    if "window" in summary:
        w = summary["window"]
        lines.append(f"window           {w['start']} .. {w['end']} (k-core {w['k_core']}): {w['note']}")
    dropped = summary.get("dropped", [])
    if dropped:
        lines.append("dropped")
        width = max(len(f"{d['count']:,}") for d in dropped)
        lines += [f"  {d['count']:>{width},} {d.get('what', ''):<12} {d['reason']}" for d in dropped]
    else:
        lines.append("dropped          nothing")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- datasets + cache
def to_prepared(built: BuiltData, summary: dict[str, Any]) -> PreparedData:
    return PreparedData(
        items=_dataset(built.items, ITEM_FEATURES),
        splits={name: _dataset(built.splits[name], SAMPLE_FEATURES) for name in SPLITS},
        user_sequences=_dataset(built.user_sequences, SEQUENCE_FEATURES),
        summary=summary,
    )


def _dataset(columns: dict[str, list[Any]], features: datasets.Features) -> datasets.Dataset:
    # Straight to Arrow with the declared schema: Dataset.from_dict encodes every example in Python, which is
    # several times slower, and the explicit schema keeps the column types even for an empty split.
    return datasets.Dataset(pa.Table.from_pydict(columns, schema=features.arrow_schema))


def save_prepared(prepared: PreparedData, folder: Path) -> None:
    """Write to a temporary sibling folder, then rename it into place (replacing an older copy, if any)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dd = datasets.DatasetDict(
        {"items": prepared.items, **prepared.splits, "user_sequences": prepared.user_sequences}
    )
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a "Saving the dataset" bar per table is noise in the run log
    try:
        # An empty split saved with the default sharding has no data file and cannot be loaded back (datasets
        # 5.2); one explicit shard keeps it loadable.
        dd.save_to_disk(str(tmp), num_shards={name: 1 for name, ds in dd.items() if len(ds) == 0})
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    (tmp / SUMMARY_FILE).write_text(json.dumps(prepared.summary, indent=2, sort_keys=True), encoding="utf-8")
    old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
    # force=True: os.replace cannot overwrite a non-empty folder, so the old one is moved away first.
    if folder.exists():
        os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except OSError:
        if not (folder / SUMMARY_FILE).is_file():  # not a concurrent run that finished first
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def load_prepared(folder: Path) -> PreparedData:
    dd = datasets.load_from_disk(str(folder))
    summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    return PreparedData(
        items=dd["items"],
        splits={name: dd[name] for name in SPLITS},
        user_sequences=dd["user_sequences"],
        summary=summary,
    )


def prepare_from_config(cfg: DataConfig, force: bool = False, log: Log = print) -> PreparedData:
    """:func:`prepare_data` with the defaults of the command line: the cache under ``<cache>/data`` and, for
    MovieLens without ``movielens_dir``, the folder prepared by ``r2ec assets``."""
    from r2ec.assets import cache_root, resolve

    movielens_dir = None
    if cfg.source == "movielens100k" and cfg.movielens_dir is None:
        movielens_dir = Path(resolve("asset://ml-100k"))
    return prepare_data(cfg, cache_root() / "data", movielens_dir=movielens_dir, force=force, log=log)

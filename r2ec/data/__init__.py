"""Data pipeline: source adapters (MovieLens-100k, Amazon Reviews 2023, user files), sample building, caching.

``prepare_data(cfg.data, cache_root)`` is the entry point; see :mod:`r2ec.data.prepare`.
"""

from r2ec.data.errors import DataError
from r2ec.data.prepare import PreparedData, format_summary, prepare_data

__all__ = ["DataError", "PreparedData", "format_summary", "prepare_data"]

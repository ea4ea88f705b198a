"""The one exception type of the data pipeline.

Every problem with the input data is reported as a :class:`DataError` whose message is a single line of the
form ``<file>, <line N | row N>: <problem>`` (or ``<file>: <problem>`` for problems of the whole file), so a
user can go straight to the offending row. It subclasses ``ValueError`` so generic ``except ValueError``
handlers still work.
"""

from __future__ import annotations

import os


class DataError(ValueError):
    """Bad input data; the message names the file, the row or line when there is one, and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str, location: str | None = None) -> None:
        self.path = str(path)
        self.location = location
        # One line, always: values are quoted with repr() by the callers, and a stray newline in an
        # exception's own text (e.g. a wrapped json error) must not break the "file, line: problem" shape.
        self.problem = " ".join(problem.split("\n"))
        where = f"{self.path}, {location}" if location else self.path
        super().__init__(f"{where}: {self.problem}")

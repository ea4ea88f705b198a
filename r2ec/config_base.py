"""What every config module shares: the strict base of a config section and the error an unusable config raises.

A module of its own so that ``r2ec.config_cluster`` (a section) and ``r2ec.config_load`` (reading) can use them
without importing ``r2ec.config``, which imports both of them: no import cycle.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file, the field path and the reason."""


class Section(BaseModel):
    """Base of every config section: a misspelt key is an error (``extra="forbid"``), not a silently ignored
    setting, and a value assigned after loading is validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

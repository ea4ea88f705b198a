"""Reading a config: a YAML file into a dict, dotted ``--set`` overrides, and validation errors as readable text.

``r2ec.config.load_config`` composes these with the schema. They know nothing of the schema (an override naming an
unknown key is reported by validation afterwards), so this module does not import ``r2ec.config``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from r2ec.config_base import ConfigError


def read_mapping(path: str | os.PathLike | None) -> dict:
    """The top-level mapping of the YAML file at ``path`` (ConfigError naming the file when it cannot be one)."""
    if path is None:
        raise ConfigError("no config given: pass --config FILE")
    source, p = str(path), Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {source} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {source} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {source}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: the dotted field path, the reason, and the offending value where it helps."""
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not in the schema; check the spelling)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        got = e.get("input")
        got_s = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {path}: {msg}{got_s}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML, so ``8``, ``0.5``, ``true``, ``[5, 10]`` and ``null``
    have their natural types and anything else is a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted KEY, e.g. recpo.group_size=8")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty segment in the key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a nested dict; unknown paths are reported by validation afterwards, but a path
    that walks *through* a non-mapping value is reported here."""
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {item!r}: {where} is a value ({nxt!r}), not a section")
            node = nxt
        node[parts[-1]] = value
    return data

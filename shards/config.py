"""What every typed config shares: sizes like 4G, YAML loading, and one-line errors naming the field.

The job configs themselves live beside what they configure (BuildConfig in
index_builder, ServeConfig here), so serving never imports the builder.
"""
from __future__ import annotations

import re

import yaml
from pydantic import ValidationError

from .errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.I)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(s: str | int) -> int:
    """'4G' -> 4294967296. Plain integers are bytes."""
    if isinstance(s, int):
        return s
    m = _SIZE.match(str(s))
    if not m:
        raise ValueError(f"{s!r} is not a size; write it like 512M, 4G or 1.5T")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$", re.I)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(s: str | int | float) -> float:
    """'90s', '30m', '1h', '7d' -> seconds. Plain numbers are seconds."""
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        if s < 0:
            raise ValueError(f"{s!r} is negative; write it like 30m, 1h or 0")
        return float(s)
    m = _DURATION.match(str(s))
    if not m:
        raise ValueError(f"{s!r} is not a duration; write it like 90s, 30m, 1h or 7d")
    return float(m.group(1)) * _SECONDS[(m.group(2) or "s").lower()]


def load_yaml(cls, path: str, **overrides):
    """A config model from a YAML mapping of option names to values; non-None overrides win."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    return make(cls, {**data, **{k: v for k, v in overrides.items() if v is not None}}, where=path)


def make(cls, data: dict, where: str = "config"):
    """Build a config model; turn pydantic's errors into one ConfigError naming each field."""
    try:
        return cls(**data)
    except ValidationError as e:
        raise ConfigError(f"{where}: " + "; ".join(_explain(err) for err in e.errors())) from None


def _explain(err: dict) -> str:
    field = ".".join(str(x) for x in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        return f"{field}: unknown option (check the spelling and the command's --help)"
    if err["type"] == "missing":
        return f"{field}: required"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{field}: {msg}"

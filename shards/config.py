"""What every typed config shares: sizes like 4G, YAML loading, and one-line errors naming the field.

The job configs themselves live beside what they configure (BuildConfig in
index_builder, ServeConfig here), so serving never imports the builder.
"""
from __future__ import annotations

import re

import yaml
from pydantic import ValidationError

from shards.errors import ConfigError

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


# ---- serving ------------------------------------------------------------------------------

from typing import Any  # noqa: E402

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator  # noqa: E402

TOKEN_ENV = "SHARDEX_TOKEN"


class ServeConfig(BaseModel):
    """`shardex serve` and `python -m jobs.serve`: one model for flags, YAML and the Python API."""

    model_config = ConfigDict(extra="forbid")

    index_root: str
    host: str = "127.0.0.1"                 # loopback unless told otherwise
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1)          # replicas of each shard deployment
    token: SecretStr | None = None          # bearer token; default: $SHARDEX_TOKEN; none: open
    require_all_shards: bool = False        # a missing shard makes /search a 503 instead of a partial answer
    shard_timeout: float = Field(5.0, gt=0)  # seconds one shard may take before it counts as missing
    poll_seconds: float = Field(10.0, ge=0)  # how often CURRENT is read; 0: only POST /admin/reload swaps
    s3_endpoint: str | None = None
    filter_fields: list[str] | None = None  # held per shard for filters; default: numeric and boolean fields
    max_queries: int = Field(1024, ge=1, le=4096)    # queries in one request; also the largest server batch
    batch_wait_ms: float = Field(5.0, ge=0, le=1000)  # how long a server batch (router, encoder) waits to fill
    encoder_replicas: int = Field(1, ge=1)
    shard_cpus: float | None = Field(None, gt=0)  # Ray CPUs reserved per shard replica; default: see plan
    threads: int | None = Field(None, ge=1)       # faiss threads per shard replica; default: see plan
    name: str = Field("shardex", pattern=r"^[A-Za-z0-9_.-]+$")  # Serve application name
    route_prefix: str = Field("/", pattern=r"^/[A-Za-z0-9_./-]*$")  # where the router's HTTP API is mounted
    load_timeout: float = Field(600.0, gt=0)      # seconds a new version may take to come up
    detach: bool = False                          # return once serving, leaving the app on the cluster

    @field_validator("filter_fields", mode="before")
    @classmethod
    def _split_fields(cls, v: Any):
        if isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]
        return v

    @field_validator("shard_cpus")
    @classmethod
    def _cpus(cls, v):
        if v is not None and v > 1 and v != int(v):
            raise ValueError(f"{v}: Ray reserves fractions of one CPU or whole CPUs; give at most 1, or a whole number")
        return v

    @field_validator("token")
    @classmethod
    def _token(cls, v):
        if v is not None and len(v.get_secret_value()) < 8:
            raise ValueError("shorter than 8 characters; use a long random string (e.g. `openssl rand -hex 16`)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _token_from_env(cls, data: Any):
        import os

        if isinstance(data, dict) and data.get("token") is None and os.environ.get(TOKEN_ENV):
            data = {**data, "token": os.environ[TOKEN_ENV]}
        return data

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> "ServeConfig":
        return load_yaml(cls, path, **overrides)

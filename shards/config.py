"""The one style of every typed config: a base model (unknown keys refused, one-line errors that
name the field and the fix), the field types the configs share, sizes and durations, YAML
loading, and the argparse options of a model, whose field descriptions are the CLI's help.

The job configs live beside what they configure (BuildConfig, ReindexConfig and EvalConfig in
index_builder/config.py, ServeConfig here), so serving never imports the builder.
"""
from __future__ import annotations

import argparse
import re
import types
import typing
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

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


# ---------------------------------------------------------------- the base model and its errors

class Config(BaseModel):
    """A job's options: one model for CLI flags, YAML keys and the Python API. Every field has a
    description, which is its --help."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def from_yaml(cls, path: str, **overrides):
        return load_yaml(cls, path, **overrides)


def load_yaml(cls, path: str, **overrides):
    """A config model from a YAML mapping of option names to values; non-None overrides win."""
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values (key: value lines), got a "
                          f"{type(data).__name__}")
    return make(cls, {**data, **{k: v for k, v in overrides.items() if v is not None}}, where=path)


def read_yaml(path: str):
    """The YAML in path; a missing, unreadable or malformed file is one ConfigError naming it (and
    the line and column yaml gives)."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}; give the path of a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {e.start}); give a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"--config {path}:{at}: not valid YAML ({what}); fix the file, written as "
                          f"`option_name: value` lines") from None


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


# ---------------------------------------------------------------- the field types configs share

def split_commas(v: Any):
    """'a, b,' -> ['a', 'b'], as a list option is written on the command line; lists pass."""
    return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v


def byte_count_text(v: Any):
    """YAML writes a byte count as an int: the size as text, as the CLI gives it."""
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


def at_least(lo: int, unit: str = "", hint: str = "") -> AfterValidator:
    """A bound with an error that says what to give: 'must be at least 1, got 0' and the hint."""
    def check(v):
        if v < lo:
            raise ValueError(f"must be at least {lo}{unit}, got {v}{hint}")
        return v
    return AfterValidator(check)


def _recall(v: float) -> float:
    if not 0 < v <= 1:
        raise ValueError(f"must be in (0, 1], got {v}")
    return v


Names = Annotated[list[str], BeforeValidator(split_commas)]   # a list, or "a, b" on the command line
Count = Annotated[int, at_least(1)]
Recall = Annotated[float, AfterValidator(_recall)]            # a recall@k target, in (0, 1]
Size = Annotated[str, BeforeValidator(byte_count_text)]       # 512M, 4G; a byte count from YAML
S3Endpoint = Annotated[str | None, Field(description="S3 endpoint URL (also read from AWS_ENDPOINT_URL)")]
IndexRoot = Annotated[str, Field(description="index root (local path or s3://)")]


# ---------------------------------------------------------------- a model's argparse options

_DEFAULT = re.compile(r"\s*\(default: ([^()]*(?:\([^()]*\)[^()]*)*)\)$")  # a description's closing "(default: ...)"


def add_options(p: argparse.ArgumentParser, model: type[BaseModel], skip=(), inherited=()) -> None:
    """An option for each field of model but skip: --field-name (-x for a one-letter name), typed
    and with choices from the annotation, its help the field's description with the default once.
    Every argparse default is None, so that an option not given leaves the YAML's value or the
    model's default. inherited: fields whose default is the live version's (reindex)."""
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        flag = f"-{name}" if len(name) == 1 else "--" + name.replace("_", "-")
        typ, choices = _arg_type(f.annotation)
        h = option_help(model, name, name in inherited)
        if typ is bool:
            p.add_argument(flag, dest=name, action="store_true", default=None, help=h)
        else:
            p.add_argument(flag, dest=name, type=typ, choices=choices, default=None, help=h)


def option_help(model: type[BaseModel], name: str, inherited: bool = False) -> str:
    """A field's description, ending with its default: the one the description names in words
    ("(default: the text column)"), else the model's; none for flags and for None."""
    f = model.model_fields[name]
    text = f.description or ""
    m = _DEFAULT.search(text)
    if m:
        text, dflt = text[:m.start()], m.group(1)
    else:
        dflt = None if f.default is None or _arg_type(f.annotation)[0] is bool else f.default
    if inherited:
        dflt = "the live version's" + ("" if dflt is None else f", else {dflt}")
    return text if dflt is None else f"{text} (default: {dflt})"


def _arg_type(a) -> tuple[type, tuple | None]:
    """(argparse type, choices) of an annotation, Optional and Annotated unwrapped: bool, int, float,
    a Literal's choices; anything else (lists, secrets) is text the model parses."""
    while True:
        origin = typing.get_origin(a)
        if origin is Annotated:
            a = typing.get_args(a)[0]
        elif origin in (typing.Union, types.UnionType):
            rest = [x for x in typing.get_args(a) if x is not type(None)]
            if len(rest) != 1:
                return str, None
            a = rest[0]
        elif origin is Literal:
            return str, typing.get_args(a)
        else:
            return (a, None) if a in (bool, int, float) else (str, None)


# ---------------------------------------------------------------- serving

TOKEN_ENV = "SHARDEX_TOKEN"


class ServeConfig(Config):
    """`shardex serve` and `python -m jobs.serve`. Its bounds are Field(ge=..., le=...) with pydantic's
    messages ("port: Input should be greater than or equal to 1"), as the HTTP API's requests have."""

    index_root: IndexRoot
    host: str = Field("127.0.0.1", description="address to bind; 127.0.0.1 keeps it on this machine")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    replicas: int = Field(1, ge=1, description="replicas of each shard deployment")
    token: SecretStr | None = Field(None, description="bearer token clients must send (also read from "
                                    f"${TOKEN_ENV}); none: open")
    require_all_shards: bool = Field(False, description="answer 503 when a shard is missing, instead of a partial "
                                     "answer that says so")
    shard_timeout: float = Field(5.0, gt=0, description="seconds a shard may take before it counts as missing")
    poll_seconds: float = Field(10.0, ge=0, description="how often CURRENT is read to swap versions; 0: only "
                                "POST /admin/reload")
    s3_endpoint: S3Endpoint = None
    filter_fields: Names | None = Field(None, description="comma-separated stored fields held per shard for "
                                        "filters (default: the numeric and boolean ones)")
    max_queries: int = Field(1024, ge=1, le=4096, description="queries in one request (larger: 413); also the "
                             "largest server-side batch")
    batch_wait_ms: float = Field(5.0, ge=0, le=1000, description="how long a server batch (search fan-out, text "
                                 "encoder) waits for concurrent requests to join it")
    encoder_replicas: int = Field(1, ge=1, description="replicas of the text encoder deployment")
    router_replicas: int = Field(1, ge=1, description="replicas of the router (HTTP, coarse search, merge); "
                                 "one keeper replica beside them deploys the versions")
    router_cpus: float = Field(0.1, gt=0, description="Ray CPUs reserved per router replica, and its faiss "
                               "threads (whole CPUs); give 1 or more on a cluster: the coarse search runs there")
    shard_cpus: float | None = Field(None, gt=0, description="Ray CPUs reserved per shard replica (default: room "
                                     "for two versions side by side)")
    threads: int | None = Field(None, ge=1, description="faiss threads per shard replica (default: the cluster's "
                                "CPUs over the replicas)")
    name: str = Field("shardex", pattern=r"^[A-Za-z0-9_.-]+$", description="Serve application name (version apps "
                      "are NAME--VERSION)")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field("EveryNode", description="where Serve runs its HTTP "
                                                             "proxies: on every node (behind a load balancer) or "
                                                             "on the head only")
    route_prefix: str = Field("/", pattern=r"^/[A-Za-z0-9_./-]*$", description="where the HTTP API is mounted")
    load_timeout: float = Field(600.0, gt=0, description="seconds a version may take to come up")
    detach: bool = Field(False, description="return once serving, leaving the app on the cluster (for "
                         "`ray job submit` / RAY_ADDRESS)")

    @field_validator("shard_cpus", "router_cpus")
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

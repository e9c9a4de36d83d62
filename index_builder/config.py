"""The one typed config of a build, shared by the CLI, YAML job configs and the Python API.

Keys are the CLI's argument and option names with underscores. Every check
fails with the field's name and what to do about it.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from shards.config import load_yaml, make, parse_bytes, parse_duration  # noqa: F401  (make, parse_bytes: re-exported)


class BuildConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    source: str
    index_root: str
    id_column: str = "id"
    text_column: str = "text"
    vector_column: str | None = None
    dim: int | None = None                  # expected vector dim; default: the column's first vector
    fields: list[str] | None = None         # stored fields; default: the text column
    model: str | None = None                # default: the bundled all-MiniLM-L6-v2
    query_prefix: str | None = None         # default: the model's own "query" prompt, if it has one
    document_prefix: str | None = None      # default: its "document"/"passage"/"corpus" prompt
    max_seq_length: int | None = None       # tokens per text; default: the model's own limit
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on GPU, fp32 on CPU
    factory: str = "auto"
    memory_budget: str = "4G"
    shards: int = 1
    sharding: Literal["hash", "ivf"] = "hash"
    actors: int | None = None               # encoder actors; default: one per GPU, or sized to the CPUs
    gpus_per_actor: float | None = None     # default: 1 when the cluster has GPUs, else 0
    batch_size: int = 64
    bad_rows: Literal["error", "skip"] = "error"
    metric: Literal["ip", "l2"] | None = None
    s3_endpoint: str | None = None
    part_rows: int = 20_000                 # documents per input shard (one unit of encode/add work)
    target_recall: float = 0.95             # the default nprobe is the smallest that reaches this
    seed: int = 0
    merge_ram_budget: str = "auto"          # a serving shard bigger than this is merged into on-disk lists

    @field_validator("fields", mode="before")
    @classmethod
    def _split_fields(cls, v):
        if isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]
        return v

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _budget_int(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # YAML: a byte count

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, v):
        if parse_bytes(v) < 1 << 20:
            raise ValueError(f"{v!r} is under 1 MiB; write it like 512M or 4G")
        return v

    @field_validator("merge_ram_budget", mode="before")
    @classmethod
    def _merge_budget(cls, v):
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)                                    # YAML: a byte count
        if v != "auto":
            parse_bytes(v)                                # 0: every IVF shard on disk
        return v

    @field_validator("shards", "batch_size", "part_rows", "max_seq_length")
    @classmethod
    def _positive(cls, v, info):
        if v is not None and v < 1:
            raise ValueError(f"must be at least 1, got {v}")
        return v

    @field_validator("actors")
    @classmethod
    def _actors(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"must be at least 1, got {v}; leave it out to size the pool to the cluster")
        return v

    @field_validator("target_recall")
    @classmethod
    def _recall(cls, v):
        if not 0 < v <= 1:
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _columns(self):
        if self.vector_column and self.model:
            raise ValueError("give --model or --vector-column, not both: precomputed vectors are not re-encoded")
        if self.id_column in (self.stored_fields if self.fields else []):
            raise ValueError(f"fields: {self.id_column!r} is the id column; it is always returned as 'id'")
        return self

    @property
    def budget_bytes(self) -> int:
        return parse_bytes(self.memory_budget)

    @property
    def stored_fields(self) -> list[str]:
        if self.fields is not None:
            return self.fields
        return [] if self.vector_column else [self.text_column]

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> "BuildConfig":
        return load_yaml(cls, path, **overrides)


class ReindexConfig(BuildConfig):
    """`shardex reindex`: build's options, plus what decides reuse and retention.

    Build options left out take the live version's values (recorded in its manifest), so a
    nightly job needs only source and index_root.
    """

    retrain: bool = False                   # train a new quantizer even when the drift check passes
    drift_error: float = 2.0                # retrain when the new vectors' mean quantization error > this x baseline
    drift_imbalance: float = 1.5            # ... or the IVF lists' imbalance after the reindex passes this x baseline
    keep: int | None = None                 # after publishing, keep this many newest versions (see `shardex prune`)
    grace: str = "1h"                       # scratch and unfinished versions younger than this are left alone

    @field_validator("drift_error", "drift_imbalance")
    @classmethod
    def _ratio(cls, v):
        if v < 1:
            raise ValueError(f"must be at least 1 (a multiple of the baseline), got {v}")
        return v

    @field_validator("keep")
    @classmethod
    def _keep(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"must be at least 1, got {v}; CURRENT and the version before it are always kept")
        return v

    @field_validator("grace", mode="before")
    @classmethod
    def _grace(cls, v):
        parse_duration(v)
        return str(v)

    @property
    def grace_seconds(self) -> float:
        return parse_duration(self.grace)

    def build_options(self) -> dict:
        """The build options given explicitly (on the command line or in YAML), not defaulted."""
        return {k: getattr(self, k) for k in self.model_fields_set if k in BuildConfig.model_fields}

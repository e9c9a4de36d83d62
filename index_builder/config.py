"""The builder's typed configs (build, reindex, eval), shared by the CLI, YAML job configs and the Python API.

Keys are the CLI's argument and option names with underscores; each field's description is its
--help. Every check fails with the field's name and what to do about it (shards.config.Config).
"""
from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator

from shards.config import (
    Config,
    Count,
    IndexRoot,
    Names,
    Recall,
    S3Endpoint,
    Size,
    at_least,
    make,
    parse_bytes,
    parse_duration,
    split_commas,
)
from shards.errors import ConfigError

__all__ = ["BuildConfig", "ReindexConfig", "EvalConfig", "make", "parse_bytes"]  # make, parse_bytes: re-exported

class BuildConfig(Config):
    """`shardex build` (and `shardex encode`, which stops after the encode stage)."""

    model_config = ConfigDict(validate_assignment=True)

    source: str = Field(description="Parquet file, directory or glob (local or s3://)")
    index_root: IndexRoot
    id_column: str = Field("id", description="int64 ids, or strings (mapped to stable int64 ids, kept in docs/)")
    text_column: str = Field("text", description="encode this column")
    vector_column: str | None = Field(None, description="take precomputed vectors from this column (no encoding)")
    dim: int | None = Field(None, description="expected vector dimension for --vector-column (default: the "
                            "column's first vector)")
    fields: Names | None = Field(None, description="comma-separated stored fields returned with results "
                                 "(default: the text column)")
    model: str | None = Field(None, description="sentence-transformers model name or path (default: bundled "
                              "all-MiniLM-L6-v2, offline)")
    query_prefix: str | None = Field(None, description="prefix for queries, for instruction models, e.g. "
                                     "'query: ' (default: the model's own query prompt)")
    document_prefix: str | None = Field(None, description="prefix for documents, e.g. 'passage: ' (default: the "
                                        "model's own document prompt)")
    max_seq_length: Count | None = Field(None, description="tokens per text, longer ones are truncated (default: "
                                         "the model's limit)")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="encoder precision (auto: fp16 on "
                                                           "a GPU, fp32 on CPUs); fp16/bf16 need a GPU")
    factory: str = Field("auto", description="faiss index_factory string, or auto to choose from N, d and "
                         "--memory-budget")
    memory_budget: Size = Field("4G", description="budget for the served index, used by --factory auto (e.g. "
                                "512M, 4G)")
    shards: Count = Field(1, description="number of serving shards")
    sharding: Literal["hash", "ivf"] = Field("hash", description="hash: ids spread evenly, every query goes to "
                                             "every shard; ivf: each shard owns a contiguous range of IVF lists "
                                             "(balanced by vectors), a query needs only the shards it probes")
    ivf_order: Literal["grouped", "kmeans"] = Field("grouped", description="--sharding ivf: grouped renumbers the "
                                                    "lists so that each shard owns a compact region of the space "
                                                    "(a query reaches few shards); kmeans keeps k-means' order")
    route: Literal["ranked", "all"] = Field("ranked", description="--sharding ivf, at the default nprobe: ranked "
                                            "sends a query only to the shards whose nearest probed list is within "
                                            "a gap of its nearest (the build tunes the gap and nprobe to "
                                            "--target-recall); all sends it to every shard it probes")
    list_cap: Annotated[float, Field(ge=0)] = Field(4.0, description="IVF lists hold at most this many times "
                                                    "the mean list size (by the training sample): larger ones are "
                                                    "split in two and the smallest given up; 0 keeps k-means' lists")
    actors: Annotated[int, at_least(1, hint="; leave it out to size the pool to the cluster")] | None = Field(
        None, description="encoder actors (default: one per GPU, or sized to the CPUs)")
    gpus_per_actor: float | None = Field(None, description="GPUs per encoder actor (default: 1 when the cluster "
                                         "has GPUs, else 0)")
    batch_size: Count = Field(64, description="encoder batch size at the longest texts; shorter ones make "
                              "wider batches of the same number of tokens")
    batch_tokens: Count | None = Field(None, description="padded tokens per encoder batch (default: batch-size "
                                       "x the model's token limit)")
    tokenizer_workers: Annotated[int, Field(ge=0)] | None = Field(
        None, description="tokenizer processes per encoder actor (default: on a GPU node, the actor's share "
        "of the node's CPUs but one; none on CPU)")
    bad_rows: Literal["error", "skip"] = Field("error", description="error: stop at the first bad row; skip: "
                                               "quarantine it with a reason and go on")
    metric: Literal["ip", "l2"] | None = Field(None, description="ip or l2 (default: ip for normalised encoders, "
                                               "and for a vector column whose sampled vectors have unit norm; "
                                               "l2 otherwise)")
    s3_endpoint: S3Endpoint = None
    part_rows: Count = Field(20_000, description="documents per input shard: the unit of encode work")
    add_rows: Count | None = Field(None, description="vectors per add task, cut from consecutive parts however "
                                   "small or large they are (default: about 3 GiB of float32 vectors, 1M at "
                                   "d=768, fewer when that leaves cluster CPUs idle)")
    target_recall: Recall = Field(0.95, description="the default nprobe is the smallest that reaches this "
                                  "recall@10")
    tune_queries: str | None = Field(None, description="a file of real queries to tune the search defaults on "
                                     "(.npy vectors, .parquet with a 'vector' or 'text' column, or text, one a "
                                     "line), instead of held-out documents")
    refine: Literal["auto", "none", "fp32", "fp16"] = Field(
        "auto", description="keep each shard's vectors at this precision on disk (mmapped, apart from the RAM "
        "budget): a shard reranks its k x refine-factor best codes by exact distance, the factor tuned with "
        "nprobe to --target-recall; auto: when --factory auto picks codes that cap recall under the target")
    seed: int = Field(0, description="seed for sampling")
    merge_task_bytes: Size = Field("2G", description="an on-disk shard with more ids and codes than this is "
                                   "merged by several tasks, each a range of its lists of about this size")
    merge_ram_budget: Size = Field("auto", description="a serving shard bigger than this is merged into on-disk "
                                   "inverted lists (mmapped when served); auto: half the memory of the smallest "
                                   "Ray node")

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, v):
        if parse_bytes(v) < 1 << 20:
            raise ValueError(f"{v!r} is under 1 MiB; write it like 512M or 4G")
        return v

    @field_validator("merge_ram_budget", mode="before")
    @classmethod
    def _merge_budget(cls, v):
        if v != "auto":
            parse_bytes(v)                                # 0: every IVF shard on disk
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

    def refine_dtype(self, auto: str | None) -> str | None:
        """The refine store's precision, or None for none; auto: what --factory auto chose for --refine auto."""
        return None if self.refine == "none" else auto if self.refine == "auto" else self.refine

    @property
    def stored_fields(self) -> list[str]:
        if self.fields is not None:
            return self.fields
        return [] if self.vector_column else [self.text_column]


Ratio = Annotated[float, at_least(1, unit=" (a multiple of the baseline)")]


class ReindexConfig(BuildConfig):
    """`shardex reindex`: build's options, plus what decides reuse and retention.

    Build options left out take the live version's values (recorded in its manifest), so a
    nightly job needs only source and index_root.
    """

    source: str = Field(description="Parquet file, directory or glob (local or s3://): the whole corpus now")
    index_root: str = Field(description="index root with a live version (local path or s3://)")
    retrain: bool = Field(False, description="train a new quantizer even when the drift check passes")
    drift_error: Ratio = Field(2.0, description="retrain when the new vectors' mean quantization error passes "
                               "this multiple of the baseline")
    drift_imbalance: Ratio = Field(1.5, description="retrain when the IVF lists' imbalance after the reindex "
                                   "passes this multiple of the baseline")
    keep: Annotated[int, at_least(1, hint="; CURRENT and the version before it are always kept")] | None = Field(
        None, description="after publishing, delete all but the N newest versions (never CURRENT or the one "
        "before it) and stale scratch")
    grace: str = Field("1h", description="scratch and unfinished versions modified within this long are left "
                       "alone (a job may own them)")
    compact_share: float = Field(0.1, gt=0, description="compact a shard (its segments rewritten into one base) "
                                 "when its delta segments hold more than this share of its base's vectors")
    compact_segments: int = Field(8, ge=1, description="compact a shard when it has more than this many delta "
                                  "segments")

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


def env_count(name: str, default: int) -> int:
    """A whole number from the environment variable `name` (a threshold tests and benchmarks move),
    else default."""
    v = os.environ.get(name, "")
    if not v.strip():
        return default
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"${name}={v!r}: not a whole number; unset it or give a count") from None


def _nprobes(v):
    return [v] if isinstance(v, int) else split_commas(v)   # YAML: one nprobe, or a list


class EvalConfig(Config):
    """`shardex eval`; YAML keys for `python -m jobs.eval --config X.yaml` are the same names."""

    index_root: IndexRoot
    version: str | None = Field(None, description="the version to evaluate (default: CURRENT)")
    queries: str | None = Field(None, description="query file: .npy vectors, .parquet with a 'vector' or 'text' "
                                "column, or text, one query a line (default: stored vectors, each left out of "
                                "its own search)")
    k: Count = Field(10, description="recall@k and the k searched")
    nprobe: Annotated[list[int], BeforeValidator(_nprobes)] | None = Field(
        None, description="comma-separated nprobe values (default: 1, 2, 4, ... nlist)")
    num_queries: Count = Field(1000, description="how many stored vectors to sample as queries (without --queries)")
    latency_queries: Annotated[int, at_least(0)] = Field(200, description="how many queries to time one at a "
                                                         "time for latency")
    target_recall: Recall = Field(0.95, description="report the smallest nprobe reaching this recall@k")
    refine: Annotated[list[int], BeforeValidator(_nprobes)] | None = Field(
        None, description="comma-separated refine factors to sweep with each nprobe (default, with a refine "
        "store: 0,2,4,8,16,32; 0 is the codes alone)")
    retune: bool = Field(False, description="publish a new CURRENT version whose search defaults are the cheapest "
                         "(nprobe, refine factor) measured reaching --target-recall on these queries; nothing "
                         "else is rebuilt")
    out: str | None = Field(None, description="directory (or s3:// prefix) for eval.json and eval.png (default: "
                            "./shardex-eval-<version>)")
    threads: Count | None = Field(None, description="faiss threads (default: all cores)")
    seed: int = Field(0, description="seed for sampling queries")
    s3_endpoint: S3Endpoint = None

    @field_validator("nprobe")
    @classmethod
    def _nprobe(cls, v):
        if v is not None and (not v or min(v) < 1):
            raise ValueError(f"give positive nprobe values like 1,4,16, got {v}")
        return sorted(set(v)) if v else v

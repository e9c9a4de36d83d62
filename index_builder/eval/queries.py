"""Query files, for `shardex eval --queries` and `shardex build --tune-queries`: .npy vectors, a Parquet
file with a 'vector' or 'text' column, or UTF-8 text with one query a line, encoded by the index's
own encoder (its query prefix)."""
from __future__ import annotations

import os

import numpy as np

from index_builder.plan.corpus import first_line, load_npy
from shards.errors import ConfigError
from shards.storage.manifest import EncoderInfo
from shards.storage.store import Store

TUNE_QUERIES = 2000  # --tune-queries: at most this many of the file's queries (a seeded sample of more)


def digest(path: str, s3_endpoint: str | None) -> str:
    """The sha256 of a query file: a build tuned on other queries is another build."""
    return Store(os.path.dirname(path) or ".", s3_endpoint).sha256(os.path.basename(path))


def tune_file(path: str, enc: EncoderInfo, s3_endpoint: str | None, seed: int) -> np.ndarray:
    """--tune-queries' vectors: the file's queries, at most TUNE_QUERIES of them (seeded)."""
    xq = load_queries(path, enc, s3_endpoint, "tune_queries")
    if len(xq) > TUNE_QUERIES:
        xq = xq[np.sort(np.random.default_rng(seed).choice(len(xq), TUNE_QUERIES, replace=False))]
    return xq


def load_queries(path: str, enc: EncoderInfo | None, s3_endpoint: str | None, what: str = "queries") -> np.ndarray:
    """Given queries: vectors (.npy, or a Parquet vector column) or texts, encoded by the index's encoder
    enc; what: the option that named the file, for errors."""
    if path.endswith(".npy"):
        xq = load_npy(path, "--" + what.replace("_", "-"))
    elif path.endswith(".parquet"):
        t = _query_table(path, s3_endpoint, what)
        if "vector" in t.column_names:
            xq = _vector_column(t, path, what)
        elif "text" in t.column_names:
            return _encode(t.column("text").to_pylist(), enc, path, what)
        else:
            raise ConfigError(f"{what}: {path} has neither a 'vector' nor a 'text' column")
    else:
        try:
            with open(path, encoding="utf-8") as f:
                return _encode([line.strip() for line in f if line.strip()], enc, path, what)
        except UnicodeDecodeError:
            raise ConfigError(f"{what}: {path} is not UTF-8 text; give .npy vectors, a .parquet file with a "
                              f"'vector' or 'text' column, or text with one query a line") from None
    xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
    if xq.shape[1] != enc.dim:
        raise ConfigError(f"{what}: {path} holds vectors of dimension {xq.shape[1]}, the index has {enc.dim}")
    if not np.isfinite(xq).all():
        row = int(np.flatnonzero(~np.isfinite(xq).all(1))[0])
        raise ConfigError(f"{what}: {path}: query {row} holds NaN or infinite values")
    return xq


def _query_table(path: str, s3_endpoint: str | None, what: str):
    import pyarrow as pa

    try:
        return Store(os.path.dirname(path) or ".", s3_endpoint).read_table(os.path.basename(path))
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{what}: {path}: not a readable Parquet file ({first_line(e)}); give a .parquet "
                          f"file with a 'vector' or 'text' column") from None


def _vector_column(t, path: str, what: str) -> np.ndarray:
    """A Parquet 'vector' column of number lists as [n, d] (all rows of one length)."""
    col = t.column("vector").combine_chunks()
    try:
        return col.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)
    except (AttributeError, ValueError, TypeError):
        raise ConfigError(f"{what}: {path}: its 'vector' column ({col.type}) is not lists of numbers of one "
                          f"length; write each query as a list<float32> of the index's dimension") from None


def _encode(texts: list[str], enc: EncoderInfo, path: str, what: str) -> np.ndarray:
    if not texts:
        raise ConfigError(f"{what}: {path} holds no queries")
    if enc.name == "precomputed":
        raise ConfigError(f"{what}: {path} holds text, but this index was built from precomputed vectors "
                          f"with no encoder; give a .npy file of query vectors")
    from shards.encoder import Encoder

    return Encoder.for_index(enc).encode_queries(texts)

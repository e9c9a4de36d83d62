"""encode: turn each input shard into an embeddings part, a docs part and (skip mode) a rejects part.

Layout under INDEX_ROOT/embeddings/<fp>/ (fp: corpus + encoder + columns):
  part-N.parquet           (id int64, vector fixed_size_list<float32>[d])   written last: the commit
  docs/part-N.parquet      (id, [source_id], stored fields), sorted by id
  docs/part-N.parquet.json its sha256 and bytes, from the bytes written (a version refers to the part by them)
  rejected/part-N.parquet  (file, row, id, reason) for rows that were quarantined

A part whose part-N.parquet exists is finished and never redone: every write is
atomic, so a killed run leaves only whole files behind.

Why an actor pool and not Ray Data: each part must commit as one unit for the
exactly-once guarantee, and one part's rows fit in memory, so a plain pool of
long-lived actors (the model loads once per actor) with one queue of parts is
the simplest design that keeps the devices busy.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index_builder.config import BuildConfig
from index_builder.encode.reuse import CHANGED, HASH, NEW, Reuse, fill, match, origin_column, text_hashes, vector_hashes
from index_builder.plan.corpus import InputShard, int_ids, open_parquet, read_error
from shards.errors import CorpusError
from shards.storage.refine import vectors_of
from shards.storage.store import Store


@dataclass
class PartResult:
    part: int
    key: str           # its file's name: part-<key>.parquet (InputShard.key)
    rows: int          # valid documents written
    rejected: int      # rows quarantined (including the id check's)
    seconds: float
    reused: bool
    tokens: int = 0           # real tokens encoded
    padded: int = 0           # tokens computed, padding included (length-sorted batches)
    padded_unsorted: int = 0  # what input-order batches would have computed
    encoded: int = 0          # texts the encoder was given (a reindex gives it only new and changed ones)
    new: int = 0              # reindex: documents not in the live version
    changed: int = 0          # reindex: live documents whose encoded column changed
    docs: dict | None = None  # the docs part's {"sha256", "bytes"} (its .json record), when the layout has docs
    kept: bool = False        # reindex: the live version's own part (its file unchanged), taken unread

    @property
    def name(self) -> int | str:
        """What its files are named by (part_rel): the key, or the number when it has none."""
        return self.key or self.part


def part_name(name: int | str) -> str:
    """part-<key>.parquet for a key, part-NNNNN.parquet for a number (shardex encode's, older builds')."""
    return f"part-{name:05d}.parquet" if isinstance(name, int) else f"part-{name}.parquet"


def part_key(rel: str) -> str | None:
    """The key a part is named by (part_name's inverse), None for a numbered part."""
    name = rel.rsplit("/", 1)[-1].removeprefix("part-").removesuffix(".parquet")
    return None if name.isdigit() else name


def part_rel(fp: str, name: int | str, kind: str = "") -> str:
    sub = f"{kind}/" if kind else ""
    return f"embeddings/{fp}/{sub}{part_name(name)}"


@dataclass(frozen=True)
class Layout:
    """Where one part's files go. build: embeddings/<fp>/ with docs/ and rejected/ beside the
    vectors. `shardex encode`: part files at the top of EMBEDDINGS_URI holding the source's
    own id and the stored fields next to the vector, so `build --vector-column vector` reads
    them as a corpus; rejects under _rejected/, which corpus readers skip."""

    prefix: str
    docs: str | None = "docs/"
    rejected: str = "rejected/"
    keyed: bool = True   # parts named by their source's key (build), or by number (shardex encode)

    @classmethod
    def build(cls, fp: str) -> Layout:
        return cls(f"embeddings/{fp}/")

    @classmethod
    def flat(cls) -> Layout:
        return cls("", None, "_rejected/", keyed=False)

    def rel(self, shard: InputShard, sub: str = "") -> str:
        return f"{self.prefix}{sub}{part_name(shard.key if self.keyed and shard.key else shard.part)}"


def read_shard(shard: InputShard, columns: list[str], s3_endpoint: str | None) -> pa.Table:
    """Rows [start, stop) of the shard's file, reading only the row groups that hold them."""
    f = open_parquet(shard.file, s3_endpoint)
    md = f.metadata
    groups, first, pos = [], None, 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if pos + n > shard.start and pos < shard.stop:
            groups.append(g)
            first = pos if first is None else first
        pos += n
    try:
        t = f.read_row_groups(groups, columns=columns)
    except Exception as e:  # noqa: BLE001 - read_error sorts it: storage, corrupt, or as it is
        raise read_error(shard.file, e, f": rows {shard.start}-{shard.stop}") from None
    t = t.slice(shard.start - (first or 0), shard.rows)
    return t.append_column("__row", pa.array(np.arange(shard.start, shard.stop, dtype=np.int64)))


def _text_problems(col: pa.ChunkedArray) -> np.ndarray:
    """A reason per row, '' where the text is fine."""
    null = col.is_null().to_numpy(zero_copy_only=False)
    empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(col), ""), False).to_numpy(zero_copy_only=False)
    return np.where(null, "null text", np.where(empty, "empty text", "")).astype(object)


def _vector_problems(col: pa.ChunkedArray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(reason per row, float32 matrix with zeros in rejected rows)."""
    col = col.combine_chunks()
    if _dense(col, dim):  # every row dim float32 values, none null: read as they are, without a copy
        x = col.flatten().to_numpy().reshape(-1, dim)
        why = np.full(len(col), "", dtype=object)
        why[~np.isfinite(x).all(axis=1)] = "vector has NaN or inf"
        return why, x
    null = col.is_null().to_numpy(zero_copy_only=False)
    lens = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
    bad_dim = ~null & (lens != dim)
    why = np.full(len(col), "", dtype=object)
    why[null] = "null vector"
    for i in np.flatnonzero(bad_dim):
        why[i] = f"vector has {lens[i]} values, expected {dim}"
    ok = ~null & ~bad_dim
    x = np.zeros((len(col), dim), dtype=np.float32)
    if ok.any():
        vals = pc.list_flatten(col.filter(pa.array(ok))).to_numpy(zero_copy_only=False)
        x[ok] = vals.astype(np.float32).reshape(-1, dim)
    why[ok & ~np.isfinite(x).all(axis=1)] = "vector has NaN or inf"
    return why, x


def _dense(col: pa.Array, dim: int) -> bool:
    t = col.type
    return (pa.types.is_fixed_size_list(t) and t.list_size == dim and pa.types.is_float32(t.value_type)
            and col.null_count == 0 and col.flatten().null_count == 0)


def prepare(shard: InputShard, cfg: BuildConfig, layout: Layout, dim: int | None, kind: str,
            encode=None, reuse: Reuse | None = None) -> PartResult:
    """One input shard -> its committed part. encode: texts -> float32 vectors, None for a vector column.
    reuse (a reindex): the live parts to take unchanged documents' vectors from; only the rest is encoded."""
    t0 = time.time()
    store = Store(cfg.index_root, cfg.s3_endpoint)
    emb = layout.rel(shard)
    if store.exists(emb):
        n = _num_rows(store, emb)
        rej = _num_rows(store, layout.rel(shard, layout.rejected))
        docs = docs_record(store, layout.rel(shard, layout.docs)) if layout.docs else None
        return PartResult(shard.part, shard.key, n, rej, 0.0, True, **_origin_counts(store, emb, reuse), docs=docs)

    data_col = cfg.vector_column or cfg.text_column
    cols = list(dict.fromkeys([cfg.id_column, data_col, *cfg.stored_fields]))
    t = read_shard(shard, cols, cfg.s3_endpoint)
    rows = t.column("__row").to_numpy()
    why = np.full(len(t), "", dtype=object)
    for r, reason in shard.drops:
        why[r - shard.start] = reason
    if cfg.vector_column:
        vwhy, x = _vector_problems(t.column(data_col), dim)
    else:
        vwhy, x = _text_problems(t.column(data_col)), None
    why = np.where(why == "", vwhy, why)
    bad = why != ""
    if bad.any() and cfg.bad_rows == "error":
        i = int(np.flatnonzero(bad)[0])
        raise CorpusError(f"{shard.file} row {rows[i]}: {why[i]} (column {data_col!r}); "
                          "fix the row, or pass --bad-rows skip to quarantine it")
    good = t.filter(pa.array(~bad)) if bad.any() else t
    ids = int_ids(good.column(cfg.id_column), kind)
    texts = None if cfg.vector_column else good.column(data_col).to_pylist()
    if cfg.vector_column and bad.any():
        x = x[~bad]
    h = vector_hashes(x) if cfg.vector_column else text_hashes(texts)
    m = match(store, reuse, ids, h) if reuse is not None else None
    if not cfg.vector_column:
        x = fill(m, texts, encode) if m is not None else encode(texts)
    if bad.any():
        store.write_table(layout.rel(shard, layout.rejected),
                          _rejects(t.filter(pa.array(bad)), shard, cfg, why[bad]))
    if layout.docs:
        docs = write_docs(store, layout.rel(shard, layout.docs), _docs(good, ids, cfg, kind))
        out = vectors_table(ids, x, {HASH: pa.array(h, pa.int64()), **(origin_column(m.origin) if m else {})})
    else:  # the source's own ids and the stored fields travel with the vectors
        out = vectors_table(good.column(cfg.id_column), x, {f: good.column(f) for f in cfg.stored_fields})
    store.write_table(emb, out, row_group_size=group_rows(x.shape[1]))  # last: its presence marks the part done
    counts = {"new": int((m.origin == NEW).sum()), "changed": int((m.origin == CHANGED).sum())} if m else {}
    return PartResult(shard.part, shard.key, len(ids), int(bad.sum()), time.time() - t0, False, **counts,
                      docs=docs if layout.docs else None)


def write_docs(store: Store, rel: str, table: pa.Table) -> dict:
    """A docs part, then its record beside it: sha256 and bytes of what was written, so that no one
    reads the part back to hash it (a version refers to it as it is)."""
    w = store.write_table(rel, table)
    rec = {"sha256": w.sha256, "bytes": w.bytes}
    store.write_text(f"{rel}.json", json.dumps(rec))
    return rec


def docs_record(store: Store, rel: str) -> dict | None:
    """A docs part's record; one written before records were kept is hashed once, here, and recorded."""
    try:
        return json.loads(store.read_text(f"{rel}.json"))
    except FileNotFoundError:
        if not store.exists(rel):
            return None
    rec = {"sha256": store.sha256(rel), "bytes": store.size(rel)}
    store.write_text(f"{rel}.json", json.dumps(rec))
    return rec


def _origin_counts(store: Store, rel: str, reuse: Reuse | None) -> dict:
    """new/changed of a part a killed reindex already wrote (from its origin column)."""
    if reuse is None:
        return {}
    o = store.read_table(rel, columns=["origin"]).column("origin").to_numpy()
    return {"new": int((o == NEW).sum()), "changed": int((o == CHANGED).sum())}


def _num_rows(store: Store, rel: str) -> int:
    if not store.exists(rel):
        return 0
    import pyarrow.parquet as pq

    with store.open(rel) as f:
        return pq.ParquetFile(f).metadata.num_rows


def vectors_table(ids, x: np.ndarray, fields: dict | None = None) -> pa.Table:
    """(id, vector fixed_size_list<float32>[d], *fields); ids: int64 array, or the source's id column."""
    d = x.shape[1]
    vec = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x, dtype=np.float32).ravel()), d)
    ids = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, pa.int64())
    return pa.table({"id": ids, "vector": vec, **(fields or {})})


ROW_GROUP_BYTES = 1 << 20  # of vectors per row group: what a sampler or a row range reads beyond its rows


def group_rows(d: int) -> int:
    """Rows per row group of an embeddings part: the power of two (at least 64) that keeps a group's
    vectors near ROW_GROUP_BYTES, so reading a few rows costs about a MiB, not the whole part."""
    return max(64, 1 << max(0, (ROW_GROUP_BYTES // (4 * max(d, 1))).bit_length() - 1))


VECTOR_COLUMNS = ["id", "vector"]


def open_part(store: Store, rel: str):
    """An embeddings part, opened for pq.ParquetFile (use it in a with). On S3 it reads no more than each
    range pyarrow asks for: s3fs's default read-ahead would fetch tens of MiB around a 1 MiB row group."""
    return store.open(rel, "rb", **({} if store.local else {"cache_type": "none"}))


def group_bounds(md) -> np.ndarray:
    """Row offsets of a Parquet file's row groups: group g holds rows [b[g], b[g + 1])."""
    return np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])


def group_bytes(md, groups, columns=VECTOR_COLUMNS) -> int:
    """Compressed bytes of those row groups' chunks of columns, from the footer: what reading them costs."""
    total = 0
    for g in groups:
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            if rg.column(c).path_in_schema.split(".")[0] in columns:
                total += rg.column(c).total_compressed_size
    return total


def read_groups(f, groups) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, x float32 [n, d]) of the given row groups of an open embeddings part, in file order."""
    return vectors_of(f.read_row_groups(sorted(groups), columns=VECTOR_COLUMNS))


def read_vectors(store: Store, rel: str, start: int | None = None,
                 stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, x float32 [n, d]) of rows [start, stop) of one embeddings part (all by default),
    reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    with open_part(store, rel) as fh:
        return _rows(pq.ParquetFile(fh), start, stop)


def read_origin(store: Store, rel: str, start: int, stop: int) -> np.ndarray:
    """The origin column (reuse.KEPT / NEW / CHANGED) of rows [start, stop) of a reindexed part."""
    return store.read_table(rel, columns=["origin"]).column("origin").to_numpy()[start:stop]


def _rows(f, start: int | None, stop: int | None) -> tuple[np.ndarray, np.ndarray]:
    b = group_bounds(f.metadata)
    n = int(b[-1])
    start, stop = max(0, start or 0), n if stop is None else min(stop, n)
    if start == 0 and stop == n:
        return vectors_of(f.read(columns=VECTOR_COLUMNS))
    if start >= stop:  # an empty range: no group to read, but the part's d
        return np.empty(0, np.int64), np.empty((0, f.schema_arrow.field("vector").type.list_size), np.float32)
    g0, g1 = int(np.searchsorted(b, start, "right")) - 1, int(np.searchsorted(b, stop, "left"))
    ids, x = read_groups(f, range(g0, g1))
    return ids[start - b[g0]:stop - b[g0]], x[start - b[g0]:stop - b[g0]]


def _docs(good: pa.Table, ids: np.ndarray, cfg: BuildConfig, kind: str) -> pa.Table:
    cols = {"id": pa.array(ids, pa.int64())}
    if kind == "str":
        cols["source_id"] = good.column(cfg.id_column)
    for f in cfg.stored_fields:
        cols[f] = good.column(f)
    return pa.table(cols).sort_by("id")  # sorted: row-group statistics let lookups skip most groups


def _rejects(bad: pa.Table, shard: InputShard, cfg: BuildConfig, why: np.ndarray) -> pa.Table:
    n = len(bad)
    return pa.table({
        "file": pa.array([shard.file] * n),
        "row": bad.column("__row"),
        "id": pc.cast(bad.column(cfg.id_column), pa.string()),
        "reason": pa.array(list(why), pa.string()),
    })

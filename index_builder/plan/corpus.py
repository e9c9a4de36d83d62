"""plan: find the corpus files, check their schema, validate ids, and split into input shards.

An input shard is a row range [start, stop) of one Parquet file: the unit of encode
and add work. Ids are checked for the whole corpus here (only the id column is
read), because a duplicate can only be seen across files. Also the readers of the other input
files a user gives: query vectors (.npy) for search --vectors and eval --queries.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index_builder.config import BuildConfig
from shards.errors import (
    ConfigError,
    CorpusError,
    ShardexError,
    StorageError,
    is_storage_failure,
    storage_fix,
    storage_message,
)
from shards.storage.store import storage_options

ID_MASK = (1 << 63) - 1  # string ids map to non-negative int64 (faiss uses -1 for "no result")


@dataclass(frozen=True)
class InputShard:
    part: int          # part number: embeddings/<fp>/part-<part>.parquet
    file: str          # full URI of the Parquet file
    start: int         # first row (0-based, within the file)
    stop: int          # one past the last row
    drops: tuple = ()  # (row, reason) for rows rejected by the id check (--bad-rows skip)

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class Corpus:
    files: list[str]
    rows: list[int]                      # rows per file
    id_kind: str                         # "int" or "str"
    dim: int | None                      # vector dim, when the corpus has a vector column
    fingerprint: str
    shards: list[InputShard] = field(default_factory=list)
    rejected_ids: int = 0

    @property
    def total_rows(self) -> int:
        return sum(self.rows)


def open_fs(uri: str, s3_endpoint: str | None):
    import fsspec

    opts = storage_options(s3_endpoint) if uri.startswith("s3://") else {}
    fs, path = fsspec.core.url_to_fs(uri, **opts)
    return fs, path


def _uri(fs, path: str) -> str:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if proto in ("file", "local") else f"{proto}://{path}"


def list_files(source: str, s3_endpoint: str | None = None) -> list[str]:
    """A Parquet file, a directory of them (recursive) or a glob -> sorted URIs."""
    try:
        return _list_files(source, s3_endpoint)
    except (ShardexError, FileNotFoundError):
        raise
    except Exception as e:
        if not is_storage_failure(e):
            raise
        raise StorageError(f"{source}: cannot list it ({storage_message(e)}); {storage_fix(e)}") from None


def _list_files(source: str, s3_endpoint: str | None) -> list[str]:
    fs, path = open_fs(source, s3_endpoint)
    if any(c in path for c in "*?["):
        paths = fs.glob(path)
    elif fs.isdir(path):
        # Hidden and underscore names (_rejected/, _SUCCESS, .tmp files) are not data, as in Spark and pyarrow.
        paths = [p for p in fs.find(path) if p.endswith(".parquet")
                 and not any(c.startswith(("_", ".")) for c in p[len(path.rstrip("/")) + 1:].split("/"))]
    elif fs.exists(path):
        paths = [path]
    else:
        raise CorpusError(f"{source}: no such file or directory")
    paths = sorted(p for p in paths if not fs.isdir(p))
    if not paths:
        raise CorpusError(f"{source}: empty corpus: no Parquet files found")
    return [_uri(fs, p) for p in paths]


def open_parquet(uri: str, s3_endpoint: str | None) -> pq.ParquetFile:
    fs, path = open_fs(uri, s3_endpoint)
    try:
        return pq.ParquetFile(fs.open(path, "rb"))
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{uri}: not a readable Parquet file ({first_line(e)})") from None


def read_columns(uri: str, f: pq.ParquetFile, columns: list[str], group: int | None = None) -> pa.Table:
    """Read columns (of one row group), naming the file when its data pages are corrupt."""
    try:
        return f.read(columns=columns) if group is None else f.read_row_group(group, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        where = "" if group is None else f" row group {group}"
        raise CorpusError(f"{uri}{where}: not a readable Parquet file ({first_line(e)})") from None


def first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _check_schema(uri: str, schema: pa.Schema, cfg: BuildConfig) -> str:
    """Raise naming the column unless the file has what the config needs; return the id kind."""
    names = set(schema.names)
    need = [cfg.id_column, cfg.vector_column or cfg.text_column, *cfg.stored_fields]
    for col in need:
        if col not in names:
            flag = "--id-column" if col == cfg.id_column else (
                "--vector-column" if col == cfg.vector_column else (
                    "--text-column" if col == cfg.text_column else "--fields"))
            raise CorpusError(f"{uri}: no column {col!r} (columns: {', '.join(schema.names)}); set {flag}")
    t = schema.field(cfg.id_column).type
    if pa.types.is_integer(t):
        kind = "int"
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        kind = "str"
    else:
        raise CorpusError(f"{uri}: id column {cfg.id_column!r} has type {t}; ids must be integers or strings")
    if cfg.vector_column:
        vt = schema.field(cfg.vector_column).type
        ok = (pa.types.is_list(vt) or pa.types.is_large_list(vt) or pa.types.is_fixed_size_list(vt)) \
            and (pa.types.is_floating(vt.value_type) or pa.types.is_integer(vt.value_type))
        if not ok:
            raise CorpusError(f"{uri}: vector column {cfg.vector_column!r} has type {vt}; "
                              "expected list<float> or fixed_size_list<float>")
    else:
        tt = schema.field(cfg.text_column).type
        if not (pa.types.is_string(tt) or pa.types.is_large_string(tt)):
            raise CorpusError(f"{uri}: text column {cfg.text_column!r} has type {tt}; expected string")
    return kind


def string_ids(values) -> np.ndarray:
    """Stable int64 ids for string ids: the first 8 bytes of blake2b, top bit cleared."""
    out = np.empty(len(values), dtype=np.int64)
    for i, s in enumerate(values):
        h = hashlib.blake2b(s.encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") & ID_MASK
    return out


def int_ids(col: pa.ChunkedArray | pa.Array, kind: str) -> np.ndarray:
    """The int64 ids of a column (nulls must be removed first)."""
    if kind == "str":
        return string_ids(col.to_pylist())
    return np.asarray(col.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


def _infer_dim(uri: str, f: pq.ParquetFile, col: str) -> int | None:
    t = f.schema_arrow.field(col).type
    if pa.types.is_fixed_size_list(t):
        return t.list_size
    for i in range(f.num_row_groups):
        for v in read_columns(uri, f, [col], i).column(0).to_pylist():
            if v is not None:
                return len(v)
    return None


def split_rows(n: int, part_rows: int) -> list[tuple[int, int]]:
    """[0, n) into near-equal ranges of at most part_rows rows."""
    if n == 0:
        return []
    k = -(-n // part_rows)
    bounds = np.linspace(0, n, k + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def fingerprint(files: list[str], s3_endpoint: str | None, *extra) -> str:
    """A hash of each file's name, size and version stamp (mtime or ETag), plus extra settings."""
    h = hashlib.sha256(repr(extra).encode())
    for uri in files:
        fs, path = open_fs(uri, s3_endpoint)
        info = fs.info(path)
        stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified")
        h.update(f"{uri}\0{info.get('size')}\0{stamp}\n".encode())
    return h.hexdigest()[:16]


def plan_corpus(cfg: BuildConfig) -> Corpus:
    """Validate the corpus schema and ids, and split it into input shards."""
    files = list_files(cfg.source, cfg.s3_endpoint)
    rows, kinds, dim = [], set(), cfg.dim
    for uri in files:
        f = open_parquet(uri, cfg.s3_endpoint)
        kinds.add(_check_schema(uri, f.schema_arrow, cfg))
        rows.append(f.metadata.num_rows)
        if cfg.vector_column and dim is None:
            dim = _infer_dim(uri, f, cfg.vector_column)
    if len(kinds) > 1:
        raise CorpusError(f"{cfg.source}: id column {cfg.id_column!r} is an integer in some files "
                          "and a string in others; use one type")
    if sum(rows) == 0:
        raise CorpusError(f"{cfg.source}: empty corpus: {len(files)} file(s), 0 rows")
    kind = kinds.pop()
    drops = check_ids(files, cfg, kind)
    fp = fingerprint(files, cfg.s3_endpoint, cfg.id_column, cfg.text_column, cfg.vector_column,
                     cfg.stored_fields, cfg.bad_rows, cfg.part_rows)
    corpus = Corpus(files, rows, kind, dim, fp, rejected_ids=sum(len(d) for d in drops.values()))
    for uri, n in zip(files, rows):
        for a, b in split_rows(n, cfg.part_rows):
            d = tuple((r, why) for r, why in drops.get(uri, []) if a <= r < b)
            corpus.shards.append(InputShard(len(corpus.shards), uri, a, b, d))
    return corpus


def check_ids(files: list[str], cfg: BuildConfig, kind: str) -> dict[str, list[tuple[int, str]]]:
    """Null and duplicate ids. Raise naming file and row, or (skip) return the rows to drop."""
    drops: dict[str, list[tuple[int, str]]] = {}
    ids, where = [], []  # int64 ids, and (file index, row) of each
    for fi, uri in enumerate(files):
        col = read_columns(uri, open_parquet(uri, cfg.s3_endpoint), [cfg.id_column]).column(0)
        valid = col.is_valid().to_numpy(zero_copy_only=False)
        for r in np.flatnonzero(~valid):
            _reject(cfg, drops, uri, int(r), "null id")
        out = out_of_range(col, kind)
        for r in np.flatnonzero(out):
            _reject(cfg, drops, uri, int(r), f"id {col[int(r)].as_py()} out of range: integer ids must be 0 to 2**63-1 "
                    "(faiss's -1 means no result); map them into that range or give string ids")
        valid &= ~out
        rows = np.flatnonzero(valid)
        ids.append(int_ids(col.filter(pa.array(valid)), kind))
        where.append(np.stack([np.full(len(rows), fi), rows], axis=1))
    ids = np.concatenate(ids)
    where = np.concatenate(where) if where else np.empty((0, 2), dtype=np.int64)
    order = np.argsort(ids, kind="stable")  # stable: the first occurrence in file order is kept
    s = ids[order]
    dup = np.flatnonzero(s[1:] == s[:-1]) + 1
    for j in dup:
        first = order[np.searchsorted(s, s[j])]
        fi, r = where[order[j]]
        f0, r0 = where[first]
        what = "duplicate id" if kind == "int" else "duplicate id (or a hash collision of two string ids)"
        _reject(cfg, drops, files[fi], int(r), f"{what} {ids[order[j]]}, first at {files[f0]} row {r0}")
    return drops


def out_of_range(col: pa.ChunkedArray, kind: str) -> np.ndarray:
    """The rows whose integer id faiss cannot hold: negative (its -1 is "no result", so such a document
    would never be found) or above int64's range (uint64). False for nulls and string ids."""
    import pyarrow.compute as pc

    if kind != "int":
        return np.zeros(len(col), dtype=bool)
    t = col.type
    if pa.types.is_unsigned_integer(t):
        bad = pc.greater(col, pa.scalar(ID_MASK, t)) if t.bit_width == 64 else pc.less(col, pa.scalar(0, t))
    else:
        bad = pc.less(col, pa.scalar(0, t))
    return bad.fill_null(False).to_numpy(zero_copy_only=False)


def _reject(cfg: BuildConfig, drops: dict, uri: str, row: int, why: str) -> None:
    if cfg.bad_rows == "error":
        raise CorpusError(f"{uri} row {row}: {why} (column {cfg.id_column!r}); "
                          "fix the row, or pass --bad-rows skip to quarantine it")
    drops.setdefault(uri, []).append((row, why))


NPY_FIX = "write it with numpy.save(path, x), x a float array of shape [n, d]"


def load_npy(path: str, option: str) -> np.ndarray:
    """The float32 vectors of a .npy file given as `option` (--vectors, --queries): shape [n, d], or
    one vector [d]. A missing, empty, truncated or foreign file, or an array of something other
    than numbers, is one ConfigError naming the option and the file. The dimension is the index's
    to check (Router.vectors, eval)."""
    where = f"{option} {path}"
    try:
        x = np.load(path, allow_pickle=False)
    except OSError as e:
        raise ConfigError(f"{where}: {e.strerror or first_line(e)}; give a .npy file of query vectors") from None
    except (ValueError, EOFError) as e:  # empty, truncated, or not .npy (np.load then refuses to unpickle)
        why = "no .npy header" if "pickle" in str(e) else first_line(e)
        raise ConfigError(f"{where}: not a readable .npy array ({why}); {NPY_FIX}") from None
    if not isinstance(x, np.ndarray):  # a .npz archive
        x.close()
        raise ConfigError(f"{where}: a .npz archive of several arrays, not one .npy array; {NPY_FIX}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ConfigError(f"{where}: holds {x.dtype} values, not real numbers; {NPY_FIX}")
    if x.ndim not in (1, 2) or not x.size:
        raise ConfigError(f"{where}: an array of shape {x.shape}, not [n, d] vectors; {NPY_FIX}")
    return np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)

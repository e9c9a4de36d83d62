"""plan: find the corpus files, check their schema, validate ids, and split into input shards.

An input shard is a row range [start, stop) of one Parquet file: the unit of encode
and add work. Ids are checked for the whole corpus (only the id column is read), because a
duplicate can only be seen across files: plan/ids.py, in tasks over hash buckets of ids. Footers
(schema, rows, version stamp) are read in tasks over batches of files. A corpus of up to
LOCAL_FILES files and LOCAL_ROWS rows is planned in this process instead, before any Ray starts.
Also the readers of the other input files a user gives: query vectors (.npy) for search
--vectors and eval --queries.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index_builder.config import BuildConfig, env_count
from index_builder.plan import known
from index_builder.plan.ids import ID_MASK, check_ids, int_ids, out_of_range, remote, string_ids  # noqa: F401
from shards.errors import (
    ConfigError,
    CorpusError,
    ShardexError,
    StorageError,
    is_storage_failure,
    is_transient,
    storage_fix,
    storage_message,
    transient,
)
from shards.raytools import ensure_ray, ray_get
from shards.storage.store import filesystem

# Up to this many files and rows the plan runs in this process: a bad small corpus fails in a second,
# and no Ray starts for it. $SHARDEX_PLAN_LOCAL_FILES / $SHARDEX_PLAN_LOCAL_ROWS override them.
LOCAL_FILES = 32
LOCAL_ROWS = 1_000_000
FOOTER_FILES = 64  # files per footer task: each read costs a round trip or two, not bytes


@dataclass(frozen=True)
class InputShard:
    part: int          # its place in the corpus (shardex encode names its output part-<part>.parquet)
    file: str          # full URI of the Parquet file
    start: int         # first row (0-based, within the file)
    stop: int          # one past the last row
    drops: tuple = ()  # (row, reason) for rows rejected by the id check (--bad-rows skip)
    key: str = ""      # the source's identity (file, size, ETag or mtime, rows, drops): its embeddings
                       # part is embeddings/<fp>/part-<key>.parquet, so a file that did not change keeps it

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
    columns: str = ""                    # a hash of what a part holds besides its rows (columns, policies)
    ids_read: int = 0                    # rows whose id the id check read (a reindex skips unchanged files')

    @property
    def total_rows(self) -> int:
        return sum(self.rows)


def open_fs(uri: str, s3_endpoint: str | None):
    return filesystem(uri, s3_endpoint)


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
    except Exception as e:  # noqa: BLE001 - read_error sorts it: storage, corrupt, or as it is
        raise read_error(uri, e) from None


def read_columns(uri: str, f: pq.ParquetFile, columns: list[str], group: int | None = None) -> pa.Table:
    """Read columns (of one row group), naming the file when its data pages are corrupt."""
    try:
        return f.read(columns=columns) if group is None else f.read_row_group(group, columns=columns)
    except Exception as e:  # noqa: BLE001 - read_error sorts it: storage, corrupt, or as it is
        raise read_error(uri, e, "" if group is None else f" row group {group}") from None


def read_error(uri: str, e: Exception, where: str = "") -> Exception:
    """What to raise for e, met reading the Parquet file uri: a storage request that kept failing
    for a passing reason is not a corrupt file (TransientStorageError, which tasks retry); a missing
    or denied object is a StorageError; what pyarrow could not decode is a CorpusError."""
    if isinstance(e, ShardexError):
        return e
    if is_transient(e):
        return transient(f"{uri}{where}", e)
    if isinstance(e, (FileNotFoundError, PermissionError)) or (is_storage_failure(e) and not isinstance(e, OSError)):
        return StorageError(f"{uri}{where}: cannot read it ({storage_message(e)}); {storage_fix(e)}")
    if isinstance(e, (pa.ArrowException, OSError, ValueError)):  # pyarrow's decoding errors are these
        return CorpusError(f"{uri}{where}: not a readable Parquet file ({first_line(e)})")
    return e


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


def stamp(uri: str, s3_endpoint: str | None) -> str:
    """A file's line in the fingerprint: its name, size and version stamp (mtime or ETag)."""
    fs, path = open_fs(uri, s3_endpoint)
    info = fs.info(path)
    v = info.get("ETag") or info.get("mtime") or info.get("LastModified")
    return f"{uri}\0{info.get('size')}\0{v}\n"


def fingerprint(stamps: list[str], *extra) -> str:
    """A hash of the files' stamps, plus extra settings."""
    h = hashlib.sha256(repr(extra).encode())
    for line in stamps:
        h.update(line.encode())
    return h.hexdigest()[:16]


def on_ray(files: int, rows: int = 0) -> bool:
    """Whether the plan's work goes to Ray tasks: above LOCAL_FILES files or LOCAL_ROWS rows."""
    return (files > env_count("SHARDEX_PLAN_LOCAL_FILES", LOCAL_FILES)
            or rows > env_count("SHARDEX_PLAN_LOCAL_ROWS", LOCAL_ROWS))


def id_column(uri: str, cfg: BuildConfig, groups: list[int] | None = None) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """A file's id column, read on its own, and the rows it holds (None: every row, in order); groups:
    only those row groups."""
    f = open_parquet(uri, cfg.s3_endpoint)
    if groups is None:
        return read_columns(uri, f, [cfg.id_column]).column(0), None
    md, at = f.metadata, np.cumsum([0] + [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)])
    cols = [read_columns(uri, f, [cfg.id_column], g).column(0) for g in groups]
    rows = [np.arange(at[g], at[g] + md.row_group(g).num_rows) for g in groups]
    return (pa.chunked_array([c for col in cols for c in col.chunks], f.schema_arrow.field(cfg.id_column).type),
            np.concatenate(rows) if rows else np.empty(0, np.int64))


def footers(files: list[str], cfg: BuildConfig) -> list[tuple[str, int, str, list]]:
    """(id kind, rows, stamp, id ranges) of each file, its schema checked: raise naming the first bad
    file. id ranges: per row group (rows, min id, max id), the ids None where the footer has no statistics."""
    out = []
    for uri in files:
        f = open_parquet(uri, cfg.s3_endpoint)
        out.append((_check_schema(uri, f.schema_arrow, cfg), f.metadata.num_rows, stamp(uri, cfg.s3_endpoint),
                    known.id_ranges(f.metadata, cfg.id_column)))
    return out


def read_footers(files: list[str], cfg: BuildConfig) -> list[tuple[str, int, str, list]]:
    """footers() of every file: here for a few files, else in tasks over batches of FOOTER_FILES."""
    if not on_ray(len(files)):
        return footers(files, cfg)
    ensure_ray()
    task = remote(footers).options(num_cpus=1)
    refs = [task.remote(files[i:i + FOOTER_FILES], cfg) for i in range(0, len(files), FOOTER_FILES)]
    return [x for r in refs for x in ray_get(r)]  # got in file order: the error is the first bad file's


def plan_corpus(cfg: BuildConfig, live_keys: set[str] | None = None) -> Corpus:
    """Validate the corpus schema and ids, and split it into input shards. live_keys (a reindex's):
    the keys of the live version's parts, whose unchanged files the id check reads only where their
    ids can meet a changed file's (plan/known.py)."""
    files = list_files(cfg.source, cfg.s3_endpoint)
    feet = read_footers(files, cfg)
    kinds, rows = {k for k, *_ in feet}, [n for _, n, *_ in feet]
    dim = cfg.dim
    for uri in files if cfg.vector_column and dim is None else []:  # the first file that shows it, in order
        if (dim := _infer_dim(uri, open_parquet(uri, cfg.s3_endpoint), cfg.vector_column)) is not None:
            break
    if len(kinds) > 1:
        raise CorpusError(f"{cfg.source}: id column {cfg.id_column!r} is an integer in some files "
                          "and a string in others; use one type")
    if sum(rows) == 0:
        raise CorpusError(f"{cfg.source}: empty corpus: {len(files)} file(s), 0 rows")
    kind = kinds.pop()
    groups, read = {}, rows
    if live_keys:
        same = [all(fingerprint([st], a, b, ()) in live_keys for a, b in split_rows(n, cfg.part_rows))
                for _, n, st, _ in feet]  # every part of the file is the live version's: the file is as it was
        groups = known.to_read([r for *_, r in feet], same)
        read = [sum(feet[fi][3][g][0] for g in groups[fi]) if fi in groups else n for fi, n in enumerate(rows)]
    drops = check_ids(files, read, cfg, kind, id_column, on_ray(len(files), sum(rows)), groups)
    cols = (cfg.id_column, cfg.text_column, cfg.vector_column, cfg.stored_fields, cfg.bad_rows, kind, dim)
    fp = fingerprint([st for _, _, st, _ in feet], *cols[:5], cfg.part_rows)
    corpus = Corpus(files, rows, kind, dim, fp, rejected_ids=sum(len(d) for d in drops.values()),
                    columns=fingerprint([], *cols), ids_read=sum(read))
    for (uri, n), (_, _, st, _) in zip(zip(files, rows), feet):
        for a, b in split_rows(n, cfg.part_rows):
            d = tuple((r, why) for r, why in drops.get(uri, []) if a <= r < b)
            corpus.shards.append(InputShard(len(corpus.shards), uri, a, b, d, fingerprint([st], a, b, d)))
    return corpus


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

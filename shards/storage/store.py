"""Any fsspec URI (a path, file://, s3://) as storage, with atomic writes.

Writes go to a temporary name and are renamed into place. On S3 a PUT is
already atomic, so the object is written under its final key directly: a
reader sees the old object or the new one, never half of one.
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import posixpath
import signal
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

from shards.errors import ConfigError, TransientStorageError, is_transient, transient

IO_RETRIES = 3          # attempts for one storage call before the error is raised
IO_RETRY_SLEEP_S = 0.5  # first back-off; doubled on each retry
# S3 requests: s3fs retries each one S3_ATTEMPTS times, waiting 0.1 s growing 1.7x (about 28 s in
# all), on connection errors (refused, reset, timed out), bodies cut mid-read and SlowDown; botocore's
# adaptive mode slows the client when throttled. botocore's own retries are off: they wait about 1 s
# on the first connection error and double from there, which at a bad minute costs more than the fault.
S3_ATTEMPTS = 10        # SHARDEX_S3_ATTEMPTS changes it
S3_TIMEOUTS = {"connect_timeout": 10, "read_timeout": 60}
CHUNK = 8 << 20         # bytes per read when hashing or copying

# Crash testing: SHARDEX_CRASH_AT=GLOB makes this process SIGKILL itself just before it writes a
# path (relative to the store's root) matching GLOB, e.g. 'CURRENT' or 'versions/*/manifest.json'.
# Read once and removed from the environment, so the Ray workers this process starts never inherit it.
CRASH_AT = os.environ.pop("SHARDEX_CRASH_AT", None)


def _crash_point(rel: str) -> None:
    if CRASH_AT and fnmatch.fnmatch(rel, CRASH_AT):
        os.kill(os.getpid(), signal.SIGKILL)
    _pause_point(rel)


# Node-loss testing: with SHARDEX_PAUSE_DIR=DIR, a process about to write a path matching the glob in
# DIR/at records itself (DIR/paused-<Ray node id>-<pid>-<n>, holding the path) and waits while DIR/hold
# exists, at most PAUSE_MAX_S: a test removes the node that holds a stage's task while it runs
# (tests/test_node_loss.py). Ray workers inherit it from the nodes' environment, unlike SHARDEX_CRASH_AT.
PAUSE_MAX_S = 120


def _pause_point(rel: str) -> None:
    d = os.environ.get("SHARDEX_PAUSE_DIR")
    if not d:
        return
    try:
        with open(os.path.join(d, "at")) as f:
            at = f.read().strip()
    except OSError:
        return
    if not fnmatch.fnmatch(rel, at):
        return
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "driver"
    with open(os.path.join(d, f"paused-{node}-{os.getpid()}-{uuid.uuid4().hex[:6]}"), "w") as f:
        f.write(rel)
    t0 = time.monotonic()
    while os.path.exists(os.path.join(d, "hold")) and time.monotonic() - t0 < PAUSE_MAX_S:
        time.sleep(0.05)


def resolve_endpoint(s3_endpoint: str | None = None) -> str | None:
    """The S3 endpoint: the one given, else AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) of this process."""
    return s3_endpoint or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")


def storage_options(s3_endpoint: str | None = None) -> dict:
    """fsspec options for s3://; the endpoint also comes from AWS_ENDPOINT_URL."""
    ep = resolve_endpoint(s3_endpoint)
    # No region_name in client_kwargs: moto and MinIO reject the signature with it.
    config = {"retries": {"total_max_attempts": 1, "mode": "adaptive"}, **S3_TIMEOUTS}
    return {"config_kwargs": config, **({"client_kwargs": {"endpoint_url": ep}} if ep else {})}


def filesystem(uri: str, s3_endpoint: str | None = None) -> tuple:
    """(fsspec filesystem, path) for a URI; on S3 with shardex's retries."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options(s3_endpoint) if uri.startswith("s3://") else {}))
    if uri.startswith("s3://"):
        _retry_connection_errors()
        fs.retries = s3_attempts()  # s3fs's own, around each request and each body read
    return fs, path


def s3_attempts() -> int:
    v = os.environ.get("SHARDEX_S3_ATTEMPTS", "")
    if not v:
        return S3_ATTEMPTS
    if not v.isdigit() or int(v) < 1:
        raise ConfigError(f"SHARDEX_S3_ATTEMPTS: {v!r} is not a whole number of attempts of at least 1")
    return int(v)


def _retry_connection_errors() -> None:
    """s3fs retries a reset or timed-out connection, not one refused or never made: add those."""
    import botocore.exceptions
    import s3fs.core

    if botocore.exceptions.ConnectionError not in s3fs.core.S3_RETRYABLE_ERRORS:
        s3fs.core.add_retryable_error(botocore.exceptions.ConnectionError)


def dictionary_columns(schema) -> list[str]:
    """The columns worth dictionary-encoding: strings, which repeat. Vectors, ids and hashes never do, and
    trying costs time on write and read and bytes on disk (bench/README.md has the figures)."""
    import pyarrow as pa

    text = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_dictionary)
    return [f.name for f in schema if any(t(f.type) for t in text)]


def compression_of(schema) -> dict[str, str]:
    """Per column: none for vectors (lists of floats), whose bits barely compress, zstd for the rest.
    zstd saved 9% of an embeddings part and made reading it 2.5x slower (0.050 s against 0.020 s for
    20,000 x 128), and it is read by every add and sample."""
    import pyarrow as pa

    def floats(t) -> bool:
        return pa.types.is_floating(t.value_type) if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) else False

    return {f.name: "none" if floats(f.type) else "zstd" for f in schema}


@dataclass(frozen=True)
class Written:
    """What a write put at its path: the sha256 and size of its bytes, computed from them as they
    were written, so the writer records them and nobody reads the file back to hash it."""

    sha256: str
    bytes: int


@dataclass
class Store:
    """A root URI plus the filesystem that serves it. Paths are relative to the root."""

    root: str
    s3_endpoint: str | None = None
    fs: object = field(init=False, repr=False)
    base: str = field(init=False)

    def __post_init__(self):
        self.root = self.root.rstrip("/") or "/"
        if self.root.startswith("s3://"):
            # Fixed here, on the creating process: Ray workers get it through __reduce__, as their
            # environment may lack the driver's AWS_ENDPOINT_URL.
            self.s3_endpoint = resolve_endpoint(self.s3_endpoint)
        self.fs, self.base = filesystem(self.root, self.s3_endpoint)
        self.local = "file" in _protocols(self.fs)

    def call(self, fn, path: str, *a, **kw):
        """fn(path, ...), tried again on an error that may pass: on local disk IO_RETRIES times; on S3,
        where s3fs retries each request S3_ATTEMPTS times, once more (a driver's call has no task retry
        behind it). One that kept failing for a passing reason (throttling, a refused, reset or timed-out
        connection) is a TransientStorageError naming the path, which Ray tasks retry; a missing object
        or denied access is raised at once, as it is."""
        delay, tries = IO_RETRY_SLEEP_S, IO_RETRIES if self.local else 2
        for attempt in range(tries):
            try:
                return fn(path, *a, **kw)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
                raise
            except Exception as e:
                if attempt == tries - 1 or not (isinstance(e, OSError) if self.local else is_transient(e)):
                    if is_transient(e):
                        raise transient(path if self.local else self.fs.unstrip_protocol(path), e) from e
                    raise
                time.sleep(delay)
                delay *= 2

    def __reduce__(self):  # Ray ships Stores to workers by URI, not by filesystem object
        return (Store, (self.root, self.s3_endpoint))

    def path(self, rel: str = "") -> str:
        return posixpath.join(self.base, rel) if rel else self.base

    def uri(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def child(self, rel: str) -> Store:
        return Store(self.uri(rel), self.s3_endpoint)

    def exists(self, rel: str) -> bool:
        return self.call(self.fs.exists, self.path(rel))

    def size(self, rel: str) -> int:
        return self.call(self.fs.size, self.path(rel))

    def ls(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under rel; [] when it does not exist."""
        p = self.path(rel)
        if not self.call(self.fs.exists, p):
            return []
        return sorted(posixpath.basename(x.rstrip("/")) for x in self.call(self.fs.ls, p, detail=False))

    @contextmanager
    def open(self, rel: str, mode: str = "rb", **kw):
        """The file rel, for a with block. A failure inside the block (opening, reading, writing) that
        kept failing for a passing reason is a TransientStorageError naming rel, which tasks retry."""
        try:
            with self.fs.open(self.path(rel), mode, **kw) as f:
                yield f
        except TransientStorageError:
            raise
        except Exception as e:
            if is_transient(e):
                raise transient(self.uri(rel), e) from e
            raise

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.call(self.fs.cat_file, self.path(rel))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(rel)}: not found") from None

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def sizes(self, rel: str = "") -> dict[str, int]:
        """{name: bytes} of the files directly under rel, from one listing; {} when it does not exist."""
        p = self.path(rel)
        self.fs.invalidate_cache(p)  # s3fs caches listings: another process (a task) may have written since
        if not self.call(self.fs.exists, p):
            return {}
        return {posixpath.basename(x["name"].rstrip("/")): int(x.get("size") or 0)
                for x in self.call(self.fs.ls, p, detail=True) if x.get("type") == "file"}

    def write_bytes(self, rel: str, data: bytes) -> Written:
        _crash_point(rel)
        p, done = self.path(rel), Written(hashlib.sha256(data).hexdigest(), len(data))
        if not self.local:
            self.call(self.fs.pipe_file, p, data)
            return done
        self.fs.makedirs(posixpath.dirname(p), exist_ok=True)
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        return done

    def write_text(self, rel: str, text: str) -> Written:
        return self.write_bytes(rel, text.encode())

    def write_table(self, rel: str, table, row_group_size: int | None = None) -> Written:
        """A pyarrow Table as one Parquet object, written atomically (row groups of at most
        row_group_size rows, when given, so a reader can fetch a few rows without the rest)."""
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf, compression=compression_of(table.schema),
                       use_dictionary=dictionary_columns(table.schema),
                       row_group_size=row_group_size)
        return self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str, columns=None):
        import pyarrow.parquet as pq

        with self.open(rel) as f:
            return pq.read_table(f, columns=columns)

    def copy(self, src_rel: str, dst_rel: str) -> None:
        """Copy within the store (server-side on S3); atomic at the destination."""
        _crash_point(dst_rel)
        src, dst = self.path(src_rel), self.path(dst_rel)
        if not self.local:
            self.call(self.fs.copy, src, dst)
            return
        self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        tmp = f"{dst}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            os.link(src, tmp)  # same filesystem: no bytes move
        except OSError:
            self.fs.copy(src, tmp)
        os.replace(tmp, dst)

    def rm(self, rel: str, recursive: bool = False) -> None:
        _crash_point(rel)  # a crash test may kill a prune just before one of its deletes
        p = self.path(rel)
        if self.call(self.fs.exists, p):
            self.call(self.fs.rm, p, recursive=recursive)

    def newest(self, rel: str) -> float | None:
        """The newest modification time (epoch seconds) of any file at or under rel; None when empty."""
        p = self.path(rel)
        if not self.call(self.fs.exists, p):
            return None
        found = self.call(self.fs.find, p, detail=True, withdirs=False)
        stamps = [_mtime(info) for info in found.values()]
        return max((t for t in stamps if t is not None), default=None)

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.open(rel) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def fetch(self, rel: str, local_dir: str) -> str:
        """A local path for rel: the file itself when local, else a download into local_dir."""
        if self.local:
            return self.path(rel)
        dst = os.path.join(local_dir, rel.replace("/", "__"))
        if not os.path.exists(dst):
            tmp = f"{dst}.tmp-{uuid.uuid4().hex[:8]}"
            self.call(self.fs.get_file, self.path(rel), tmp)
            os.replace(tmp, dst)
        return dst

    def put_file(self, local_path: str, rel: str) -> None:
        """Upload (or move into place) a finished local file, atomically at the destination."""
        _crash_point(rel)
        p = self.path(rel)
        if not self.local:
            self.call(self.fs.put_file, local_path, p)
            return
        self.fs.makedirs(posixpath.dirname(p), exist_ok=True)
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        import shutil

        shutil.copyfile(local_path, tmp)
        os.replace(tmp, p)


def _mtime(info: dict) -> float | None:
    """A file's modification time from fsspec's info: 'mtime' locally, 'LastModified' on S3."""
    t = info.get("mtime", info.get("LastModified"))
    if t is None:
        return None
    return t.timestamp() if hasattr(t, "timestamp") else float(t)


def _protocols(fs) -> tuple:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)

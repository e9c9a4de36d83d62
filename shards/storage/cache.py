"""The node's local cache of files fetched from S3: where a directory's copies go, how they are fetched,
and which are let go when the cache is full. The one owner of that layout.

    $SHARDEX_CACHE_DIR (default <tmp>/shardex-cache)/
        <16 hex of sha256(store uri of the directory)>/   one per store directory (a version, a work dir)
            <name>, .<name>.verified                      a copy and its marker (shards/storage/integrity.py)
            .used                                         touched on each use: the least recently used go first

An object is fetched by ranged GETs, WINDOW of them at once, written to disk as they arrive: a 4 GB
shard is neither one GET nor held in RAM. Once the cache holds more than its budget
($SHARDEX_CACHE_BYTES, default half the disk it is on), whole directories go, least recently used
first; one used in the last KEEP_S seconds stays (a replica may be fetching into it). A copy already
mmapped stays readable after its directory is gone (the inode lives on); the next load fetches again.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time

from shards.storage.store import CHUNK, Store

RANGE_BYTES = 8 << 20     # one ranged GET
WINDOW = 8                # ranged GETs in flight at once: RAM held is at most WINDOW * RANGE_BYTES
KEEP_S = 600.0            # a directory used this recently is never evicted
USED = ".used"


def cache_root() -> str:
    """Where files fetched from S3 are kept: $SHARDEX_CACHE_DIR, else <tmp>/shardex-cache."""
    d = os.environ.get("SHARDEX_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "shardex-cache")
    os.makedirs(d, exist_ok=True)
    return d


def budget(root: str) -> int:
    """The bytes the cache may hold: $SHARDEX_CACHE_BYTES (e.g. 200G), else half the disk it is on."""
    from shards.config import parse_bytes

    v = os.environ.get("SHARDEX_CACHE_BYTES")
    return parse_bytes(v) if v else shutil.disk_usage(root).total // 2


def local_dir(store: Store, dir_rel: str, root: str | None = None) -> str:
    """The cache directory of store's dir_rel, created and marked as used now."""
    d = os.path.join(root or cache_root(), hashlib.sha256(store.uri(dir_rel).encode()).hexdigest()[:16])
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, USED), "a"):
        os.utime(os.path.join(d, USED))
    return d


def ranges(size: int, step: int = RANGE_BYTES) -> list[tuple[int, int]]:
    """[start, end) byte ranges covering size bytes, step each (the last shorter)."""
    return [(a, min(a + step, size)) for a in range(0, size, step)]


def download(store: Store, rel: str, dst: str, h=None) -> int:
    """Bytes of rel written to dst (h.update on each chunk, in order). On S3 by ranged GETs, WINDOW at
    a time (s3fs runs a window's concurrently); locally by a plain copy."""
    n = 0
    with open(dst, "wb") as out:
        if store.local:
            with store.open(rel) as src:
                while chunk := src.read(CHUNK):
                    n += _write(out, chunk, h)
            return n
        path = store.path(rel)
        rs = ranges(int(store.fs.info(path)["size"]))
        for i in range(0, len(rs), WINDOW):
            w = rs[i:i + WINDOW]
            for chunk in store.fs.cat_ranges([path] * len(w), [a for a, _ in w], [b for _, b in w],
                                               on_error="raise"):
                n += _write(out, chunk, h)
    return n


def _write(out, chunk: bytes, h) -> int:
    if h is not None:
        h.update(chunk)
    out.write(chunk)
    return len(chunk)


def evict(root: str | None = None, limit: int | None = None, keep_s: float = KEEP_S) -> list[str]:
    """Remove whole cache directories, least recently used first, until the cache holds at most
    `limit` bytes (default budget()); those used in the last keep_s seconds stay. Returns those removed."""
    root = root or cache_root()
    limit = budget(root) if limit is None else limit
    dirs = [(_used(p), _bytes(p), p) for p in (os.path.join(root, d) for d in os.listdir(root)) if os.path.isdir(p)]
    total, gone, now = sum(b for _, b, _ in dirs), [], time.time()
    for used, nbytes, p in sorted(dirs):
        if total <= limit:
            break
        if now - used < keep_s:
            continue
        shutil.rmtree(p, ignore_errors=True)  # another replica may remove it first
        total -= nbytes
        gone.append(p)
    return gone


def _used(d: str) -> float:
    try:
        return os.stat(os.path.join(d, USED)).st_mtime
    except OSError:
        return 0.0


def _bytes(d: str) -> int:
    n = 0
    for e in os.scandir(d):
        try:
            n += e.stat().st_size if e.is_file(follow_symlinks=False) else 0
        except OSError:  # removed meanwhile
            pass
    return n

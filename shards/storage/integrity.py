"""Published files checked against their manifest's sha256 before anything reads them: the one owner of that check.

Cost stays one read per file per process, never one per request:
- a file on a local store (mmapped in place) is hashed once while its size, mtime and inode stay the
  same, and remembered in this process (`_known`);
- a file on S3 is hashed as it is fetched into the local cache; a marker beside the cached copy records
  the sha256 verified and the copy's size, mtime and inode, and a later process trusts the copy only
  while all of them still match (a changed copy or a changed manifest is fetched and checked again);
- bytes read into RAM are hashed before they are deserialized.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid

from shards.errors import IntegrityError
from shards.storage.cache import download
from shards.storage.store import CHUNK, Store

MARKER = ".verified"            # .<name>.verified beside a cached copy: {"sha256", "size", "mtime_ns", "ino"}
HASHED = {"files": 0, "bytes": 0}  # what this process hashed (tests count on it)
_known: dict[tuple, str] = {}   # (where, size, stamp...) -> the sha256 computed for it


def damaged(uri: str, what: str) -> IntegrityError:
    return IntegrityError(f"{uri}: size or sha256 differs from the manifest ({what}); "
                          "the version is damaged: rebuild it or roll back")


def missing(uri: str) -> IntegrityError:
    return IntegrityError(f"{uri}: listed in the manifest but missing; the version is damaged: "
                          "rebuild it or roll back")


def compare(uri: str, size: int, sha: str | None, want_sha: str, want_size: int | None) -> None:
    if want_size is not None and size != want_size:
        raise damaged(uri, f"{size} bytes, the manifest says {want_size}")
    if sha != want_sha:
        raise damaged(uri, f"sha256 {(sha or '')[:12]}..., the manifest says {want_sha[:12]}...")


def _count(n: int) -> None:
    HASHED["files"] += 1
    HASHED["bytes"] += n


def _hash_path(path: str) -> str:
    sha = file_sha256(path)
    _count(os.path.getsize(path))
    return sha


def file_sha256(path: str) -> str:
    """The sha256 of a local file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stamp(st: os.stat_result) -> tuple:
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def check_bytes(uri: str, data: bytes, want_sha: str, want_size: int | None) -> bytes:
    """data itself once it matches; raises naming uri otherwise."""
    if want_size is not None and len(data) != want_size:
        compare(uri, len(data), None, want_sha, want_size)
    _count(len(data))
    compare(uri, len(data), hashlib.sha256(data).hexdigest(), want_sha, want_size)
    return data


def check_path(path: str, uri: str, want_sha: str, want_size: int | None) -> None:
    """A local file against the manifest; hashed once per process while it is unchanged."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise missing(uri) from None
    if want_size is not None and st.st_size != want_size:
        compare(uri, st.st_size, None, want_sha, want_size)  # a size differs: no need to read it
    key = (path, *_stamp(st))
    if key not in _known:
        _known[key] = _hash_path(path)
    compare(uri, st.st_size, _known[key], want_sha, want_size)


def check_file(store: Store, rel: str, want_sha: str, want_size: int | None) -> None:
    """rel in store against the manifest, hashed once per process while unchanged (on S3: its ETag)."""
    if store.local:
        return check_path(store.path(rel), store.uri(rel), want_sha, want_size)
    try:
        info = store.call(store.fs.info, store.path(rel))
    except FileNotFoundError:
        raise missing(store.uri(rel)) from None
    size = int(info["size"])
    if want_size is not None and size != want_size:
        compare(store.uri(rel), size, None, want_sha, want_size)
    key = (store.uri(rel), size, info.get("ETag") or info.get("LastModified"))
    if key not in _known:
        _known[key] = store.sha256(rel)
        _count(size)
    compare(store.uri(rel), size, _known[key], want_sha, want_size)


def check_info(store: Store, dir_rel: str, fileinfo) -> None:
    """A manifest entry's file, and its .ivfdata when it has one; dir_rel: the directory holding
    both (Manifest.dir_of), the entry's names taken by their last part."""
    check_file(store, f"{dir_rel}/{base(fileinfo.file)}", fileinfo.sha256, fileinfo.bytes)
    if fileinfo.ivfdata:
        check_file(store, f"{dir_rel}/{base(fileinfo.ivfdata)}", fileinfo.ivfdata_sha256 or "",
                   fileinfo.ivfdata_bytes)


def base(name: str) -> str:
    """A manifest name's last part: an .ivfdata sits beside its .index, wherever the manifest names them."""
    return posixpath.basename(name)


# ---------------------------------------------------------------- verified copies of S3 files

def marker(dst: str) -> str:
    """The marker of a cached copy: hidden, so a listing of the cache shows the copies only."""
    d, name = os.path.split(dst)
    return os.path.join(d, f".{name}{MARKER}")


def _trusted(dst: str, want_sha: str) -> bool:
    """Whether the copy at dst is the one a marker says was verified against want_sha, unchanged since."""
    try:
        with open(marker(dst)) as f:
            mark = json.load(f)
        st = os.stat(dst)
    except (OSError, ValueError):
        return False
    ok = mark.get("sha256") == want_sha and [mark.get(k) for k in ("size", "mtime_ns", "ino")] == \
        [st.st_size, st.st_mtime_ns, st.st_ino]
    if ok:
        _known[(dst, *_stamp(st))] = want_sha
    return ok


def _download(store: Store, rel: str, tmp: str) -> tuple[int, str]:
    """(bytes, sha256) of rel, written to tmp as it is hashed: one pass over the object."""
    h = hashlib.sha256()
    return download(store, rel, tmp, h), h.hexdigest()


def fetch_checked(store: Store, rel: str, want_sha: str, want_size: int | None, dst: str) -> None:
    """A verified local copy of rel at dst: the cached one while its marker vouches for it, else fetched
    again and hashed as it is written; a fetched copy that differs from the manifest is refused."""
    if _trusted(dst, want_sha):
        return
    tmp = f"{dst}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        try:
            n, sha = store.call(lambda _: _download(store, rel, tmp), store.path(rel))
        except FileNotFoundError:
            raise missing(store.uri(rel)) from None
        _count(n)
        compare(store.uri(rel), n, sha, want_sha, want_size)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    st = os.stat(dst)
    mark = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
    tmp = f"{marker(dst)}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(mark, f)
    os.replace(tmp, marker(dst))
    _known[(dst, *_stamp(st))] = sha

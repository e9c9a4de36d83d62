"""Verified loads (shards/storage/integrity.py): every file of a version is checked against its manifest's
sha256 before faiss reads it, once per file per process.

One real build (ivf sharding, shards merged on disk: .index + .ivfdata) serves every test. A damaged
version is a copy of it under another name with one file or one manifest entry damaged for real:
search, eval and rollback refuse it with one line naming the file; serve keeps the old version;
S3 copies in the local cache are trusted only through the marker written when they were verified.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from index_builder.cli import main
from shards.errors import IntegrityError
from shards.storage import integrity
from shards.storage.faissio import load_shard
from shards.storage.manifest import current_version, load_manifest, set_current, vdir, verify
from shards.storage.store import Store

from helpers import Client, build, free_port, run_cli, start_app, write_vector_corpus

pytestmark = pytest.mark.slow
N, D = 1500, 16


@pytest.fixture(scope="module")
def index(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("integrity")
    ids, x = write_vector_corpus(str(tmp / "corpus"), n=N, d=D, files=2, seed=7)
    root = str(tmp / "index")
    s = build(ray_session, source=str(tmp / "corpus"), index_root=root, vector_column="vector", fields=["title"],
              factory="IVF16,Flat", shards=2, sharding="ivf", merge_ram_budget="0", metric="l2", part_rows=500)
    np.save(tmp / "q.npy", x[:3])
    return {"root": root, "version": s.version, "x": x, "q": str(tmp / "q.npy"), "tmp": tmp}


def _flip(path: str) -> None:
    """One byte changed in the middle, the size kept."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def _rewrite(path: str, data: bytes) -> None:
    """A new file in place of the old one (a new inode), as a corrupted re-download would be."""
    with open(path + ".new", "wb") as f:
        f.write(data)
    os.replace(path + ".new", path)


def _edit_sha(m: dict, name: str) -> None:
    """The manifest entry of `name` given a wrong sha256 (the file itself stays intact)."""
    for e in [m["trained"], *m["shards"]]:
        for file_key, sha_key in (("file", "sha256"), ("ivfdata", "ivfdata_sha256")):
            if e.get(file_key) == name:
                e[sha_key] = ("0" if e[sha_key][0] != "0" else "1") + e[sha_key][1:]
                return
    raise AssertionError(f"{name} not in the manifest")


def damaged_copy(store: Store, good: str, bad: str, name: str, how: str) -> str:
    """versions/<bad>: a copy of <good> with `name` damaged: its sha256 edited in the manifest
    ("manifest"), one byte flipped ("flip"), or its last byte cut ("truncate")."""
    shutil.copytree(store.path(vdir(good)), store.path(vdir(bad)))
    m = json.loads(store.read_text(f"{vdir(bad)}/manifest.json"))
    m["version"] = bad
    path = store.path(f"{vdir(bad)}/{name}")
    if how == "manifest":
        _edit_sha(m, name)
    elif how == "flip":
        _flip(path)
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 1)
    store.write_text(f"{vdir(bad)}/manifest.json", json.dumps(m))
    return bad


def one_error_line(err: str) -> str:
    """The CLI's error: one line (the last on stderr; progress logs may come before it)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("shardex: error:")]
    assert len(errs) == 1 and lines[-1] == errs[0], err[-2000:]
    return errs[0]


@pytest.mark.parametrize("name,how", [
    ("shard-1.index", "manifest"),     # a manifest edited to a wrong sha256: the case serve used to answer
    ("shard-1.index", "flip"),
    ("shard-0.ivfdata", "truncate"),   # the mmapped inverted lists, which faiss reads on search only
    ("trained.index", "flip"),         # the router's and eval's coarse quantizer, read into RAM
])
def test_search_eval_and_rollback_refuse_a_damaged_version(index, capsys, tmp_path, name, how):
    store, good = Store(index["root"]), index["version"]
    bad = damaged_copy(store, good, f"{good}-{how}-{name.replace('.', '-')}", name, how)
    uri = store.uri(f"{vdir(bad)}/{name}")

    assert main(["rollback", index["root"], bad]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert uri in line and "differs from the manifest" in line and "roll back" in line, line
    assert current_version(store) == good                          # CURRENT did not move

    set_current(store, bad)  # as if damaged after it was published
    try:
        assert main(["search", index["root"], "--local", "--vectors", index["q"], "--json"]) == 1
        out = capsys.readouterr()
        assert uri in one_error_line(out.err) and not out.out
        assert main(["eval", index["root"], "--num-queries", "20", "--latency-queries", "2",
                     "--out", str(tmp_path / "eval")]) == 1
        assert uri in one_error_line(capsys.readouterr().err)
        assert not (tmp_path / "eval").exists()
    finally:
        set_current(store, good)
    assert main(["rollback", index["root"], good]) == 0               # an intact version still rolls back


def test_search_on_ray_actors_refuses_a_damaged_shard_in_one_line(index):
    """The default backend loads each shard in a Ray actor: its load error comes back as the same one
    line, with no actor traceback on the terminal (a subprocess, so stderr is what a user sees)."""
    store, good = Store(index["root"]), index["version"]
    bad = damaged_copy(store, good, f"{good}-ray-flip", "shard-1.index", "flip")
    set_current(store, bad)
    try:
        rc, line = run_cli("search", index["root"], "--vectors", index["q"])   # joins the session's Ray
    finally:
        set_current(store, good)
    assert store.uri(f"{vdir(bad)}/shard-1.index") in line and "differs from the manifest" in line, line


def test_a_file_is_hashed_once_per_process(index):
    store, good = Store(index["root"]), index["version"]
    v = f"{good}-fresh"
    shutil.copytree(store.path(vdir(good)), store.path(vdir(v)))   # paths this process never hashed
    m = load_manifest(store, good)
    m.version = v
    store.write_text(f"{vdir(v)}/manifest.json", m.model_dump_json())
    from shards.search.router import IndexView
    from shards.search.searcher import ShardSearcher

    def hashed(fn) -> int:
        before = integrity.HASHED["files"]
        fn()
        return integrity.HASHED["files"] - before

    s0 = m.shards[0]
    assert hashed(lambda: load_shard(store, v, s0)) == 2            # its .index and its .ivfdata
    assert hashed(lambda: [load_shard(store, v, s0), ShardSearcher(store, v, s0)]) == 0
    assert hashed(lambda: IndexView(store, v)) == 1                  # the trained index
    assert hashed(lambda: IndexView(store, v)) == 0
    # only shard-1's two files were not read yet, and each shard's fields file (read by row group, never whole)
    assert hashed(lambda: verify(store, m)) == 2 + sum(len(sh.fields) for sh in m.shards) == 4
    path = store.path(f"{vdir(v)}/{s0.file}")
    with open(path, "rb") as f:
        _rewrite(path, f.read())                                     # same bytes, another file: hashed again
    assert hashed(lambda: load_shard(store, v, s0)) == 1


@pytest.mark.s3
def test_s3_cached_copies_are_trusted_only_as_verified(index, s3, tmp_path):
    local, good = Store(index["root"]), index["version"]
    store = Store("s3://indexes/integrity", s3)
    for d, _, files in [w for top in (vdir(good), "embeddings") for w in os.walk(local.path(top))]:  # docs: encode's
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), local.path())
            store.put_file(os.path.join(d, f), rel)
    store.write_text("CURRENT", good + "\n")
    m = load_manifest(store, good)
    s0, cache = m.shards[0], str(tmp_path / "cache")

    def load() -> int:
        before = integrity.HASHED["files"]
        load_shard(store, good, s0, cache)
        return integrity.HASHED["files"] - before

    assert load() == 2                                               # fetched, hashed as they were written
    (copy,) = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs if f == s0.ivfdata]
    assert os.path.exists(integrity.marker(copy))
    assert load() == 0                                               # the marker vouches for the copy

    original = store.read_bytes(f"{vdir(good)}/{s0.ivfdata}")
    bad = bytearray(original)
    bad[len(bad) // 2] ^= 0xFF
    _rewrite(copy, bytes(bad))                                       # the cached copy corrupted
    assert load() == 1                                               # not trusted: fetched again, checked
    with open(copy, "rb") as f:
        assert f.read() == original

    m2 = json.loads(store.read_text(f"{vdir(good)}/manifest.json"))
    _edit_sha(m2, s0.file)                                           # the manifest changed under a valid copy
    store.write_text(f"{vdir(good)}/manifest.json", json.dumps(m2))
    with pytest.raises(IntegrityError, match=re.escape(f"{store.uri(vdir(good))}/{s0.file}: size or sha256 differs")):
        load_shard(store, good, load_manifest(store, good).shards[0], cache)
    assert not [f for _, _, fs in os.walk(cache) for f in fs if ".tmp-" in f]

    from shards.search.router import IndexView

    _edit_sha(m2, "trained.index")                                   # read into RAM: the bytes are checked
    store.write_text(f"{vdir(good)}/manifest.json", json.dumps(m2))
    with pytest.raises(IntegrityError, match=re.escape(f"{store.uri(vdir(good))}/trained.index: size or sha256")):
        IndexView(store, good)


def test_serve_refuses_a_damaged_version_and_the_old_one_serves_on(index):
    from ray import serve

    store, good = Store(index["root"]), index["version"]
    bad = damaged_copy(store, good, f"{good}-served-bad", "shard-1.index", "manifest")  # the file itself intact
    port = free_port()
    start_app(index["root"], port=port, poll_seconds=0, filter_fields=[])
    c = Client(f"http://127.0.0.1:{port}")
    body = {"vectors": index["x"][:2].tolist(), "k": 3}
    try:
        assert c.search(**body)["version"] == good
        set_current(store, bad)
        r = c.post("/admin/reload")
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert bad in err and f"still serving {good}" in err and "shard-1.index" in err, err
        got = c.search(**body)
        assert got["version"] == good and got["shards"]["answered"] == 2
        assert "shard-1.index" in c.get("/health").json()["reload_error"]
    finally:
        set_current(store, good)
        serve.shutdown()

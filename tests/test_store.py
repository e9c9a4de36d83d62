"""shards/storage/store.py: atomic writes, reads that name the URI, tables, listing, copies, pickling."""
from __future__ import annotations

import hashlib
import re
import threading

import numpy as np
import pyarrow as pa
import pytest

from shards.storage import store as store_mod
from shards.storage.store import Store

from helpers import tmp_files

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@pytest.mark.parametrize("rel,data", [
    ("a.bin", b""),
    ("a.bin", b"x"),
    ("x/y/z.bin", bytes(range(256)) * 100),
    ("versions/v1/manifest.json", b'{"a": 1}'),
    ("d\u00e9j\u00e0/\u03b1.txt", "h\u00e9llo".encode()),
    ("big.bin", np.random.default_rng(0).bytes(3 * MiB + 5)),
])
def test_store_round_trip(tmp_path, rel, data):
    s = Store(str(tmp_path / "root"))
    s.write_bytes(rel, data)
    assert s.read_bytes(rel) == data
    assert s.exists(rel) and s.size(rel) == len(data)
    assert s.sha256(rel) == hashlib.sha256(data).hexdigest()
    assert not tmp_files(tmp_path)
    s.write_bytes(rel, data + b"!")                       # overwrite in place
    assert s.read_bytes(rel) == data + b"!"
    assert not tmp_files(tmp_path)


@pytest.mark.parametrize("root", ["{tmp}/r", "{tmp}/r/", "file://{tmp}/r"])
def test_store_roots(tmp_path, root):
    s = Store(root.format(tmp=tmp_path))
    assert s.local and not s.root.endswith("/")
    s.write_text("a/b.txt", "hi")
    assert (tmp_path / "r" / "a" / "b.txt").read_text() == "hi"
    assert s.uri("a/b.txt") == s.root + "/a/b.txt"
    assert s.child("a").read_text("b.txt") == "hi"


def test_store_read_missing_names_the_uri(tmp_path):
    s = Store(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(s.uri("no/such.bin"))):
        s.read_bytes("no/such.bin")


def test_store_write_is_atomic_for_a_concurrent_reader(tmp_path):
    """A reader sees the old bytes or the new bytes, never a mix or a short file."""
    s = Store(str(tmp_path))
    a, b = b"A" * (512 * KiB), b"B" * (256 * KiB)
    s.write_bytes("f.bin", a)
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(s.read_bytes("f.bin"))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(30):
            s.write_bytes("f.bin", b if i % 2 == 0 else a)
    finally:
        stop.set()
        t.join()
    assert seen <= {a, b}
    assert not tmp_files(tmp_path)


def test_store_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    s = Store(str(tmp_path))
    s.write_bytes("f.bin", b"old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        s.write_bytes("f.bin", b"new and longer")
    monkeypatch.undo()
    assert s.read_bytes("f.bin") == b"old"


def test_store_sha256_reads_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "CHUNK", 7)
    s = Store(str(tmp_path))
    data = np.random.default_rng(1).bytes(1000)
    s.write_bytes("f", data)
    assert s.sha256("f") == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("columns", [None, ["id"], ["vec", "text"]])
def test_store_table_round_trip(tmp_path, columns):
    s = Store(str(tmp_path))
    t = pa.table({"id": pa.array([3, 1, 2], pa.int64()), "text": ["a", None, "c\u00e9"],
                  "vec": pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], pa.list_(pa.float32()))})
    s.write_table("docs/part-0.parquet", t)
    assert not tmp_files(tmp_path)
    got = s.read_table("docs/part-0.parquet", columns=columns)
    assert got.equals(t if columns is None else t.select(columns))


def test_store_ls(tmp_path):
    s = Store(str(tmp_path / "root"))
    assert s.ls() == [] and s.ls("versions") == []
    for rel in ("versions/v2/manifest.json", "versions/v10/manifest.json", "versions/v1/x", "CURRENT", "b.txt"):
        s.write_text(rel, rel)
    assert s.ls() == ["CURRENT", "b.txt", "versions"]
    assert s.ls("versions") == ["v1", "v10", "v2"]                  # names, sorted as strings
    assert s.ls("versions/v2") == ["manifest.json"]


def test_store_rm(tmp_path):
    s = Store(str(tmp_path))
    s.write_text("w/a/1", "1")
    s.write_text("w/b", "2")
    s.rm("w/b")
    s.rm("w/nothing")                                                 # missing: no error
    assert s.ls("w") == ["a"]
    s.rm("w", recursive=True)
    assert not s.exists("w")


def test_store_copy(tmp_path):
    s = Store(str(tmp_path))
    s.write_bytes("work/shard-0.index", b"index bytes")
    s.copy("work/shard-0.index", "versions/v1/shard-0.index")
    assert s.read_bytes("versions/v1/shard-0.index") == b"index bytes"
    assert s.sha256("versions/v1/shard-0.index") == s.sha256("work/shard-0.index")
    assert not tmp_files(tmp_path)
    # the copy is independent of later (atomic) rewrites of its source ...
    s.write_bytes("work/shard-0.index", b"rewritten")
    assert s.read_bytes("versions/v1/shard-0.index") == b"index bytes"
    # ... and copying over an existing file replaces it
    s.copy("work/shard-0.index", "versions/v1/shard-0.index")
    assert s.read_bytes("versions/v1/shard-0.index") == b"rewritten"
    with pytest.raises(FileNotFoundError):
        s.copy("work/missing", "versions/v1/missing")


def test_store_put_file_and_fetch(tmp_path):
    s = Store(str(tmp_path / "root"))
    local = tmp_path / "local.bin"
    local.write_bytes(b"payload")
    s.put_file(str(local), "a/b.bin")
    assert s.read_bytes("a/b.bin") == b"payload"
    assert s.fetch("a/b.bin", str(tmp_path)) == s.path("a/b.bin")    # local: the file itself
    assert not tmp_files(tmp_path)


def test_store_pickles_by_uri(tmp_path):
    import pickle

    s = Store(str(tmp_path))
    s.write_text("x", "y")
    t = pickle.loads(pickle.dumps(s))
    assert t.root == s.root and t.read_text("x") == "y"


def test_store_writes_say_what_they_wrote_and_sizes_lists_once(tmp_path):
    s = Store(str(tmp_path))
    w = s.write_bytes("versions/v1/shard-0.index", b"index bytes")
    assert (w.sha256, w.bytes) == (hashlib.sha256(b"index bytes").hexdigest(), 11)
    t = s.write_table("versions/v1/docs.parquet", pa.table({"id": np.arange(5)}))
    assert (t.sha256, t.bytes) == (s.sha256("versions/v1/docs.parquet"), s.size("versions/v1/docs.parquet"))
    assert s.write_text("versions/v1/x.json", "{}").bytes == 2
    s.write_bytes("versions/v1/sub/deeper", b"not listed")
    assert s.sizes("versions/v1") == {"shard-0.index": 11, "docs.parquet": t.bytes, "x.json": 2}
    assert s.sizes("versions/none") == {}

"""shards/storage/manifest.py: version names, the manifest's round trip and checks (a damaged or
missing file is named), CURRENT, listing versions, on-disk (ivfdata) shards."""
from __future__ import annotations

import json
import re

import pytest

from shards.errors import IntegrityError, ShardexError, StorageError
from shards.storage import manifest as mf
from shards.storage.manifest import (
    DocsInfo,
    EncoderInfo,
    FileInfo,
    IndexInfo,
    Manifest,
    ShardingInfo,
    SourceInfo,
    current_version,
    list_versions,
    load_manifest,
    new_version_name,
    set_current,
    vdir,
    verify,
    write_manifest,
)
from shards.storage.store import Store

from helpers import tmp_files

VERSION_RE = re.compile(r"^v\d{8}-\d{6}-[0-9a-z]{1,6}-[0-9a-f]{4}$")


@pytest.mark.parametrize("run_id", ["abcdef123456", "ab12cd", "r1", "0f9e8d7c6b5a4"])
def test_new_version_name_format(run_id):
    v = new_version_name(run_id)
    assert VERSION_RE.match(v), v
    assert v.split("-")[2] == run_id[:6]
    assert new_version_name(run_id) != v                      # two publishes never share a name


def test_new_version_names_sort_by_time(monkeypatch):
    from datetime import datetime, timezone

    times = [datetime(2025, 12, 31, 23, 59, 59, tzinfo=timezone.utc),
             datetime(2026, 1, 1, 0, 0, 0, tzinfo=timezone.utc),
             datetime(2026, 1, 1, 0, 0, 1, tzinfo=timezone.utc), datetime(2026, 2, 1, 9, 5, 0, tzinfo=timezone.utc),
             datetime(2026, 11, 22, 5, 30, 0, tzinfo=timezone.utc)]
    it = iter(times)

    class FakeDatetime:
        @staticmethod
        def now(tz=None):
            return next(it)

    monkeypatch.setattr(mf, "datetime", FakeDatetime)
    names = [new_version_name(run) for run in ("zzzzzz", "yyyyyy", "000000", "mmmmmm", "aaaaaa")]
    assert names == sorted(names)
    assert names[0].startswith("v20251231-235959-zzzzzz-") and names[-1].startswith("v20261122-053000-aaaaaa-")


def _publish_files(store: Store, version: str, files: dict[str, bytes]) -> dict[str, FileInfo]:
    out = {}
    for name, data in files.items():
        rel = f"{vdir(version)}/{name}"
        store.write_bytes(rel, data)
        out[name] = FileInfo(file=name, sha256=store.sha256(rel), bytes=store.size(rel), ntotal=len(data))
    return out


def _manifest(store: Store, version: str, shards: int = 2, documents: int = 100) -> Manifest:
    files = {"trained.index": b"T" * 64, **{f"shard-{s}.index": bytes([s]) * (100 + s) for s in range(shards)}}
    info = _publish_files(store, version, files)
    return Manifest(version=version,
                    source=SourceInfo(uri="s3://b/corpus", fingerprint="0123456789abcdef", documents=documents),
                    encoder=EncoderInfo(name="precomputed", dim=32, normalize=False, metric="l2"),
                    index=IndexInfo(factory="IVF64,PQ8", metric="l2", nlist=64, train_vectors=25_600),
                    sharding=ShardingInfo(shards=shards),
                    trained=info["trained.index"].model_copy(update={"ntotal": 0}),
                    shards=[info[f"shard-{s}.index"] for s in range(shards)],
                    docs=DocsInfo(files=["docs/part-0.parquet"], fields=["title"]),
                    timings={"train": 1.5})


@pytest.mark.parametrize("shards", [1, 2, 5])
def test_manifest_round_trip(tmp_path, shards):
    s = Store(str(tmp_path))
    m = _manifest(s, "v1", shards)
    write_manifest(s, m)
    assert s.exists("versions/v1/manifest.json") and not tmp_files(tmp_path)
    got = load_manifest(s, "v1")
    assert got == m
    assert got.ntotal == sum(100 + i for i in range(shards))
    assert [f.file for f in got.files()] == ["trained.index", *[f"shard-{i}.index" for i in range(shards)]]
    verify(s, got)


# (file to damage, how) -> IntegrityError naming that file
@pytest.mark.parametrize("name,damage", [
    ("shard-1.index", lambda b: bytes([b[0] ^ 1]) + b[1:]),   # same size, different bytes
    ("shard-0.index", lambda b: b[:-1]),                      # truncated
    ("trained.index", lambda b: b + b"\0"),                   # grown
    ("trained.index", lambda b: b[::-1].replace(b"T", b"t", 1)),
])
def test_verify_detects_a_damaged_file(tmp_path, name, damage):
    s = Store(str(tmp_path))
    m = _manifest(s, "v1")
    rel = f"versions/v1/{name}"
    s.write_bytes(rel, damage(s.read_bytes(rel)))
    with pytest.raises(IntegrityError) as e:
        verify(s, m)
    assert s.uri(rel) in str(e.value) and "sha256" in str(e.value)


def test_verify_missing_file_names_it(tmp_path):
    s = Store(str(tmp_path))
    m = _manifest(s, "v1")
    s.rm("versions/v1/shard-1.index")
    with pytest.raises((IntegrityError, FileNotFoundError), match="shard-1.index"):
        verify(s, m)


def test_current_and_set_current(tmp_path):
    s = Store(str(tmp_path))
    with pytest.raises(StorageError, match=r"CURRENT: no published version"):
        current_version(s)
    with pytest.raises(StorageError, match=r"no such version 'v1'"):
        set_current(s, "v1")                                  # no manifest yet: CURRENT must not move
    assert not s.exists("CURRENT")
    write_manifest(s, _manifest(s, "v1"))
    set_current(s, "v1")
    assert current_version(s) == "v1" and s.read_text("CURRENT") == "v1\n"
    write_manifest(s, _manifest(s, "v2"))
    set_current(s, "v2")
    assert current_version(s) == "v2"
    assert not tmp_files(tmp_path)
    assert issubclass(StorageError, ShardexError)


def test_load_manifest_errors(tmp_path):
    s = Store(str(tmp_path))
    with pytest.raises(StorageError, match="no such version 'nope'"):
        load_manifest(s, "nope")
    m = _manifest(s, "v9").model_copy(update={"format": "shardex-index/99"})
    write_manifest(s, m)
    with pytest.raises(StorageError, match=r"format 'shardex-index/99', this shardex reads shardex-index/1 and "
                                           r"shardex-index/2; upgrade shardex"):
        load_manifest(s, "v9")


def test_list_versions(tmp_path):
    s = Store(str(tmp_path))
    assert list_versions(s) == []
    # published in this order; the second was named earlier (a killed run resumed): age is publish time
    names = ["v20260102-000000-bbbbbb-0001", "v20260101-120000-aaaaaa-0002", "v20260103-000000-cccccc-0003"]
    for i, v in enumerate(names):
        m = _manifest(s, v, shards=i + 1, documents=10 * (i + 1))
        write_manifest(s, m.model_copy(update={"created": f"2026-01-03T00:00:00.00{i}+00:00"}))
    s.write_bytes("versions/v20260104-000000-dddddd-0004/shard-0.index", b"unfinished")   # no manifest
    set_current(s, names[0])
    got = list_versions(s)
    assert [r["version"] for r in got] == names                  # oldest first; the unfinished one left out
    assert [r["current"] for r in got] == [True, False, False]
    assert {r["version"]: (r["shards"], r["documents"]) for r in got} == {
        names[0]: (1, 10), names[1]: (2, 20), names[2]: (3, 30)}
    assert all(r["factory"] == "IVF64,PQ8" and r["encoder"] == "precomputed" for r in got)


def test_summary_leaves_out_the_file_list(tmp_path):
    m = _manifest(Store(str(tmp_path)), "v1")
    out = mf.summary(m)
    assert set(out) == {"version", "created", "source", "encoder", "index", "sharding", "search"}
    assert out["sharding"] == {"mode": "hash", "shards": 2, "ranges": None, "order": None}


def test_manifest_lists_and_verifies_ivfdata(tmp_path):
    from shards.storage.manifest import (
        DocsInfo,
        EncoderInfo,
        FileInfo,
        IndexInfo,
        Manifest,
        ShardingInfo,
        SourceInfo,
        load_manifest,
        verify,
        write_manifest,
    )

    store = Store(str(tmp_path))
    files = {"trained.index": b"T" * 10, "shard-0.index": b"I" * 20, "shard-0.ivfdata": b"L" * 300,
             "shard-1.index": b"J" * 30}
    for name, data in files.items():
        store.write_bytes(f"versions/v1/{name}", data)

    def info(name):
        return FileInfo(file=name, sha256=store.sha256(f"versions/v1/{name}"), bytes=len(files[name]))

    s0 = info("shard-0.index").model_copy(update={"ivfdata": "shard-0.ivfdata", "ntotal": 5,
                                                  "ivfdata_sha256": info("shard-0.ivfdata").sha256,
                                                  "ivfdata_bytes": 300})
    m = Manifest(version="v1", source=SourceInfo(uri="c", fingerprint="f", documents=9),
                 encoder=EncoderInfo(name="precomputed", dim=8, normalize=False, metric="l2"),
                 index=IndexInfo(factory="IVF4,Flat", metric="l2", nlist=4, train_vectors=9, train_seconds=1.5,
                                 train_device="cpu"),
                 sharding=ShardingInfo(mode="ivf", shards=2, ranges=[[0, 1], [1, 4]]),
                 trained=info("trained.index"), shards=[s0, info("shard-1.index")],
                 docs=DocsInfo(files=[], fields=[]))
    assert [f.file for f in m.files()] == ["trained.index", "shard-0.index", "shard-1.index", "shard-0.ivfdata"]
    write_manifest(store, m)
    assert load_manifest(store, "v1") == m
    verify(store, m)
    store.write_bytes("versions/v1/shard-0.ivfdata", b"L" * 299 + b"X")
    with pytest.raises(IntegrityError, match="shard-0.ivfdata: size or sha256"):
        verify(store, m)


# ---------------------------------------------------------------- format 2: files referred to, not copied

def _referring(store: Store, version: str, to: Manifest, docs: list[str]) -> Manifest:
    """A version with no files of its own: its shards and trained index are `to`'s, its docs parts encode's."""
    def rooted(f: FileInfo) -> FileInfo:
        return f.model_copy(update={"file": "/" + to.path(f.file)})

    recs = [(store.size(d), store.sha256(d)) for d in docs]
    return to.model_copy(update={"version": version, "trained": rooted(to.trained),
                                 "shards": [rooted(f) for f in to.shards],
                                 "docs": DocsInfo(files=["/" + d for d in docs], fields=["title"],
                                                  bytes=[b for b, _ in recs], sha256=[h for _, h in recs])})


def test_names_resolve_in_the_version_or_under_the_root(tmp_path):
    s = Store(str(tmp_path))
    m = _manifest(s, "v1")
    assert m.format == "shardex-index/2"
    assert m.path("shard-0.index") == "versions/v1/shard-0.index"
    assert m.path("/embeddings/fp/docs/part-00000.parquet") == "embeddings/fp/docs/part-00000.parquet"
    assert m.dir_of(FileInfo(file="/versions/v0/shard-1.index", sha256="x", bytes=1)) == "versions/v0"
    assert mf.ref("v1", "versions/v1/shard-0.index") == "shard-0.index"
    assert mf.ref("v2", "versions/v1/shard-0.index") == "/versions/v1/shard-0.index"
    assert mf.ref("v1", "versions/v1/docs/part-0.parquet") == "/versions/v1/docs/part-0.parquet"


def test_format_1_manifests_still_load_and_verify(tmp_path):
    """Written before format 2: every name (docs/part-0.parquet too) is in the version's own directory."""
    s = Store(str(tmp_path))
    m = _manifest(s, "v1")
    old = m.model_dump()
    old["format"] = "shardex-index/1"
    for k in ("extra",):
        old.pop(k)
    old["docs"] = {"files": ["docs/part-0.parquet"], "fields": ["title"], "id_kind": "int"}
    s.write_text("versions/v1/manifest.json", json.dumps(old))
    got = load_manifest(s, "v1")
    assert got.format == "shardex-index/1" and got.docs.bytes == []
    assert got.path(got.docs.files[0]) == "versions/v1/docs/part-0.parquet"
    verify(s, got)
    with pytest.raises(IntegrityError, match=r"versions/v1/docs/part-0.parquet: listed in the manifest but missing"):
        mf.check_listed(s, got)                                  # the docs part was never written here
    s.write_bytes("versions/v1/docs/part-0.parquet", b"PAR1")
    mf.check_listed(s, got)                                      # no size recorded: it exists, that is all


def test_check_listed_names_a_missing_or_resized_file(tmp_path):
    s = Store(str(tmp_path))
    docs = ["embeddings/fp/docs/part-00000.parquet", "embeddings/fp/docs/part-00001.parquet"]
    for i, d in enumerate(docs):
        s.write_bytes(d, b"D" * (10 + i))
    v1 = _manifest(s, "v1")
    v2 = _referring(s, "v2", v1, docs)
    write_manifest(s, v2)
    got = load_manifest(s, "v2")
    assert got == v2 and s.ls("versions/v2") == ["manifest.json"]  # nothing copied
    mf.check_listed(s, got)
    verify(s, got)                                               # v1's files, by sha256
    s.write_bytes(docs[1], b"D" * 12)
    with pytest.raises(IntegrityError, match=r"part-00001.parquet: size or sha256 differs from the manifest "
                                             r"\(12 bytes, the manifest says 11\)"):
        mf.check_listed(s, got)
    s.rm("versions/v1/shard-1.index")
    with pytest.raises(IntegrityError, match=r"versions/v1/shard-1.index: listed in the manifest but missing"):
        mf.check_listed(s, got)


def test_prune_keeps_every_file_a_kept_version_refers_to(tmp_path):
    """v2 refers to v1's shards and trained index, v2 and v3 to the same docs parts; pruning v1 deletes
    only what no kept version refers to, and v2 still verifies."""
    from shards.storage.retention import prune

    s = Store(str(tmp_path))
    docs = ["embeddings/fp/docs/part-00000.parquet"]
    s.write_bytes(docs[0], b"D" * 10)
    s.write_bytes("embeddings/fp/part-00000.parquet", b"V" * 10)
    v1 = _manifest(s, "v1")
    s.write_bytes("versions/v1/quarantine.parquet", b"Q")       # v1's own, referred to by no one
    write_manifest(s, v1)
    v2 = _referring(s, "v2", v1, docs)
    v2 = v2.model_copy(update={"embeddings": mf.EmbeddingsInfo(parts=["embeddings/fp/part-00000.parquet"])})
    write_manifest(s, v2)
    v3 = _manifest(s, "v3").model_copy(update={"docs": v2.docs, "embeddings": v2.embeddings})
    write_manifest(s, v3)
    set_current(s, "v3")

    out = prune(s, keep=1, grace_s=0)                            # kept: v3 (newest, CURRENT), v2 (before it)
    assert out.versions == ["v1"] and out.kept == ["v2", "v3"] and out.embeddings == []
    assert sorted(s.ls("versions/v1")) == ["shard-0.index", "shard-1.index", "trained.index"]
    assert [v["version"] for v in list_versions(s)] == ["v2", "v3"]
    verify(s, load_manifest(s, "v2"))
    mf.check_listed(s, load_manifest(s, "v2"))
    assert s.exists(docs[0]) and s.exists("embeddings/fp/part-00000.parquet")

    again = prune(s, keep=1, grace_s=0)                          # v1's remains hold only referred-to files
    assert again.versions == [] and again.unfinished == [] and len(s.ls("versions/v1")) == 3

    v4 = _manifest(s, "v4")                                      # a fourth: v2 is now the oldest
    write_manifest(s, v4)
    set_current(s, "v4")
    last = prune(s, keep=1, grace_s=0)                           # kept: v4, v3; v2 goes, then v1's remains
    assert last.versions == ["v2"] and last.unfinished == ["v1"] and "v1" not in s.ls("versions")
    final = prune(s, keep=1, grace_s=0)
    assert final.unfinished == [] and "v1" not in s.ls("versions")
    assert s.exists(docs[0])                                     # v3 still refers to it

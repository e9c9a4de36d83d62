"""Versions made of segments: a reindex that keeps the quantizer adds delta segments and a dead set,
and search over them returns what one index of the live vectors, with the same trained index, returns.

The reference is plain faiss: the version's trained index with every live vector added
(helpers.monolithic), searched at the same nprobe. Hash and ivf sharding, in RAM and on disk,
and a second reindex that replaces vectors the first one added.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from index_builder.config import ReindexConfig
from index_builder.reindex.incremental import reindex
from shards.search.router import Router
from shards.storage import segments
from shards.storage.faissio import faiss, set_nprobe
from shards.storage.manifest import current_version, load_manifest
from shards.storage.store import Store

from helpers import assert_same_topk, build, clustered, monolithic, mutate, read_part, vector_table, write_vector_corpus

N, D = 3000, 32


# ---------------------------------------------------------------- the segmented index, in faiss alone

@pytest.mark.parametrize("factory", ["IVF16,PQ8", "OPQ8_32,IVF16,PQ8", "IVF16,Flat", "IVF16,SQ8"])
def test_segmented_index_equals_one_index_of_the_live_vectors(factory):
    f = faiss()
    x = clustered(4000, 32, seed=5)
    ids = np.arange(4000, dtype=np.int64) * 7
    tr = f.index_factory(32, factory)
    tr.train(x[:3000])
    base = f.clone_index(tr)
    base.add_with_ids(x[:3000], ids[:3000])
    # delta 1: 500 new, and ids[0:100] replaced; delta 2: 500 new, ids[0:50] replaced again, ids[200:300] deleted
    x1 = np.concatenate([x[3000:3100] + 0.5, x[3000:3500]])
    i1 = np.concatenate([ids[:100], ids[3000:3500]])
    x2 = np.concatenate([x[3500:3550] - 0.5, x[3500:4000]])
    i2 = np.concatenate([ids[:50], ids[3500:4000]])
    d1, d2 = _delta(tr, x1, i1, 0), _delta(tr, x2, i2, len(i1))
    # dead: base's ids[0:100] and ids[200:300], and d1's entries of ids[0:50] (a file's rows are by list)
    dead = np.concatenate([ids[:100], ids[200:300], segments.keys(0, len(i1))[np.isin(d1[2], ids[:50])]])
    seg = segments.SegmentedIndex(base, [d1, d2], dead)
    assert len(seg) == 4000 - 100

    live_x = np.concatenate([x2[:50], x1[50:100], x[100:200], x[300:3000], x1[100:], x2[50:]])
    live_i = np.concatenate([i2[:50], i1[50:100], ids[100:200], ids[300:3000], i1[100:], i2[50:]])
    ref = f.clone_index(tr)
    ref.add_with_ids(live_x, live_i)
    xq = clustered(40, 32, seed=9)
    for nprobe in (1, 4, 16):
        D1, I1 = seg.index.search(xq, 10, params=f.SearchParametersIVF(nprobe=nprobe, sel=seg.alive))
        D2, I2 = ref.search(xq, 10, params=f.SearchParametersIVF(nprobe=nprobe))
        assert_same_topk(D1, seg.ids(I1), D2, I2)
    keys, got = seg.live()
    np.testing.assert_array_equal(got, np.sort(live_i))


@pytest.mark.parametrize("factory,metric", [("IVF16,PQ8", "l2"), ("OPQ8_32,IVF16,PQ8", "l2"), ("IVF16,PQ8", "ip"),
                                            ("IVF16,PQ8np", "l2"), ("IVF16,PQ8np", "ip")])
def test_delta_scan_gives_the_distances_faiss_gives(factory, metric):
    """DeltaScan (a delta's entries scanned in numpy, beside the base) against faiss searching an index
    holding only those entries, in the same lists: the same top-k, distances to float rounding."""
    from shards.storage.faissio import coarse_search, metric_type, pretransform

    f = faiss()
    x = clustered(3000, 32, seed=5)
    tr = f.index_factory(32, factory, metric_type(metric))
    tr.train(x[:2000])
    iv = f.extract_index_ivf(tr)
    h, L, ids, C = _delta(tr, x[2000:], np.arange(1000, dtype=np.int64) * 3, 7)
    scan = segments.DeltaScan.of(iv, L.astype(np.int64), ids, C)  # keyed by id here: rows are by list
    ref = f.clone_index(tr)
    ref.add_with_ids(x[2000:], np.arange(1000, dtype=np.int64) * 3)
    xq = clustered(60, 32, seed=9)
    for nprobe in (1, 3, 16):
        Dq, Iq = coarse_search(tr, xq, nprobe)
        D1, I1 = scan.search(pretransform(tr, xq), Dq, Iq, 10, chunk=25)
        D2, I2 = ref.search(xq, 10, params=f.SearchParametersIVF(nprobe=nprobe))
        assert_same_topk(D1, I1, D2, I2)
    assert segments.DeltaScan.of(f.extract_index_ivf(f.index_factory(32, "IVF16,SQ8")), L, ids, C) is None


def _delta(tr, x, ids, first):
    """A delta segment's parts (header, lists, ids, codes), as the reindex writes and serving reads them."""
    from index_builder.build import payload

    lists, codes = payload.encode(tr, x)
    data = segments.to_bytes("fp", faiss().extract_index_ivf(tr).nlist, first, lists, ids, codes)
    return segments.from_bytes(data, "test")


def test_a_damaged_segment_is_refused():
    from shards.errors import IntegrityError

    data = segments.to_bytes("fp", 4, 0, np.zeros(3, np.int32), np.arange(3), np.zeros((3, 8), np.uint8))
    with pytest.raises(IntegrityError, match="test.seg: .* bytes"):
        segments.from_bytes(data[:-1], "test.seg")
    with pytest.raises(IntegrityError, match="not a shardex delta segment"):
        segments.from_bytes(b"garbage" + data, "test.seg")


# ---------------------------------------------------------------- reindexes that add delta segments

def live_corpus(src) -> tuple[np.ndarray, np.ndarray]:
    t = pq.read_table(src)
    col = t.column("vector").combine_chunks()
    return t.column("id").to_numpy(), col.values.to_numpy().reshape(len(col), -1).copy()


def same_as_monolithic(root, src, nprobes=(1, 4, 32)):
    ids, x = live_corpus(src)
    r = Router(str(root), backend="local")
    np.testing.assert_array_equal(np.sort(np.concatenate([sh.ids() for sh in r.shards])), np.sort(ids))
    ref = monolithic(str(root), ids, x)
    xq = clustered(50, D, seed=21)
    for nprobe in nprobes:
        D1, I1 = r.search_vectors(xq, k=10, nprobe=nprobe)
        set_nprobe(ref, nprobe)
        D2, I2 = ref.search(xq, 10)
        assert_same_topk(D1, I1, D2, I2)


def change_again(src, k: int = 40, seed: int = 31):
    """Replace k of the vectors the first mutate added, and delete k of its new documents."""
    ids, x, titles = read_part(src, 2)
    x[:k] = clustered(k, D, seed=seed)
    keep = slice(0, len(ids) - k)
    pq.write_table(vector_table(ids[keep], x[keep], title=titles[keep]), src / "part-2.parquet")


@pytest.mark.parametrize("sharding,ondisk", [("hash", False), ("hash", True), ("ivf", False), ("ivf", True)])
def test_reindex_adds_delta_segments_that_search_as_one_index(ray_session, tmp_path, sharding, ondisk):
    src, root = tmp_path / "corpus", tmp_path / "index"
    write_vector_corpus(str(src), n=N, d=D, files=2, seed=3)
    v1 = build(ray_session, source=str(src), index_root=str(root), vector_column="vector", fields=["title"],
               factory="IVF32,PQ8", shards=3, sharding=sharding, part_rows=500,
               **({"merge_ram_budget": "1K"} if ondisk else {}))
    store = Store(str(root))
    m1 = load_manifest(store, v1.version)

    mutate(src)  # 100 deleted, 100 changed, 100 new
    stamps = {p: os.stat(store.path(p)).st_mtime_ns for p in m1.embeddings.parts}
    s = reindex(ReindexConfig(source=str(src), index_root=str(root), drift_error=100))
    m2 = load_manifest(store, current_version(store))
    # file 0 did not change: its parts are the live version's own, not written again
    same = [p for p in m2.embeddings.parts if p in stamps]
    assert len(same) == 3 and all(os.stat(store.path(p)).st_mtime_ns == stamps[p] for p in same)
    assert s.published and not s.retrained and m2.lineage.segments == "delta"
    assert [sh.file for sh in m2.shards] == [f"/versions/{v1.version}/shard-{i}.index" for i in range(3)]
    assert sum(d.ntotal for sh in m2.shards for d in sh.deltas) == 200
    assert sum(sh.dead_count for sh in m2.shards) == 200 and m2.ntotal == N
    assert all(bool(sh.ivfdata) == ondisk for sh in m2.shards)
    assert m2.search.nprobe == m1.search.nprobe and m2.trained.sha256 == m1.trained.sha256
    same_as_monolithic(root, src)

    change_again(src)  # entries of the first delta die, a second delta comes
    reindex(ReindexConfig(source=str(src), index_root=str(root), drift_error=100))
    m3 = load_manifest(store, current_version(store))
    assert m3.version != m2.version and max(len(sh.deltas) for sh in m3.shards) == 2
    assert m3.ntotal == N - 40
    same_as_monolithic(root, src)
    # the delta versions wrote codes for what changed, not the corpus
    own = [sz for p, sz in m3.listed() if p.startswith(f"versions/{m3.version}/") and p.endswith(".seg")]
    assert sum(own) < 0.1 * sum(sh.bytes for sh in m1.shards)


def test_compaction_rewrites_segments_into_a_base_and_prune_keeps_what_is_referred_to(ray_session, tmp_path):
    from shards.storage.manifest import verify
    from shards.storage.retention import prune

    src, root = tmp_path / "corpus", tmp_path / "index"
    write_vector_corpus(str(src), n=N, d=D, files=2, seed=4)
    v1 = build(ray_session, source=str(src), index_root=str(root), vector_column="vector", fields=["title"],
               factory="IVF32,PQ8", shards=2, part_rows=500)
    store = Store(str(root))
    mutate(src)
    reindex(ReindexConfig(source=str(src), index_root=str(root), drift_error=100))
    change_again(src)
    reindex(ReindexConfig(source=str(src), index_root=str(root), drift_error=100))
    m3 = load_manifest(store, current_version(store))
    assert all(len(sh.deltas) == 2 for sh in m3.shards)

    # prune: v1's directory goes but for the files v3 refers to; v3 loads, verifies and searches whole
    pruned = prune(store, keep=1, grace_s=0)
    assert pruned.versions == [v1.version] and not store.exists(f"versions/{v1.version}/manifest.json")
    verify(store, m3)
    same_as_monolithic(root, src)

    # `shardex compact --all`: the same vectors, one base a shard, a new version; then nothing is due
    from index_builder.cli import main

    assert main(["compact", str(root), "--shard", "0"]) == 0
    m0 = load_manifest(store, current_version(store))
    assert m0.lineage.compacted == {"0": "asked"} and [sh.segmented for sh in m0.shards] == [False, True]
    assert main(["compact", str(root), "--shard", "7"]) == 1   # refused, one line
    assert main(["compact", str(root), "--all"]) == 0
    mc = load_manifest(store, current_version(store))
    assert mc.lineage.kind == "compact" and mc.lineage.parent == m0.version and list(mc.lineage.compacted) == ["1"]
    assert mc.shards[0].file == f"/versions/{m0.version}/shard-0.index"
    assert not any(sh.segmented for sh in mc.shards) and mc.ntotal == m3.ntotal
    same_as_monolithic(root, src)
    assert main(["compact", str(root)]) == 0 and current_version(store) == mc.version
    reindex(ReindexConfig(source=str(src), index_root=str(root), drift_error=100))  # unchanged: nothing new
    assert current_version(store) == mc.version

    change_again(src, seed=41)
    s = reindex(ReindexConfig(source=str(src), index_root=str(root), drift_error=100, compact_share=0.001))
    m4 = load_manifest(store, current_version(store))
    assert s.published and sorted(m4.lineage.compacted) == ["0", "1"]
    assert all(not sh.segmented and sh.file == f"shard-{i}.index" for i, sh in enumerate(m4.shards))
    assert m4.ntotal == N - 80  # the second change_again: 20 replaced, 40 deleted
    assert m4.lineage.located["assigned"] == 0  # prune kept the list records of the parts kept versions use
    same_as_monolithic(root, src)


def records_match(store, m):
    """Every part of m has list records covering it, equal to its vectors assigned by m's quantizer."""
    from index_builder.build import rowlists
    from index_builder.encode.parts import read_vectors
    from index_builder.reindex.drift import assign
    from shards.storage.faissio import read_index

    index = read_index(store, m.path(m.trained.file))
    for p in m.embeddings.parts:
        _, x = read_vectors(store, p)
        np.testing.assert_array_equal(rowlists.read(store, p, m.trained.sha256, len(x)), assign(index, x)[0])


def test_the_lists_of_dead_entries_come_from_the_records_of_the_add(ray_session, tmp_path):
    """The add records each row's list; a reindex finds the base entries it kills there (not by reading
    and assigning their vectors), the delta ones in the deltas; without records it assigns, and is exact."""
    src, root = tmp_path / "corpus", tmp_path / "index"
    write_vector_corpus(str(src), n=N, d=D, files=2, seed=5)
    v1 = build(ray_session, source=str(src), index_root=str(root), vector_column="vector", fields=["title"],
               factory="IVF32,PQ8", shards=3, sharding="ivf", part_rows=500, add_rows=700)
    store = Store(str(root))
    records_match(store, load_manifest(store, v1.version))
    mutate(src)  # 100 deleted and 100 changed, in v1's base
    # no compaction: grouped lists send a file's new vectors to few shards, which would pass 10% of a base
    reindex(ReindexConfig(source=str(src), index_root=str(root), drift_error=100, compact_share=10))
    m2 = load_manifest(store, current_version(store))
    assert m2.lineage.located == {"deltas": 0, "records": 200, "assigned": 0}
    records_match(store, m2)  # the reindexed part's kept rows too

    def change(rows):
        ids, x, titles = read_part(src, 1)
        x[rows] = clustered(len(x[rows]), D, seed=rows.start)
        pq.write_table(vector_table(ids, x, title=titles), src / "part-1.parquet")

    change(slice(0, 20))     # rows the first reindex changed: entries of its delta
    change(slice(100, 130))  # rows it kept: entries of v1's base, found in the reindexed part's record
    reindex(ReindexConfig(source=str(src), index_root=str(root), drift_error=100, compact_share=10))
    m3 = load_manifest(store, current_version(store))
    assert m3.lineage.located == {"deltas": 20, "records": 30, "assigned": 0}
    same_as_monolithic(root, src)
    ids, x, titles = read_part(src, 1)  # deletions only: nothing to add, the part's records still written
    pq.write_table(vector_table(ids[5:], x[5:], title=titles[5:]), src / "part-1.parquet")
    reindex(ReindexConfig(source=str(src), index_root=str(root), drift_error=100, compact_share=10))
    m4 = load_manifest(store, current_version(store))
    assert m4.lineage.located == {"deltas": 5, "records": 0, "assigned": 0} and m4.ntotal == m3.ntotal - 5
    records_match(store, m4)

    for fp in store.ls("embeddings"):  # records gone (an index built before them): assigned, as exact
        for d in store.ls(f"embeddings/{fp}"):
            if d.startswith("lists-"):
                store.rm(f"embeddings/{fp}/{d}", recursive=True)
    change(slice(200, 210))
    reindex(ReindexConfig(source=str(src), index_root=str(root), drift_error=100))
    m5 = load_manifest(store, current_version(store))
    assert m5.lineage.located == {"deltas": 0, "records": 0, "assigned": 10}
    same_as_monolithic(root, src)


FILTERS = [
    ({"cat": {"in": ["a", "b"]}}, lambda a: np.isin(a["cat"], ["a", "b"])),        # a batch of matches
    ({"cat": {"in": list("abcdefg")}}, lambda a: a["cat"] != "h"),                # the non-matches, negated
    ({"year": {"gte": 1990}}, lambda a: a["year"] >= 1990),                       # every document
]


def test_filtered_search_over_segments_sees_live_entries_only(ray_session, tmp_path):
    """Filters on a segmented shard: replaced and deleted documents never match, whatever the selector's kind."""
    src, root = tmp_path / "corpus", tmp_path / "index"
    src.mkdir()
    rng = np.random.default_rng(2)
    x = clustered(N, D, seed=6)
    ids = np.arange(N, dtype=np.int64) * 5 + 2
    attrs = {"year": rng.integers(1990, 2020, N), "cat": rng.choice(list("abcdefgh"), N)}
    pq.write_table(vector_table(ids, x, **attrs), str(src / "part-0.parquet"), row_group_size=500)
    build(ray_session, source=str(src), index_root=str(root), vector_column="vector", fields=["year", "cat"],
          factory="IVF32,Flat", shards=2, metric="l2", part_rows=1000)
    # 200 replaced (new vector, new category), 200 deleted
    x2, a2 = x.copy(), {k: v.copy() for k, v in attrs.items()}
    x2[:200] = clustered(200, D, seed=8)
    a2["cat"][:200] = "a"
    keep = np.r_[0:200, 400:N]
    pq.write_table(vector_table(ids[keep], x2[keep], **{k: v[keep] for k, v in a2.items()}),
                   str(src / "part-0.parquet"), row_group_size=500)
    reindex(ReindexConfig(source=str(src), index_root=str(root), drift_error=100))
    m = load_manifest(Store(str(root)), current_version(Store(str(root))))
    assert all(sh.segmented for sh in m.shards)

    r = Router(str(root), backend="local", filter_fields=["year", "cat"])
    xq, k = np.concatenate([x2[:8], x[200:208], x[1000:1008]]), 10  # replaced, deleted and kept ones' vectors
    lx, li, la = x2[keep], ids[keep], {kk: v[keep] for kk, v in a2.items()}
    for spec, fn in FILTERS:
        match = fn(la)
        d = ((xq[:, None, :] - lx[match][None]) ** 2).sum(-1)
        o = np.argsort(d, axis=1, kind="stable")[:, :k]
        D1, I1 = r.search_vectors(xq, k, nprobe=32, filter=spec)
        np.testing.assert_allclose(D1, np.take_along_axis(d, o, 1), rtol=1e-4, atol=1e-3)
        np.testing.assert_array_equal(I1, li[match][o])
    r.close()


def test_a_prune_killed_half_way_deletes_nothing_a_kept_version_uses(ray_session, tmp_path):
    """`shardex prune` SIGKILLed between deleting v1's manifest and its files (v3 refers to v1's base
    segments): v3 still loads, verifies and searches whole, and the prune run again finishes."""
    import subprocess
    import sys

    from shards.storage.manifest import list_versions, verify

    from helpers import cli_env

    src, root = tmp_path / "corpus", tmp_path / "index"
    write_vector_corpus(str(src), n=N, d=D, files=2, seed=5)
    v1 = build(ray_session, source=str(src), index_root=str(root), vector_column="vector", fields=["title"],
               factory="IVF32,PQ8", shards=2, part_rows=500)
    mutate(src)
    reindex(ReindexConfig(source=str(src), index_root=str(root), drift_error=100))
    change_again(src)
    reindex(ReindexConfig(source=str(src), index_root=str(root), drift_error=100))
    store = Store(str(root))
    m3 = load_manifest(store, current_version(store))
    shardex = [sys.executable, "-m", "index_builder.cli", "prune", str(root), "--keep", "1", "--grace", "0"]
    p = subprocess.run(shardex, env=cli_env(SHARDEX_CRASH_AT=f"versions/{v1.version}/lists.npy"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr[-2000:]
    assert v1.version not in [v["version"] for v in list_versions(store)]  # its manifest went first
    verify(store, m3)
    same_as_monolithic(root, src)
    p = subprocess.run(shardex, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert not store.exists(f"versions/{v1.version}/lists.npy")
    verify(store, m3)
    same_as_monolithic(root, src)

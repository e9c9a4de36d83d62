"""IVF at scale, without Ray: list ranges, routing, id digests, probed lists, and the merge's checks.

Pure functions are tables of parametrize rows; the faiss pieces use a few thousand clustered vectors.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import clustered
from index_builder.add import add_assigned, part_dir
from index_builder.merge import index_digest, merge_shard, open_merged, shard_info
from index_builder.shard_math import ids_digest, ivf_ranges, range_shard, sum_digests
from shards.errors import ConfigError, IntegrityError
from shards.faissio import coarse_search, faiss, ivf, probed_lists, search_preassigned, set_nprobe, write_index
from shards.routing import list_owner, shards_for_lists
from shards.store import Store

# ================================================================ ivf_ranges

# (list sizes, shards, the ranges)
RANGE_ROWS = [
    ([10, 10, 10, 10], 1, [[0, 4]]),
    ([10, 10, 10, 10], 2, [[0, 2], [2, 4]]),
    ([10, 10, 10, 10], 4, [[0, 1], [1, 2], [2, 3], [3, 4]]),
    ([30, 10, 10, 10], 2, [[0, 1], [1, 4]]),                 # by vectors: one big list is half
    ([1, 1, 1, 1, 1, 1, 1, 1, 24], 2, [[0, 8], [8, 9]]),     # eight lists weigh what one does
    ([0, 0, 0, 0, 0, 0], 3, [[0, 2], [2, 4], [4, 6]]),       # no vectors: split the lists evenly
    ([0, 0, 5, 5, 0, 0], 2, [[0, 3], [3, 6]]),
    ([100, 0, 0, 0], 4, [[0, 1], [1, 2], [2, 3], [3, 4]]),   # every shard keeps at least one list
    ([0, 0, 0, 100], 2, [[0, 3], [3, 4]]),
    ([5, 1, 1, 1, 1, 1, 0, 10], 3, [[0, 3], [3, 7], [7, 8]]),
    ([7], 1, [[0, 1]]),
]


@pytest.mark.parametrize("sizes,shards,want", RANGE_ROWS)
def test_ivf_ranges(sizes, shards, want):
    assert ivf_ranges(sizes, shards) == want


@pytest.mark.parametrize("seed,nlist,shards", [(0, 64, 2), (1, 64, 3), (2, 1024, 7), (3, 4096, 16), (4, 100, 100),
                                               (5, 37, 5), (6, 4096, 1)])
def test_ivf_ranges_cover_and_balance(seed, nlist, shards):
    """Contiguous, covering 0..nlist, and each shard within one list's size of its even share."""
    rng = np.random.default_rng(seed)
    sizes = rng.zipf(1.6, nlist).clip(0, 5000)             # skewed, as real IVF lists are
    r = ivf_ranges(sizes, shards)
    assert r[0][0] == 0 and r[-1][1] == nlist and len(r) == shards
    assert all(a < b for a, b in r) and all(r[i][1] == r[i + 1][0] for i in range(shards - 1))
    loads = np.array([sizes[a:b].sum() for a, b in r])
    assert loads.sum() == sizes.sum()
    # every cut sits at the boundary nearest its ideal point, so a shard is off by at most one list
    assert np.abs(loads - sizes.sum() / shards).max() <= sizes.max() + 1e-9


@pytest.mark.parametrize("sizes,shards", [([1, 2, 3], 4), ([], 1)])
def test_ivf_ranges_more_shards_than_lists(sizes, shards):
    with pytest.raises(ConfigError, match="shards"):
        ivf_ranges(sizes, shards)


# ================================================================ routing

# (probed lists per query, ranges, shards to ask per query)
ROUTE_ROWS = [
    ([[0, 1]], [[0, 2], [2, 4]], [{0}]),
    ([[0, 3]], [[0, 2], [2, 4]], [{0, 1}]),
    ([[3, 2], [1, -1]], [[0, 2], [2, 4]], [{1}, {0}]),        # -1: the quantizer found no more lists
    ([[5, 0, 9]], [[0, 1], [1, 6], [6, 10]], [{0, 1, 2}]),
    ([[-1, -1]], [[0, 4]], [set()]),
    ([[7]], [[0, 3], [3, 7], [7, 8]], [{2}]),
]


@pytest.mark.parametrize("lists,ranges,want", ROUTE_ROWS)
def test_shards_for_lists(lists, ranges, want):
    assert shards_for_lists(np.array(lists), ranges) == want


def test_list_owner_matches_the_ranges():
    ranges = ivf_ranges(np.arange(50) % 7, 6)
    owner = list_owner(np.arange(50), ranges)
    for s, (a, b) in enumerate(ranges):
        assert (owner[a:b] == s).all()
    np.testing.assert_array_equal(range_shard(np.arange(50), ranges), owner)
    with pytest.raises(ValueError, match="list numbers"):
        list_owner(np.array([50]), ranges)


# ================================================================ id digests

@pytest.mark.parametrize("ids", [[], [0], [1, 2, 3], [2**63 - 1, 0, -1], list(range(1000))])
def test_ids_digest_is_order_free_and_adds_up(ids):
    ids = np.array(ids, dtype=np.int64)
    d = ids_digest(ids)
    assert d[0] == len(ids) and ids_digest(ids[::-1]) == d
    k = len(ids) // 2
    assert sum_digests([ids_digest(ids[:k]), ids_digest(ids[k:])]) == d


@pytest.mark.parametrize("change", ["drop", "duplicate", "alter", "swap_for_duplicate"])
def test_ids_digest_sees_changes(change):
    ids = np.arange(10_000, dtype=np.int64) * 3 + 1
    bad = {"drop": ids[1:], "duplicate": np.append(ids, ids[5]), "alter": np.where(ids == 4, 5, ids),
           "swap_for_duplicate": np.append(ids[1:], ids[2])}[change]
    assert ids_digest(bad) != ids_digest(ids)


# ================================================================ probed lists

@pytest.mark.parametrize("factory,metric", [("IVF32,Flat", "l2"), ("IVF32,Flat", "ip"), ("PCA16,IVF16,Flat", "l2"),
                                            ("OPQ4_16,IVF16,PQ4x4", "ip")])
def test_probed_lists_are_the_lists_the_index_searches(factory, metric):
    """Searching only the probed lists (search_preassigned) gives the index's own answer."""
    x = clustered(3000, 32, seed=1)
    index = faiss().index_factory(32, factory, faiss().METRIC_INNER_PRODUCT if metric == "ip" else faiss().METRIC_L2)
    index.train(x)
    index.add(x)
    xq = x[::61]
    for nprobe in (1, 3, 16, 100):
        L = probed_lists(index, xq, nprobe)
        assert L.shape == (len(xq), min(nprobe, ivf(index).nlist))
        set_nprobe(index, nprobe)
        D1, I1 = index.search(xq, 5)
        D2, I2 = search_preassigned(index, xq, 5, coarse_search(index, xq, nprobe))
        np.testing.assert_array_equal(I1, I2)
        np.testing.assert_allclose(D1, D2, rtol=1e-5)


# ================================================================ add and merge, without Ray

D, NL = 16, 16


@pytest.fixture(scope="module")
def trained():
    x = clustered(4000, D, seed=3)
    index = faiss().index_factory(D, f"IVF{NL},PQ4x4")
    index.train(x)
    return index, x


def _work(tmp_path, trained, parts=3):
    """A work dir as the add stage leaves it for one shard (s=0): trained.index and part sub-indexes."""
    index, x = trained
    store, work = Store(str(tmp_path)), "work/w"
    write_index(store, f"{work}/trained.index", index)
    ids = np.arange(len(x), dtype=np.int64) * 5 + 2
    digests = []
    for p, sl in enumerate(np.array_split(np.arange(len(x)), parts)):
        sub = faiss().clone_index(index)
        add_assigned(sub, x[sl], ids[sl])
        write_index(store, f"{part_dir(work, p)}/shard-0.index", sub)
        digests.append(ids_digest(ids[sl]))
    return store, work, ids, x, list(sum_digests(digests))


@pytest.mark.parametrize("ondisk", [False, True])
def test_merge_in_ram_and_on_disk_equal_the_monolithic_index(tmp_path, trained, ondisk):
    store, work, ids, x, want = _work(tmp_path, trained)
    out = merge_shard(store, f"{work}/trained.index", work, [0, 1, 2], 0, want, ondisk)
    assert out["ntotal"] == len(x) and bool(out["ivfdata"]) == ondisk
    shard = open_merged(store, work, 0)
    assert isinstance(faiss().downcast_InvertedLists(ivf(shard).invlists), faiss().OnDiskInvertedLists) == ondisk
    mono = faiss().clone_index(trained[0])
    mono.add_with_ids(x, ids)
    for nprobe in (1, 4, NL):
        set_nprobe(shard, nprobe)
        set_nprobe(mono, nprobe)
        D1, I1 = shard.search(x[::50], 10)
        D2, I2 = mono.search(x[::50], 10)
        np.testing.assert_array_equal(I1, I2)
        np.testing.assert_array_equal(D1, D2)
    assert index_digest(shard) == ids_digest(ids)
    info = shard_info(store, work, 0)
    assert info.sha256 == store.sha256(f"{work}/shards/shard-0.index")
    if ondisk:
        assert info.ivfdata_sha256 == store.sha256(f"{work}/shards/shard-0.ivfdata")
        assert info.ivfdata_bytes == len(x) * (8 + ivf(shard).code_size)   # lists sized exactly, no slack


@pytest.mark.parametrize("ondisk", [False, True])
def test_merge_refuses_another_quantizer(tmp_path, trained, ondisk):
    store, work, ids, x, want = _work(tmp_path, trained)
    other = faiss().index_factory(D, f"IVF{NL},PQ4x4")
    other.train(clustered(4000, D, seed=99))
    other.add_with_ids(x[:10], ids[:10])
    write_index(store, f"{part_dir(work, 1)}/shard-0.index", other)
    with pytest.raises(IntegrityError, match=r"part-00001/shard-0.index: trained with a different quantizer"):
        merge_shard(store, f"{work}/trained.index", work, [0, 1, 2], 0, want, ondisk)
    assert not store.exists(f"{work}/shards/shard-0.index.json")


@pytest.mark.parametrize("ondisk", [False, True])
@pytest.mark.parametrize("damage", ["missing_part", "other_ids"])
def test_merge_checks_ntotal_and_ids(tmp_path, trained, ondisk, damage):
    store, work, ids, x, want = _work(tmp_path, trained)
    parts = [0, 1, 2]
    if damage == "missing_part":
        parts = [0, 1]
        match = r"shard 0: merged \d+ vectors, not the 4000"
    else:   # a part re-added with shifted ids (what merge_from with add_id != 0 does): same count
        index, _ = trained
        sub = faiss().clone_index(index)
        sl = np.array_split(np.arange(len(x)), 3)[2]
        add_assigned(sub, x[sl], ids[sl] + 1)
        write_index(store, f"{part_dir(work, 2)}/shard-0.index", sub)
        match = r"shard 0: merged other ids than the 4000"
    with pytest.raises(IntegrityError, match=match):
        merge_shard(store, f"{work}/trained.index", work, parts, 0, want, ondisk)
    assert not store.exists(f"{work}/shards/shard-0.index.json")


def test_merge_commit_is_reused(tmp_path, trained):
    store, work, ids, x, want = _work(tmp_path, trained)
    first = merge_shard(store, f"{work}/trained.index", work, [0, 1, 2], 0, want, True)
    again = merge_shard(store, f"{work}/trained.index", work, [0, 1, 2], 0, want, True)
    assert again["reused"] and not first["reused"]
    assert json.loads(store.read_text(f"{work}/shards/shard-0.index.json"))["ivfdata"] == "shard-0.ivfdata"
    assert [n for n in store.ls(f"{work}/shards")] == ["shard-0.index", "shard-0.index.json", "shard-0.ivfdata"]


def test_add_assigned_equals_add_with_ids(trained):
    index, x = trained
    ids = np.arange(len(x), dtype=np.int64) * 7
    a, b = faiss().clone_index(index), faiss().clone_index(index)
    lists = add_assigned(a, x, ids)
    b.add_with_ids(x, ids)
    assert a.ntotal == b.ntotal == len(x)
    np.testing.assert_array_equal(lists, probed_lists(index, x, 1)[:, 0])
    for l in range(NL):
        got = faiss().rev_swig_ptr(ivf(a).invlists.get_ids(l), ivf(a).invlists.list_size(l))
        np.testing.assert_array_equal(np.sort(got), np.sort(ids[lists == l]))
    set_nprobe(a, 4)
    set_nprobe(b, 4)
    np.testing.assert_array_equal(a.search(x[:20], 5)[1], b.search(x[:20], 5)[1])


# ================================================================ the manifest's on-disk shards

def test_manifest_lists_and_verifies_ivfdata(tmp_path):
    from shards.manifest import (DocsInfo, EncoderInfo, FileInfo, IndexInfo, Manifest, ShardingInfo, SourceInfo,
                                 load_manifest, verify, write_manifest)

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

"""IVF at scale, without Ray: list ranges, routing, id digests, probed lists, and the merge's checks.

Pure functions are tables of parametrize rows; the faiss pieces use a few thousand clustered vectors.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import clustered
from index_builder.build.add import add_assigned, part_dir
from index_builder.build.merge import index_digest, merge_shard, open_merged, shard_info
from index_builder.shard_math import ids_digest, ivf_ranges, range_shard, sum_digests
from shards.errors import ConfigError, IntegrityError
from shards.storage.faissio import coarse_search, faiss, ivf, probed_lists, search_preassigned, set_nprobe, write_index
from shards.search.shard_selection import list_owner, shards_for_lists
from shards.storage.store import Store

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
    assert first["rss_anon_peak_mib"] >= first["rss_anon_start_mib"] > 0       # the merge's memory, recorded
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
    from shards.storage.manifest import (DocsInfo, EncoderInfo, FileInfo, IndexInfo, Manifest, ShardingInfo, SourceInfo,
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


# ================================================================ --factory auto at real sizes, and its plan

from index_builder.plan.factory import (ID_BYTES, LIST_OVERHEAD, MIN_TRAIN_PER_LIST, TRAIN_MAX_BYTES,  # noqa: E402
                                  choose_factory, factory_shape, nlist_for, index_plan, train_size)
from shards.config import parse_bytes  # noqa: E402

# (N, d, nlist): about 4*sqrt(N) to 16*sqrt(N), growing with N, halved to fit the training sample
NLIST_ROWS = [
    (1_000, None, 16),
    (1_000_000, 128, 4096),              # 4*sqrt(N)
    (1_000_001, 128, 8192),              # 8*sqrt(N) above a million
    (10_000_000, 768, 32768),
    (100_000_000, 128, 65536),
    (100_000_001, None, 131072),         # 16*sqrt(N) above a hundred million ...
    (1_000_000_000, None, 524288),
    (1_000_000_000, 128, 131072),        # ... unless 39 a list would not fit 4 GiB of sample
    (1_000_000_000, 768, 32768),
    (1_000_000_000, 4096, 4096),
]


@pytest.mark.parametrize("n,d,want", NLIST_ROWS)
def test_nlist_grows_with_n_within_the_training_memory(n, d, want):
    k = nlist_for(n, d)
    assert k == want
    assert k * MIN_TRAIN_PER_LIST * 4 * (d or 0) <= TRAIN_MAX_BYTES or k == 1
    assert train_size(n, d or 128, f"IVF{k},PQ16", k) >= k * MIN_TRAIN_PER_LIST


# (N, d, budget, need_ivf, factory): --sharding ivf never gets plain Flat
@pytest.mark.parametrize("n,d,budget,need_ivf,want", [
    (5_000, 32, "1G", False, "Flat"),
    (5_000, 32, "1G", True, "IVF128,Flat"),
    (100, 8, "1G", True, "IVF2,Flat"),
    (1, 8, "1G", True, "IVF1,Flat"),
    (1_000_000, 384, "512M", False, "OPQ128_384,IVF4096,PQ128"),    # 1M MiniLM vectors in 512 MiB
    (1_000_000, 384, "100M", True, "OPQ64_256,IVF4096,PQ64"),
])
def test_choose_factory_for_ivf_sharding(n, d, budget, need_ivf, want):
    assert choose_factory(n, d, parse_bytes(budget), need_ivf=need_ivf).factory == want


# (factory, d, (dims after pre-transforms, nlist, code bytes))
@pytest.mark.parametrize("factory,d,want", [
    ("Flat", 32, (32, None, 128)),
    ("IVF4096,Flat", 128, (128, 4096, 512)),
    ("IVF4096,PQ32", 128, (128, 4096, 32)),
    ("IVF256,PQ16x4", 64, (64, 256, 8)),
    ("IVF256,PQ32x4fs", 64, (64, 256, 16)),
    ("OPQ64_256,IVF4096,PQ64", 768, (256, 4096, 64)),
    ("OPQ16,IVF64,PQ16", 64, (64, 64, 16)),
    ("PCA64,IVF128,SQ8", 384, (64, 128, 64)),
    ("PCAR32,IVF16,SQfp16", 64, (32, 16, 64)),
    ("IVF64,SQ4", 30, (30, 64, 15)),
    ("HNSW32", 64, (64, None, None)),             # not sized: the plan says so
    ("IVF1024_HNSW32,PQ8", 64, (64, 1024, 8)),
])
def test_factory_shape(factory, d, want):
    assert factory_shape(factory, d) == want


# (N, d, factory, shards, merge RAM budget) -> (memory per shard, on disk, training sample)
PLAN_ROWS = [
    (1_000_000, 128, "IVF4096,PQ32", 4, "1G", (1_000_000 / 4 * 40 * LIST_OVERHEAD, False, 409_600)),
    (1_000_000, 128, "IVF4096,PQ32", 1, "10M", (1_000_000 * 40 * LIST_OVERHEAD, True, 409_600)),
    # 4 GiB of sample is 1.4M vectors, under 39 a list: the 39 a list win
    (100_000_000, 768, "OPQ64_256,IVF65536,PQ64", 16, "256M", (100_000_000 / 16 * 72 * LIST_OVERHEAD, True,
                                                              65536 * MIN_TRAIN_PER_LIST)),
    (5_000, 32, "Flat", 2, "0", (2_500 * (128 + ID_BYTES) * LIST_OVERHEAD, False, 5_000)),   # Flat: never on disk
]


@pytest.mark.parametrize("n,d,factory,shards,ram,want", PLAN_ROWS)
def test_plan(n, d, factory, shards, ram, want):
    p = index_plan(n, d, factory, shards, parse_bytes(ram))
    shard, on_disk, train = want
    assert p.shard_bytes == pytest.approx(shard, abs=1) and p.on_disk == on_disk and p.train_vectors == train
    assert p.index_bytes == p.shard_bytes * shards and p.train_bytes == train * d * 4
    text = "\n".join(p.lines())
    for fragment in ("memory per shard", "disk", "training sample", f"{train:,} vectors"):
        assert fragment in text
    assert ("on-disk lists" in text) == on_disk


def test_plan_of_an_unknown_encoding():
    p = index_plan(10_000, 64, "HNSW32", 2, 1 << 30)
    assert p.shard_bytes is None and "unknown" in "\n".join(p.lines())


# ================================================================ the published default nprobe

from index_builder.build.tune import choose_nprobe, plateaued  # noqa: E402


def _rows(recalls):
    return [{"nprobe": 2 ** i, "recall": r} for i, r in enumerate(recalls)]


# (recall at nprobe 1, 2, 4, ..., target, the default nprobe)
@pytest.mark.parametrize("recalls,target,want", [
    ([0.5, 0.8, 0.96], 0.95, 4),               # the smallest reaching the target
    ([0.95], 0.95, 1),
    ([0.5, 0.7, 0.83, 0.84, 0.841], 0.95, 8),  # PQ caps recall: the smallest within 0.005 of the best
    ([0.5, 0.7, 0.836, 0.8395, 0.84], 0.95, 4),
    ([0.3], 0.95, 1),
])
def test_choose_nprobe(recalls, target, want):
    assert choose_nprobe(_rows(recalls), target)["nprobe"] == want


@pytest.mark.parametrize("recalls,want", [([0.5, 0.8], False), ([0.5, 0.8, 0.801], False),
                                          ([0.83, 0.831, 0.832], True), ([0.7, 0.83, 0.831, 0.8319], True),
                                          ([0.9, 0.9, 0.95], False)])
def test_the_ladder_stops_on_a_plateau(recalls, want):
    assert plateaued(_rows(recalls)) == want

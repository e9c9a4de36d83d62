"""Built through the real pipeline on Ray: ivf-sharded, hash-sharded and on-disk indexes answer
exactly what one monolithic index (the version's trained index, every vector added) answers,
and routing a query to only the shards owning its probed lists changes nothing."""
from __future__ import annotations

import json

import numpy as np
import pytest

from index_builder.shard_math import ivf_ranges
from index_builder.workdir import WorkDir
from shards.errors import ConfigError
from shards.search.router import Router
from shards.search.shard_selection import shards_for_lists
from shards.search.topk import merge_topk
from shards.storage.faissio import faiss, ivf, probed_lists, read_index, set_nprobe
from shards.storage.manifest import current_version, load_manifest, vdir, verify
from shards.storage.store import Store

from helpers import assert_same_topk, build, monolithic, write_vector_corpus

N, D = 4000, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    src = tmp_path_factory.mktemp("ivfs") / "corpus"
    ids, x = write_vector_corpus(str(src), n=N, d=D, files=3, seed=11)
    return str(src), ids, x


# (factory, shards, sharding, merge RAM budget: 0 puts every shard on disk, bytes per merge task: a small
# one merges each on-disk shard by several tasks over list ranges, laid end to end)
BUILDS = [
    ("IVF32,PQ8x4", 3, "ivf", "auto", "2G"),
    ("IVF32,Flat", 2, "ivf", "0", "80K"),
    ("IVF32,PQ8x4", 2, "hash", "0", "2G"),
    ("IVF32,PQ8x4", 2, "hash", "0", "5K"),
    ("PCA16,IVF16,Flat", 4, "ivf", "auto", "2G"),
    ("IVF32_HNSW16,Flat", 2, "ivf", "auto", "2G"),   # an HNSW coarse quantizer: router and shards agree
]


@pytest.mark.parametrize("factory,shards,sharding,ram,task", BUILDS)
def test_sharded_and_on_disk_equal_monolithic(ray_session, corpus, tmp_path, factory, shards, sharding, ram, task):
    src, ids, x = corpus
    root = str(tmp_path / "index")
    s = build(ray_session, source=src, index_root=root, vector_column="vector", factory=factory, shards=shards,
              sharding=sharding, merge_ram_budget=ram, merge_task_bytes=task, metric="l2", add_rows=1500,
              route="all")   # every probed shard at every nprobe: ranked routing has its own tests
    assert s.documents == N
    store = Store(root)
    records = [json.loads(store.read_text(WorkDir(s.work).shard_record(i))) for i in range(shards)]
    assert all(r.get("ranges", 1) > 1 for r in records) == (task != "2G")    # split by list range over tasks
    assert not any(store.exists(f"{s.work}/merge/shard-{i}") for i in range(shards))  # the stretches deleted
    m = load_manifest(store, current_version(store))
    verify(store, m)                                      # .ivfdata files are checked too
    assert all(bool(f.ivfdata) == (ram == "0") for f in m.shards)
    assert len(m.files()) == 1 + shards * (2 if ram == "0" else 1)
    assert m.vectors and m.search.target_recall == 0.95
    assert m.index.train_device == "cpu" and m.index.train_seconds > 0 and m.index.train_vectors == N
    r = Router(root, backend="local")
    mono = monolithic(root, ids, x)
    xq = x[::53][:60]
    for nprobe in (1, 4, m.search.nprobe):
        set_nprobe(mono, nprobe)
        D1, I1 = r.search_vectors(xq, k=10, nprobe=nprobe)
        D2, I2 = mono.search(xq, 10)
        assert_same_topk(D1, I1, D2, I2)
    got = np.concatenate([sh.ids() for sh in r.shards])
    np.testing.assert_array_equal(np.sort(got), np.sort(ids))   # every vector exactly once
    if sharding == "ivf":
        _check_ranges(store, m, r, xq)


def _check_ranges(store, m, r, xq):
    """Each shard holds only its own lists, the ranges are balanced by vectors, and asking only
    the shards that own a query's probed lists gives the answer of asking all of them."""
    ranges, nl = m.sharding.ranges, m.index.nlist
    assert m.sharding.order == "grouped"
    assert ranges[0][0] == 0 and ranges[-1][1] == nl and len(ranges) == len(m.shards)
    sizes = np.zeros(nl, dtype=np.int64)
    for s, sh in enumerate(r.shards):
        inv = ivf(sh.index).invlists
        own = np.array([inv.list_size(l) for l in range(nl)])
        a, b = ranges[s]
        assert own[:a].sum() == own[b:].sum() == 0 and own[a:b].sum() == m.shards[s].ntotal
        sizes += own
    assert max(f.ntotal for f in m.shards) - N / len(m.shards) <= sizes.max()
    trained = read_index(store, f"{vdir(m.version)}/trained.index")
    nprobe = 2
    want = merge_topk([sh.search(xq, 10, nprobe) for sh in r.shards], 10, m.index.metric)
    asked = shards_for_lists(probed_lists(trained, xq, nprobe), ranges)
    assert any(len(a) < len(m.shards) for a in asked)               # routing does skip shards
    for q, a in enumerate(asked):
        got = merge_topk([r.shards[s].search(xq[q:q + 1], 10, nprobe) for s in sorted(a)], 10, m.index.metric)
        np.testing.assert_array_equal(got[1][0], want[1][q])


def test_kmeans_order_cuts_the_lists_by_vectors(ray_session, corpus, tmp_path):
    """--ivf-order kmeans: lists stay in k-means' order, ranges are cut at the boundaries nearest equal
    vector counts (shard_math.ivf_ranges), and the answers are still the monolithic index's."""
    src, ids, x = corpus
    root = str(tmp_path / "index")
    build(ray_session, source=src, index_root=root, vector_column="vector", factory="IVF32,Flat", shards=3,
          sharding="ivf", ivf_order="kmeans", metric="l2")
    store = Store(root)
    m = load_manifest(store, current_version(store))
    r = Router(root, backend="local")
    sizes = np.zeros(m.index.nlist, dtype=np.int64)
    for sh in r.shards:
        inv = ivf(sh.index).invlists
        sizes += [inv.list_size(l) for l in range(m.index.nlist)]
    assert m.sharding.order == "kmeans" and m.sharding.ranges == ivf_ranges(sizes, 3)
    mono = monolithic(root, ids, x)
    set_nprobe(mono, 4)
    assert_same_topk(*r.search_vectors(x[:40], k=10, nprobe=4), *mono.search(x[:40], 10))


def test_ivf_sharding_needs_an_ivf_factory(ray_session, corpus, tmp_path):
    src, _, _ = corpus
    with pytest.raises(ConfigError, match="sharding: ivf needs an IVF index"):
        build(ray_session, source=src, index_root=str(tmp_path / "i"), vector_column="vector", factory="Flat",
              shards=2, sharding="ivf")


def test_auto_factory_with_ivf_sharding_picks_ivf(ray_session, corpus, tmp_path):
    """N < 10k would be Flat under auto; ivf sharding needs lists, so auto picks IVF."""
    src, _, _ = corpus
    s = build(ray_session, source=src, index_root=str(tmp_path / "i"), vector_column="vector", shards=2,
              sharding="ivf")
    assert s.factory.startswith("IVF") and s.shards == 2


def test_on_disk_shard_is_mmapped_when_served(ray_session, corpus, tmp_path):
    src, _, x = corpus
    root = str(tmp_path / "index")
    build(ray_session, source=src, index_root=root, vector_column="vector", factory="IVF32,Flat", shards=1,
          merge_ram_budget="0")
    r = Router(root, backend="local")
    inv = faiss().downcast_InvertedLists(ivf(r.shards[0].index).invlists)
    assert isinstance(inv, faiss().OnDiskInvertedLists)
    assert inv.filename.endswith(f"versions/{r.version}/shard-0.ivfdata")    # the published copy, not work/
    D, I = r.search_vectors(x[:5], k=1, nprobe=32)
    assert (D[:, 0] < 1e-3).all()


@pytest.mark.s3
def test_ivf_on_disk_shards_on_s3(ray_session, s3, corpus, tmp_path, monkeypatch):
    """On S3 the on-disk merge builds locally and uploads; serving fetches .index and .ivfdata
    into a local cache and mmaps them; the answers equal a local build's."""
    monkeypatch.setenv("SHARDEX_CACHE_DIR", str(tmp_path / "cache"))
    src, ids, x = corpus
    kw = dict(source=src, vector_column="vector", factory="IVF32,PQ8x4", shards=2, sharding="ivf",
              merge_ram_budget="0", metric="l2")
    build(ray_session, index_root="s3://indexes/ivf-ondisk", s3_endpoint=s3, **kw)
    build(ray_session, index_root=str(tmp_path / "local"), **kw)
    r3 = Router("s3://indexes/ivf-ondisk", s3_endpoint=s3, backend="local")
    rl = Router(str(tmp_path / "local"), backend="local")
    assert [f.ivfdata for f in r3.manifest.shards] == ["shard-0.ivfdata", "shard-1.ivfdata"]
    assert r3.manifest.sharding.ranges == rl.manifest.sharding.ranges
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("shard-*"))
    assert cached == ["shard-0.index", "shard-0.ivfdata", "shard-1.index", "shard-1.ivfdata"]
    D1, I1 = r3.search_vectors(x[:30], k=10, nprobe=4)
    D2, I2 = rl.search_vectors(x[:30], k=10, nprobe=4)
    np.testing.assert_array_equal(I1, I2)


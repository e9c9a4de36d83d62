"""Invariants 1, 3 and 4 on precomputed vectors: exactly once, resume reuses work, sharded == monolithic."""
from __future__ import annotations

import os

import numpy as np
import pytest

from shards.search.router import Router
from shards.storage.manifest import current_version, load_manifest
from shards.storage.store import Store

from helpers import assert_same_topk, build, monolithic, write_vector_corpus

N, D = 10_000, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    src = tmp_path_factory.mktemp("vec") / "corpus"
    ids, x = write_vector_corpus(str(src), n=N, d=D, files=3, seed=7)
    return str(src), ids, x


@pytest.mark.parametrize("factory,shards", [
    ("IVF32,PQ8", 1), ("IVF32,PQ8", 2), ("IVF32,PQ8", 4),
    ("OPQ8_32,IVF32,PQ8", 2), ("Flat", 4), ("IVF64,Flat", 3),
])
def test_sharded_search_equals_monolithic(ray_session, corpus, tmp_path, factory, shards):
    src, ids, x = corpus
    root = str(tmp_path / "index")
    s = build(ray_session, source=src, index_root=root, vector_column="vector", fields=["title"],
              factory=factory, shards=shards)
    assert s.documents == N and s.shards == shards
    r = Router(root)
    xq = x[::97][:64]
    D1, I1 = r.search_vectors(xq, k=10)
    D2, I2 = monolithic(root, ids, x).search(xq, 10)
    assert_same_topk(D1, I1, D2, I2)
    r.close()


def test_every_document_exactly_once(ray_session, corpus, tmp_path):
    src, ids, _ = corpus
    root = str(tmp_path / "index")
    build(ray_session, source=src, index_root=root, vector_column="vector", fields=["title"],
          factory="IVF32,Flat", shards=3)
    r = Router(root, backend="local")
    got = np.concatenate([s.ids() for s in r.shards])
    assert len(got) == len(ids)
    np.testing.assert_array_equal(np.sort(got), np.sort(ids))
    docs = r.docs.dataset.to_table(columns=["id"]).column("id").to_numpy()
    np.testing.assert_array_equal(np.sort(docs), np.sort(ids))
    assert sum(s.ntotal for s in r.manifest.shards) == len(ids)


def test_rebuild_reuses_every_finished_unit(ray_session, corpus, tmp_path):
    """A second run of the same build redoes nothing and publishes identical shards."""
    src, _, _ = corpus
    root = str(tmp_path / "index")
    kw = dict(source=src, index_root=root, vector_column="vector", factory="IVF32,PQ8", shards=2)
    first = build(ray_session, **kw)
    store = Store(root)
    m1 = load_manifest(store, first.version)
    second = build(ray_session, **kw)
    m2 = load_manifest(store, second.version)
    parts = -(-N // 1000) + 2  # 3 files of 3,334 rows split into parts of <= 1,000
    assert second.reused["encode"] == len(m1.docs.files) and len(m1.docs.files) <= parts
    units = [u for u in os.listdir(os.path.join(root, first.work, "add")) if u.startswith("unit-")]
    assert second.reused["add"] == len(units) >= 1
    assert second.reused["merge"] == 2 and second.reused["train"] == 1
    assert [s.sha256 for s in m1.shards] == [s.sha256 for s in m2.shards]
    assert current_version(store) == second.version != first.version


def test_search_checks_dimension_and_k(ray_session, corpus, tmp_path):
    from shards.errors import SearchError

    src, _, x = corpus
    root = str(tmp_path / "index")
    build(ray_session, source=src, index_root=root, vector_column="vector", factory="Flat", shards=1)
    r = Router(root, backend="local")
    with pytest.raises(SearchError, match="dimension 16"):
        r.search_vectors(x[:2, :16])
    with pytest.raises(SearchError, match="k: 0"):
        r.search_vectors(x[:2], k=0)
    with pytest.raises(SearchError, match="fields"):
        r.search(x[:2], fields=["nope"])


@pytest.mark.parametrize("factory", ["IVF32,PQ8", "IVF32,PQ8x4fs"])
def test_tune_in_one_task_equals_an_actor_per_shard(ray_session, corpus, tmp_path, monkeypatch, factory):
    """Small shards are tuned by one task (as one index where the lists allow: PQ8, not fast-scan),
    big ones by an actor per shard ($SHARDEX_TUNE_LOCAL_BYTES=0 forces them): the same default nprobe
    and recall either way."""
    src, _, _ = corpus
    kw = dict(source=src, vector_column="vector", factory=factory, shards=3)
    one = build(ray_session, index_root=str(tmp_path / "one"), **kw)
    monkeypatch.setenv("SHARDEX_TUNE_LOCAL_BYTES", "0")
    each = build(ray_session, index_root=str(tmp_path / "each"), **kw)
    got = [load_manifest(Store(str(tmp_path / r)), s.version).search for r, s in (("one", one), ("each", each))]
    assert got[0].nprobe == got[1].nprobe and got[0].recall_at_10 == pytest.approx(got[1].recall_at_10, abs=0.005)
    assert got[0].eval_queries == got[1].eval_queries == 200

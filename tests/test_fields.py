"""Stored fields per serving shard (build/fields.py, storage/fields.py): written at publish sorted by id,
each shard's own documents only, read by the shard that returned the hit, kept right through a delta
reindex and a compaction, with no docs file read by a request."""
from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from index_builder.build.fields import cuts
from shards.search.router import Router
from shards.search.searcher import ShardSearcher
from shards.storage.manifest import current_version, load_manifest
from shards.storage.store import Store

from helpers import build, mutate, write_filterable_corpus, write_vector_corpus


@pytest.mark.parametrize("groups,n,want", [
    ([("a", 0, 0, 0, 99, 100, 0)], 1, []),
    ([("a", 0, 0, 0, 99, 100, 0)], 2, [50]),
    ([("a", 0, 0, 0, 99, 100, 0)], 4, [25, 50, 75]),
    ([("a", 0, 0, 0, 9, 100, 0), ("b", 0, 0, 1000, 1009, 100, 0)], 2, [10]),   # two dense clumps
    ([("a", 0, 0, 5, 5, 10, 0)], 3, []),                                       # one id: nothing to cut
    ([], 3, []),
])
def test_cuts_split_rows_evenly(groups, n, want):
    assert cuts(groups, n) == want


def shard_rows(root: str) -> tuple:
    """(manifest, per shard: the ids of its fields files in file order, and its index's ids)."""
    store = Store(root)
    m = load_manifest(store, current_version(store))
    out = []
    for sh in m.shards:
        got = [pq.read_table(store.path(m.path(f.file))).column("id").to_numpy() for f in sh.fields]
        out.append((np.concatenate(got) if got else np.empty(0, np.int64),
                    np.sort(ShardSearcher(store, m, sh).ids())))
    return m, out


def titles(r: Router, xq: np.ndarray) -> dict:
    return {h.id: h.fields["title"] for hs in r.search(xq, k=10, fields=["title"]) for h in hs}


def drop_docs(root: str) -> None:
    """Every docs part of the index gone: a request that read one would fail."""
    for p in glob.glob(os.path.join(root, "embeddings", "*", "docs", "*.parquet")):
        os.remove(p)


@pytest.mark.parametrize("sharding", ["hash", "ivf"])
def test_each_shard_holds_its_own_rows_sorted(ray_session, tmp_path, sharding):
    src = tmp_path / "corpus"
    ids, x = write_vector_corpus(str(src), files=3)
    root = str(tmp_path / "index")
    build(ray_session, source=str(src), index_root=root, vector_column="vector", factory="IVF16,Flat",
          shards=3, sharding=sharding, fields=["title"])
    m, rows = shard_rows(root)
    assert m.docs.per_shard
    for (got, own), sh in zip(rows, m.shards):
        assert (np.diff(got) > 0).all() and np.array_equal(got, own)
        assert [f.lo for f in sh.fields] == [int(got[0])] and sh.fields[0].hi == int(got[-1])
    assert np.array_equal(np.sort(np.concatenate([g for g, _ in rows])), np.sort(ids))
    drop_docs(root)
    r = Router(root, backend="local")
    try:
        hits = r.search(x[:20], k=10, fields=["title"])
        assert [len(hs) for hs in hits] == [10] * 20
        assert all(h.fields == {"title": f"doc {h.id}"} for hs in hits for h in hs)
        assert r.search(x[:2], k=3, fields=[])[0][0].fields == {}
    finally:
        r.close()


def test_a_lookup_finds_rows_by_row_group(ray_session, tmp_path):
    """Row groups are cut by bytes; a lookup finds each id's group by the groups' first ids, newest
    generation first, and leaves out ids the shard does not hold."""
    import pyarrow as pa

    from shards.storage import fields as layout
    from shards.storage.fields import ShardFields
    from shards.storage.manifest import vdir

    src = tmp_path / "corpus"
    write_vector_corpus(str(src), n=500, files=1)
    root = str(tmp_path / "index")
    build(ray_session, source=str(src), index_root=root, vector_column="vector", factory="Flat", shards=1,
          fields=["title"])
    store = Store(root)
    m = load_manifest(store, current_version(store))
    ids = np.arange(0, 4000, 2, dtype=np.int64)
    t = pa.table({"id": ids, "title": [f"{i}:" + "x" * 500 for i in ids]})
    old = layout.write(store, layout.rel(vdir(m.version), 0, 0, 0), t, 0)
    new = layout.write(store, layout.rel(vdir(m.version), 0, 1, 0), pa.table({"id": [10], "title": ["ten"]}), 1)
    sh = m.shards[0].model_copy(update={"fields": [f.model_copy(update={"file": f.file.split("/")[-1]})
                                                   for f in (old, new)]})
    sf = ShardFields(store, m, sh)
    _, firsts = sf._footer(m.path(sh.fields[0].file), sh.fields[0])
    assert len(firsts) == -(-len(ids) // layout.row_group_rows(t)) > 10
    assert firsts[0] == 0 and (np.diff(firsts) > 0).all()
    got = sf.lookup(np.array([3998, 10, 1, 0, -1, 10]), ["title"])
    assert {i: d["fields"]["title"][:6] for i, d in got.items()} == {3998: "3998:x", 10: "ten", 0: "0:xxxx"}
    assert got[10]["id"] == 10


@pytest.mark.parametrize("sharding", ["hash", "ivf"])
def test_fields_follow_a_delta_reindex_and_its_compaction(ray_session, tmp_path, sharding):
    from index_builder.config import ReindexConfig
    from index_builder.reindex.compaction import compact_root
    from index_builder.reindex.incremental import reindex

    src = tmp_path / "corpus"
    ids, x = write_vector_corpus(str(src))
    root = str(tmp_path / "index")
    kw = dict(source=str(src), index_root=root, vector_column="vector", factory="IVF16,Flat", shards=2,
              sharding=sharding, fields=["title"])
    build(ray_session, **kw)
    ch = mutate(src)
    reindex(ReindexConfig(source=str(src), index_root=root))
    m, rows = shard_rows(root)
    assert m.lineage.segments == "delta" and {f.gen for sh in m.shards for f in sh.fields} == {0, 1}
    r = Router(root, backend="local")
    try:
        got = titles(r, np.concatenate([ch["changed_x"][:10], ch["new_x"][:10]]))
        assert {i: t for i, t in got.items() if i in set(ch["changed"])} == \
            {i: f"changed {i}" for i in got if i in set(ch["changed"])}
        assert all(t == f"new {i}" for i, t in got.items() if i >= 10**6)
        assert not set(got) & set(ch["gone"].tolist())
    finally:
        r.close()
    compact_root(root, everything=True)
    m, rows = shard_rows(root)
    assert all(len({f.gen for f in sh.fields}) == 1 for sh in m.shards)
    for got, own in rows:
        assert np.array_equal(got, own)  # the live rows only, one each
    r = Router(root, backend="local")
    try:
        got = titles(r, ch["changed_x"][:10])
        assert all(t == f"changed {i}" for i, t in got.items() if i in set(ch["changed"]))
    finally:
        r.close()


def test_filters_read_the_shards_own_attributes(ray_session, tmp_path):
    """A filtered search with every docs part gone: the attributes come from each shard's fields."""
    from helpers import clustered

    x = clustered(2000, 16, seed=3)
    ids = np.arange(2000, dtype=np.int64) * 7 + 3
    src = str(tmp_path / "corpus")
    attrs = write_filterable_corpus(src, ids, x, seed=4)
    root = str(tmp_path / "index")
    build(ray_session, source=src, index_root=root, vector_column="vector", factory="IVF8,Flat", shards=2,
          fields=["title", "year", "cat", "price"])
    drop_docs(root)
    r = Router(root, backend="local", filter_fields=["year", "cat"])
    try:
        hits = r.search(x[:5], k=20, filter={"cat": "b", "year": {"gte": 2005}}, fields=["cat", "year"])
        want = {int(i) for i, c, y in zip(ids, attrs["cat"], attrs["year"]) if c == "b" and y >= 2005}
        assert all(hs for hs in hits)
        assert all(h.id in want and h.fields["cat"] == "b" and h.fields["year"] >= 2005 for hs in hits for h in hs)
    finally:
        r.close()


def test_a_shard_failing_its_fields_is_left_out_and_the_rest_merged_again(ray_session, tmp_path):
    """A shard that searched but fails to read its hits' fields counts as missing: the answer is the
    other shards' own merge (whole, with fields), and the Python API raises naming the shard."""
    from shards.errors import SearchError
    from shards.search.fanout import shard_fields

    src = tmp_path / "corpus"
    ids, x = write_vector_corpus(str(src))
    root = str(tmp_path / "index")
    build(ray_session, source=str(src), index_root=root, vector_column="vector", factory="Flat", shards=2,
          fields=["title"])
    r = Router(root, backend="local")
    good = r.client.fields

    def call(s, ids, names):
        if s == 1:
            raise OSError("disk gone")
        return good(s, ids, names)

    try:
        out = r.search_outcome(x[:5], 10)
        assert (out.owners() == 1).any()
        docs = r._loop.run(shard_fields(r.view, out, ["title"], call))
        assert list(out.failed) == [1] and "fields: " in out.failed[1] and "disk gone" in out.failed[1]
        assert np.array_equal(out.I, next(I for s, _, _, I in out.got if s == 0)) and (out.owners() == 0).all()
        assert {int(i) for i in out.I.ravel()} == set(docs)
        assert out.report()["missing"] == ["shard-1"] and out.report()["answered"] == 1
        r.client.fields = call
        with pytest.raises(SearchError, match="shard-1: fields: .*disk gone"):
            r.search(x[:5], k=10, fields=["title"])
    finally:
        r.close()

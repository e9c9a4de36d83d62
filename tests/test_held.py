"""A serving replica's shard across versions (shards/search/held.py): the next version is built from the
segments it holds, reading only what is new, and answers as a fresh load of that version does.

One corpus with filterable fields, built once; a reindex replaces vectors, deletes documents and
changes one field of documents whose vectors stay (so the attributes must come from the new
docs files, not from the entries that were added).
"""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from index_builder.config import ReindexConfig
from index_builder.reindex.incremental import reindex
from shards.search.filters import parse_filter, wire
from shards.search.held import HeldShard
from shards.search.searcher import ShardSearcher
from shards.storage.manifest import current_version, load_manifest
from shards.storage.store import Store

from helpers import assert_same_topk, build, clustered, vector_table

N, D, KINDS = 3000, 32, {"year": "int", "cat": "str"}
FILTERS = [None, {"cat": {"in": ["a", "b"]}}, {"cat": {"in": list("abcdefg")}}, {"year": {"gte": 2000}}]


def corpus(src, ids, x, year, cat, files=(0, 1, 2)):
    """Write the given files of the corpus: file f holds the rows of ids [3000f, 3000f + 3000)."""
    src.mkdir(exist_ok=True)
    for f in files:
        part = (ids >= 3000 * f) & (ids < 3000 * (f + 1))
        pq.write_table(vector_table(ids[part], x[part], year=year[part], cat=cat[part]), str(src / f"part-{f}.parquet"))


@pytest.fixture(scope="module")
def versions(ray_session, tmp_path_factory):
    """v1 built; v2 = v1 with 100 vectors replaced, 100 documents deleted and 100 cats changed, all in file 2;
    v3 = v2 with 50 more replaced in file 1."""
    src, root = tmp_path_factory.mktemp("held") / "corpus", tmp_path_factory.mktemp("held") / "index"
    rng = np.random.default_rng(3)
    ids, x = np.arange(N, dtype=np.int64) * 3 + 1, clustered(N, D, seed=4)
    year, cat = rng.integers(1990, 2020, N), rng.choice(list("abcdefgh"), N)
    corpus(src, ids, x, year, cat)
    v1 = build(ray_session, source=str(src), index_root=str(root), vector_column="vector", fields=["year", "cat"],
               factory="IVF32,PQ8", shards=2, part_rows=500).version
    x[2000:2100] = clustered(100, D, seed=5)
    cat[2100:2200] = "a"                               # a field changed, the vector not
    keep = np.r_[0:2200, 2300:N]
    ids, x, year, cat = ids[keep], x[keep], year[keep], cat[keep]
    corpus(src, ids, x, year, cat, files=[2])
    reindex(ReindexConfig(source=str(src), index_root=str(root), drift_error=100))
    v2 = current_version(Store(str(root)))
    x[1000:1050] = clustered(50, D, seed=6)
    corpus(src, ids, x, year, cat, files=[1])
    reindex(ReindexConfig(source=str(src), index_root=str(root), drift_error=100))
    v3 = current_version(Store(str(root)))
    return {"store": Store(str(root)), "vs": [v1, v2, v3]}


def fresh(store, version, s):
    m = load_manifest(store, version)
    sr = ShardSearcher(store, m, m.shards[s])
    sr.load_attributes(store, m, KINDS)
    return sr


def same_answers(a: ShardSearcher, b: ShardSearcher):
    xq = clustered(30, D, seed=9)
    for spec in FILTERS:
        flt = wire(parse_filter(spec, KINDS))
        for nprobe in (2, 32):
            D1, I1 = a.search(xq, 10, nprobe, flt)
            D2, I2 = b.search(xq, 10, nprobe, flt)
            assert_same_topk(D1, I1, D2, I2)


@pytest.mark.parametrize("s", [0, 1])
def test_the_next_version_reads_only_its_new_segments_and_answers_as_a_fresh_load(versions, s):
    store, (v1, v2, v3) = versions["store"], versions["vs"]
    m2 = load_manifest(store, v2)
    assert m2.shards[s].segmented and m2.lineage.segments == "delta"
    h = HeldShard(store, s, KINDS, None)
    a = h.get(v1)
    b = h.get(v2)
    assert b.seg.base is a.index                      # the base, loaded for v1, is v2's too: not read again
    assert h.loads[v2]["segments_reused"] == 1 and h.loads[v2]["from"] == v1
    m1 = load_manifest(store, v1)
    assert m1.docs.per_shard and h.loads[v1]["docs_files_read"] == len(m1.shards[s].fields)  # its own, not all
    own = [{m.path(f.file) for f in m.shards[s].fields} for m in (m1, m2)]
    new = len(own[1] - own[0])
    assert 0 < new < len(own[1]) and h.loads[v2]["docs_files_read"] == new
    same_answers(b, fresh(store, v2, s))
    np.testing.assert_array_equal(np.sort(b.ids()), np.sort(fresh(store, v2, s).ids()))

    c = h.get(v3)                                     # v3 shares v2's delta and base: both kept, v1 let go
    assert list(h.versions) == [v2, v3] and h.get(v2) is b
    assert c.seg.base is a.index and h.loads[v3]["segments_reused"] == 1 + len(m2.shards[s].deltas)
    same_answers(c, fresh(store, v3, s))


def test_segments_no_held_version_uses_are_let_go(versions):
    store, (v1, v2, v3) = versions["store"], versions["vs"]
    h = HeldShard(store, 0, {}, None, keep=1)
    h.get(v2)
    n = len(h.deltas)
    h.get(v3)
    assert list(h.versions) == [v3] and len(h.bases) == 1 and len(h.deltas) >= n
    h.get(v1)                                         # back to the build: no deltas held any more
    assert list(h.versions) == [v1] and not h.deltas and len(h.bases) == 1

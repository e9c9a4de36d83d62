"""Ranked IVF routing (shard_selection.gap_mask, tuned by index_builder/build/tune.py): at the default
nprobe a query goes only to the shards whose nearest probed list is within the tuned gap of its nearest,
the merge is exactly one index searched in the lists those shards hold, and recall stays at the target."""
from __future__ import annotations

import numpy as np
import pytest

from index_builder.eval.measures import exact_knn, recall_at_k
from shards.search.router import Router
from shards.search.shard_selection import gap_mask, scanned, shard_mask
from shards.storage.faissio import coarse_search, read_index, search_preassigned
from shards.storage.manifest import current_version, load_manifest
from shards.storage.store import Store

from helpers import build, write_vector_corpus

RANGES = [[0, 2], [2, 4], [4, 6]]

# (coarse distances, lists, gap, ip) -> shards asked: the nearest list's shard always; another when its
# nearest probed list is within gap; -1 (no list) is no shard
GAPS = [
    ([[0.9, 0.85, 0.5, 0.1]], [[0, 3, 4, 1]], 0.1, True, [[True, True, False]]),
    ([[0.9, 0.85, 0.5, 0.1]], [[0, 3, 4, 1]], 0.0, True, [[True, False, False]]),
    ([[0.9, 0.85, 0.5, 0.1]], [[0, 3, 4, 1]], 1.0, True, [[True, True, True]]),
    ([[1.0, 1.05, 3.0]], [[5, 0, 2]], 0.1, False, [[True, False, True]]),
    ([[1.0, 2.0, 0.0]], [[5, 1, -1]], 10.0, False, [[True, False, True]]),
]


@pytest.mark.parametrize("D,L,gap,ip,want", GAPS)
def test_gap_mask_table(D, L, gap, ip, want):
    m = gap_mask(np.array(D), np.array(L), RANGES, gap, ip)
    assert m.tolist() == want
    assert not (m & ~shard_mask(np.array(L), RANGES)).any()   # never a shard the probe does not reach


def test_scanned_drops_the_lists_of_shards_not_asked():
    L = np.array([[0, 3, 4, 1, -1]])
    assert scanned(L, np.array([[True, False, True]]), RANGES).tolist() == [[0, -1, 4, 1, -1]]


@pytest.fixture(scope="module")
def ranked(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranked")
    ids, x = write_vector_corpus(str(tmp / "corpus"), n=8000, d=32, files=2, seed=9)
    root = str(tmp / "index")
    build(ray_session, source=str(tmp / "corpus"), index_root=root, vector_column="vector", factory="IVF64,Flat",
          shards=4, sharding="ivf", metric="l2", target_recall=0.9)
    return root, ids, x


def test_the_build_tunes_a_gap_that_asks_fewer_shards(ranked):
    root, _, _ = ranked
    m = load_manifest(Store(root), current_version(Store(root)))
    s = m.search
    assert s.route_gap is not None and s.recall_at_10 >= 0.9
    assert s.touched < s.exact_touched <= 4


def test_ranked_search_is_one_index_over_the_lists_of_the_shards_asked(ranked):
    root, ids, x = ranked
    store = Store(root)
    m = load_manifest(store, current_version(store))
    xq = x[:300] + 0.01
    r = Router(root, backend="local")
    try:
        out = r.search_outcome(xq, k=10)
        tr = read_index(store, m.path(m.trained.file))
        Dq, Iq = coarse_search(tr, xq, m.search.nprobe)
        mask = gap_mask(Dq, Iq, m.sharding.ranges, m.search.route_gap, False)
        np.testing.assert_array_equal(out.touched, mask.sum(1))
        assert out.touched.mean() < shard_mask(Iq, m.sharding.ranges).sum(1).mean()
        mono = read_index(store, m.path(m.trained.file))
        mono.add_with_ids(x, ids)
        D, I = search_preassigned(mono, xq, 10, (Dq, scanned(Iq, mask, m.sharding.ranges)))
        np.testing.assert_allclose(out.D, D, rtol=1e-5, atol=1e-4)
        assert (out.I == I).mean() > 0.999                         # ties at equal distances may swap
        gt = ids[exact_knn(xq, x, 10, "l2")[1]]
        assert recall_at_k(out.I, gt, 10) >= 0.85                 # the tune's target, on other queries
        p = m.search.nprobe
        other = p * 2 if p * 2 <= m.index.nlist else p // 2       # any other nprobe: every shard probed
        got = r.search_outcome(xq, k=10, nprobe=other)
        np.testing.assert_array_equal(got.touched, shard_mask(coarse_search(tr, xq, other)[1],
                                                              m.sharding.ranges).sum(1))
    finally:
        r.close()

"""index_builder/eval/measures.py: exact k-NN (the ground truth of tune and eval), recall@k, the nprobe
ladder tune climbs, the plateau it stops on, and the default nprobe it publishes."""
from __future__ import annotations

import numpy as np
import pytest

from index_builder.eval import measures
from index_builder.eval.measures import choose_nprobe, nprobe_ladder, plateaued, recall_at_k


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("n,nq,k,block_bytes", [
    (5_000, 200, 11, 64 << 20),   # one block, as a part's tune ground truth
    (5_000, 37, 10, 4 * 37 * 999),  # blocks of 999 rows, the last one short
    (25, 7, 10, 4 * 7 * 10),      # blocks of exactly k rows
    (6, 5, 10, 64 << 20),         # fewer rows than k: -1 padding
    (1, 3, 1, 64 << 20),
])
def test_exact_knn_is_faiss_flat_search(n, nq, k, block_bytes, metric, monkeypatch):
    """The ground truth of tune and eval: the same neighbours, in the same order, as faiss's IndexFlat."""
    faiss = pytest.importorskip("faiss")
    monkeypatch.setattr(measures, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(n + k)
    d = 48
    xb, xq = rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((nq, d)).astype(np.float32)
    flat = faiss.IndexFlat(d, faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
    flat.add(xb)
    wantD, wantI = flat.search(xq, k)
    D, I = measures.exact_knn(xq, xb, k, metric)
    assert np.array_equal(I, wantI)
    assert np.allclose(D[I >= 0], wantD[wantI >= 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_knn_keeps_k_among_ties(metric):
    """Rows repeated many times tie at the threshold exact_knn cuts at: still k distinct rows, each
    at the true k-th distance or nearer."""
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    xb = np.repeat(rng.standard_normal((200, 16)).astype(np.float32), 100, axis=0)  # 20,000 rows, 200 distinct
    xq = rng.standard_normal((9, 16)).astype(np.float32)
    flat = faiss.IndexFlat(16, faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
    flat.add(xb)
    wantD, _ = flat.search(xq, 20)
    D, I = measures.exact_knn(xq, xb, 20, metric)  # 20,000 >= 4 x STRIDE x k: the threshold's path
    assert all(len(set(row)) == 20 for row in I.tolist())
    assert np.allclose(D, wantD, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("I,gt,k,want", [
    ([[1, 2, 3]], [[1, 2, 3]], 3, 1.0),
    ([[3, 2, 1]], [[1, 2, 3]], 3, 1.0),             # order within the top-k does not matter
    ([[4, 5, 6]], [[1, 2, 3]], 3, 0.0),
    ([[1, 9, 3, 8]], [[1, 2, 3, 4]], 4, 0.5),
    ([[1, 2, -1, -1]], [[1, 2, 3, 4]], 4, 0.5),     # -1 padding never counts
    ([[-1, -1]], [[1, 2]], 2, 0.0),
    ([[1, 2, 3, 4]], [[1, 2, 5, 6]], 2, 1.0),       # only the first k columns
    ([[5, 1, 2, 3]], [[1, 2, 3, 4]], 1, 0.0),
    ([[1, 2], [3, 4]], [[1, 2], [9, 8]], 2, 0.5),   # mean over queries
    ([[1, 2], [3, 9]], [[1, 2], [3, 4]], 2, 0.75),
])
def test_recall_at_k(I, gt, k, want):
    assert recall_at_k(np.array(I), np.array(gt), k) == pytest.approx(want)


@pytest.mark.parametrize("nl,ladder", [(1, [1]), (2, [1, 2]), (8, [1, 2, 4, 8]), (100, [1, 2, 4, 8, 16, 32, 64, 100])])
def test_nprobe_ladder(nl, ladder):
    assert nprobe_ladder(nl) == ladder


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
                                          ([0.9, 0.9, 0.95], False),
                                          ([0.8475, 0.8495, 0.8505], True),  # 1M x 128, IVF4096,PQ32
                                          ([0.8475, 0.8496, 0.8505], False)])
def test_the_ladder_stops_on_a_plateau(recalls, want):
    assert plateaued(_rows(recalls)) == want


@pytest.fixture(scope="module")
def flat():
    faiss = pytest.importorskip("faiss")
    x = np.random.default_rng(3).standard_normal((500, 16)).astype(np.float32)
    index = faiss.IndexFlatL2(16)
    index.add(x)
    return index, x[:20]


@pytest.mark.parametrize("ticks,min_secs,min_runs,want_runs", [
    ([0, 0.05, 0.1, 0.15, 0.2, 0.25], 0.2, 1, 4),   # until the clock has moved min_secs
    ([0, 0.3, 0.6], 0.2, 1, 1),                     # one run longer than min_secs: one run
    ([0, 0.3, 0.6, 0.9], 0.2, 3, 3),                # and at least min_runs
    ([0, 0.01, 0.02], 0.0, 1, 1),                   # min_secs 0: once
])
def test_timed_repeats_until_its_minimum(flat, ticks, min_secs, min_runs, want_runs):
    """QPS as faiss's benchmarks time it: a real search, repeated until min_secs have passed on the
    clock given (here a fake one, so the count does not depend on the machine)."""
    index, xq = flat
    calls = []

    def run():
        calls.append(1)
        return index.search(xq, 5)

    (D, I), runs, secs = measures.timed(run, min_secs, min_runs, clock=iter(ticks).__next__)
    assert runs == len(calls) == want_runs and secs == pytest.approx(ticks[runs])
    assert I.shape == (20, 5) and (I[:, 0] == np.arange(20)).all()   # the last run's answer


def test_sweep_rows_say_how_many_runs_their_qps_is_of(flat):
    index, xq = flat
    gt = measures.exact_knn(xq, index.reconstruct_n(0, index.ntotal), 5, "l2")[1]
    rows = measures.sweep(lambda q, k, p: index.search(q, k), xq, gt, 5, [None], reps=3, min_secs=0)
    assert [(r["nprobe"], r["recall"], r["runs"]) for r in rows] == [(None, 1.0, 3)] and rows[0]["qps"] > 0


@pytest.mark.parametrize("factory,ivf,want", [("Flat", False, "exact"), ("IVF8,Flat", True, "ivf"),
                                              ("IVF8,PQ4", True, "ivf"), ("HNSW8", False, "fixed"),
                                              ("SQ8", False, "fixed"), ("PCA8,Flat", False, "fixed")])
def test_search_kind(factory, ivf, want):
    """Only a flat scan is exact; an index without lists is one setting; IVF has an nprobe. List-less
    indexes come wrapped in an IDMap2, as train.quantizer.make_index builds them."""
    faiss = pytest.importorskip("faiss")
    from index_builder.train.quantizer import make_index

    index = make_index(factory, 16, "l2")
    assert isinstance(index, faiss.IndexIDMap2) != ivf
    assert measures.search_kind(index) == want

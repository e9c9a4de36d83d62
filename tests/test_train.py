"""Training: torch k-means (on the CPU here, on CUDA where there is one)
against faiss's, and centroids placed into the faiss quantizer for every pre-transform and metric."""
from __future__ import annotations

import numpy as np
import pytest

from index_builder.eval.measures import recall_at_k
from index_builder.train.kmeans import kmeans
from index_builder.train.quantizer import best_device, make_index, train_index
from shards.storage.faissio import faiss, ivf, set_nprobe

from helpers import clustered


def _objective(x, C, metric):
    index = faiss().IndexFlatIP(x.shape[1]) if metric == "ip" else faiss().IndexFlatL2(x.shape[1])
    index.add(C)
    return float(index.search(x, 1)[0].sum())


def _data(metric, n=20_000, d=32, seed=2):
    x = clustered(n, d, seed=seed)
    if metric == "ip":
        faiss().normalize_L2(x)
    return x


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_torch_kmeans_on_cpu_is_as_good_as_faiss(metric):
    x = _data(metric)
    got = kmeans(x, 128, niter=10, metric=metric, device="cpu")
    km = faiss().Kmeans(x.shape[1], 128, niter=10, spherical=metric == "ip", seed=1234)
    km.train(x)
    a, b = _objective(x, got.centroids, metric), _objective(x, km.centroids, metric)
    assert got.centroids.shape == (128, 32) and np.isfinite(got.centroids).all()
    # within 2% of faiss's objective (L2: lower is better; IP: higher is better)
    assert (a <= b * 1.02) if metric == "l2" else (a >= b * 0.98)
    if metric == "ip":
        np.testing.assert_allclose(np.linalg.norm(got.centroids, axis=1), 1, rtol=1e-5)


def test_torch_kmeans_subsamples_and_blocks():
    x = _data("l2", n=9000)
    got = kmeans(x, 16, niter=3, max_points_per_centroid=100, device="cpu")
    assert got.points == 1600 and got.block >= 256


def test_torch_kmeans_refills_empty_clusters():
    """60 centroids over 50 distinct points: some clusters empty out; they are refilled, never NaN."""
    base = clustered(50, 16, seed=5)
    x = np.repeat(base, 10, axis=0)
    got = kmeans(x, 60, niter=5, device="cpu")
    assert np.isfinite(got.centroids).all()
    assert _objective(x, got.centroids, "l2") < 0.05 * _objective(x, base.mean(0, keepdims=True), "l2")


def test_torch_kmeans_needs_k_points():
    with pytest.raises(ValueError, match="10 training points for 20 centroids"):
        kmeans(np.zeros((10, 4), np.float32), 20)


# (factory, metric): pre-transforms and both metrics, trained with torch's k-means placed into faiss
# (OPQ trains 8-bit PQs for many rounds whatever the factory's PQ: a smaller sample keeps it quick)
TRAIN_ROWS = [
    ("IVF64,Flat", "l2", 12_000),
    ("IVF64,Flat", "ip", 12_000),
    ("IVF32,PQ8x4", "ip", 12_000),
    ("OPQ8_32,IVF32,PQ8x4", "l2", 3_000),
    ("PCA16,IVF32,Flat", "l2", 12_000),
]


@pytest.mark.parametrize("factory,metric,n", TRAIN_ROWS)
def test_centroids_from_torch_serve_as_the_faiss_quantizer(factory, metric, n):
    """The torch-trained index searches as well as the faiss-trained one (recall@10 at nprobe 4)."""
    x = _data(metric, n=n)
    xq, xb = x[:200], x[200:]
    gt = (faiss().IndexFlatIP(32) if metric == "ip" else faiss().IndexFlatL2(32))
    gt.add(xb)
    _, I0 = gt.search(xq, 10)
    recalls = {}
    for device in ("cpu", "cpu-torch"):
        index = make_index(factory, 32, metric)
        assert train_index(index, xb, device) == device
        assert index.is_trained and ivf(index).quantizer.ntotal == ivf(index).nlist
        index.add(xb)
        set_nprobe(index, 4)
        recalls[device] = recall_at_k(index.search(xq, 10)[1], I0, 10)
    assert recalls["cpu-torch"] >= recalls["cpu"] - 0.05, recalls


@pytest.mark.parametrize("factory", ["IVF16,PQ4", "OPQ4_32,IVF16,PQ4", "PQ4"])
def test_polysemous_training_is_skipped_and_changes_no_result(factory):
    """make_index turns off the polysemous step index_factory turns on; the same seed then gives
    the same distances and ids as faiss's own default index, step included."""
    f = faiss()
    x = _data("l2", n=2_560)
    got = []
    for index in (make_index(factory, 32, "l2"), f.index_factory(32, factory)):
        pq = [f.downcast_index(i) for i in (index, getattr(index, "index", index))]
        got.append(any(getattr(i, "do_polysemous_training", False) for i in pq))
        index.train(x)
        index.add_with_ids(x, np.arange(len(x))) if isinstance(index, f.IndexIDMap2) else index.add(x)
        set_nprobe(index, 4) if ivf(index) else None
        got.append(index.search(x[:100], 10))
    assert got[0] is False and got[2] is True
    np.testing.assert_array_equal(got[1][1], got[3][1])
    np.testing.assert_array_equal(got[1][0], got[3][0])


def test_best_device_here():
    """faiss-cpu is installed: a GPU, if any, is used through torch."""
    torch = pytest.importorskip("torch")
    assert best_device() == ("cuda-torch" if torch.cuda.is_available() else "cpu")


def test_a_row_group_sample_trains_as_well_as_a_row_sample(tmp_path):
    """Whole row groups (what the build reads) against rows drawn one by one: about the same
    recall@10 (mean over 3 seeds; one seed's k-means varies by about 0.02)."""
    from index_builder.encode.parts import vectors_table
    from index_builder.train.quantizer import sample
    from shards.storage.store import Store

    store, x = Store(str(tmp_path)), _data("l2", n=40_000, seed=5)
    parts = []
    for p in range(20):
        rel = f"emb/part-{p:05d}.parquet"
        store.write_table(rel, vectors_table(np.arange(2000) + 2000 * p, x[2000 * p:2000 * (p + 1)]),
                          row_group_size=128)
        parts.append((rel, 2000))
    xq = x[np.random.default_rng(9).choice(len(x), 200, replace=False)]
    gt = faiss().IndexFlatL2(32)
    gt.add(x)
    _, I0 = gt.search(xq, 10)

    def recall(xt):
        index = make_index("IVF64,Flat", 32, "l2")
        train_index(index, xt, "cpu")
        index.add(x)
        set_nprobe(index, 4)
        return recall_at_k(index.search(xq, 10)[1], I0, 10)

    groups = [sample(store, parts, 4000, seed=s).xt for s in range(3)]
    assert all(len(xt) == 4000 for xt in groups)
    a = np.mean([recall(xt) for xt in groups])
    b = np.mean([recall(x[np.random.default_rng(s).choice(len(x), 4000, replace=False)]) for s in range(3)])
    assert a >= b - 0.03, (a, b)

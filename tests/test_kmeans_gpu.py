"""The torch k-means on CUDA: as good as faiss's k-means on the same sample, and an out-of-memory
error halves the distance block instead of failing. Skipped without CUDA.

Imports neither Ray nor pyarrow-heavy build modules: the lent GPU machines have no Ray
(bench/gpu/checks.sh runs this file there)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

import faiss as _faiss  # noqa: E402

from index_builder.train.kmeans import _block_size, kmeans  # noqa: E402

from helpers import clustered  # noqa: E402


def _objective(x, C, metric):
    index = _faiss.IndexFlatIP(x.shape[1]) if metric == "ip" else _faiss.IndexFlatL2(x.shape[1])
    index.add(C)
    return float(index.search(x, 1)[0].sum())


def _data(metric, n, d):
    x = clustered(n, d, seed=2)
    if metric == "ip":
        _faiss.normalize_L2(x)
    return x


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_torch_kmeans_on_cuda(metric):
    x = _data(metric, 100_000, 64)
    got = kmeans(x, 1024, niter=10, metric=metric, device="cuda")
    km = _faiss.Kmeans(64, 1024, niter=10, spherical=metric == "ip", seed=1234)
    km.train(x)
    a, b = _objective(x, got.centroids, metric), _objective(x, km.centroids, metric)
    assert (a <= b * 1.01) if metric == "l2" else (a >= b * 0.99)
    assert got.device.startswith("cuda") and got.centroids.shape == (1024, 64)


def test_out_of_memory_halves_the_block():
    x = _data("l2", 200_000, 64)
    k = 4096
    first = _block_size(torch, torch.device("cuda"), k, 64, True)
    total = torch.cuda.mem_get_info()[1]
    torch.cuda.set_per_process_memory_fraction(min(1.0, (x.nbytes * 2 + first * k * 2) / total))
    try:
        got = kmeans(x, k, niter=2, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert got.block < first and np.isfinite(got.objective)

"""shards/storage/faissio.py: the probed lists of a query are the lists the index itself searches."""
from __future__ import annotations

import numpy as np
import pytest

from shards.storage.faissio import coarse_search, faiss, ivf, probed_lists, search_preassigned, set_nprobe

from helpers import clustered


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

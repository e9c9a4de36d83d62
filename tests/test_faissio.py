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


AVX512 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}


@pytest.mark.parametrize("flags,want", [
    (AVX512 | {"avx512_vnni"}, "SkylakeX"),   # an Ice Lake Xeon, which OpenBLAS 0.3.15 runs as Prescott
    ({"avx2", "fma", "avx"}, "Haswell"),
    (AVX512 - {"avx512bw"}, "Haswell"),       # Knights Landing's AVX-512 subset: not SkylakeX's kernels
    ({"sse4_2", "avx"}, None),                # let OpenBLAS detect
    (set(), None),                            # not x86, or no /proc/cpuinfo
])
def test_blas_core_from_cpu_flags(flags, want):
    from shards.storage.faissio import blas_core

    assert blas_core(flags) == want


@pytest.mark.parametrize("preset", [None, "Sandybridge"])
def test_faiss_loads_with_the_cpus_kernels_unless_told(preset):
    """In a fresh process faiss() sets OPENBLAS_CORETYPE before faiss loads, and never overrides a set one."""
    import os
    import subprocess
    import sys

    from shards.storage.faissio import blas_core, cpu_flags

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    if preset:
        env["OPENBLAS_CORETYPE"] = preset
    code = "import os; from shards.storage.faissio import faiss; faiss(); print(os.environ.get('OPENBLAS_CORETYPE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(preset or blas_core(cpu_flags()))

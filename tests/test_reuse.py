"""index_builder/encode/reuse.py: the vector hashes a reindex compares to keep a stored vector."""
from __future__ import annotations

import numpy as np
import pytest

from index_builder.encode.reuse import vector_hashes


@pytest.mark.parametrize("d", [1, 3, 128, 384])
def test_vector_hashes_tell_every_one_value_change_apart(d):
    """A reindex keeps a stored vector only when the hash of the new one matches: a row that changed in any
    single value by one ulp, or whose values swapped places, must hash differently; an unchanged row the same,
    whatever the batch it is hashed in."""
    x = np.random.default_rng(d).standard_normal((3_000, d)).astype(np.float32)
    h = vector_hashes(x)
    assert h.dtype == np.int64 and len(np.unique(h)) == len(x)
    assert np.array_equal(h, vector_hashes(x, chunk=7))
    assert np.array_equal(h[1000:1010], vector_hashes(x[1000:1010]))
    for j in range(0, d, max(1, d // 16)):
        y = x.copy()
        y[:, j] = np.nextafter(y[:, j], np.float32(np.inf))
        assert (vector_hashes(y) != h).all(), j
    if d > 1:
        assert (vector_hashes(x[:, ::-1]) != h).all()

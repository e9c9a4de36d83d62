"""shards/search/shard_selection.py: which shards own a query's probed lists (--sharding ivf routing)."""
from __future__ import annotations

import numpy as np
import pytest

from index_builder.shard_math import ivf_ranges, range_shard
from shards.search.shard_selection import list_owner, shards_for_lists

# (probed lists per query, ranges, shards to ask per query)
ROUTE_ROWS = [
    ([[0, 1]], [[0, 2], [2, 4]], [{0}]),
    ([[0, 3]], [[0, 2], [2, 4]], [{0, 1}]),
    ([[3, 2], [1, -1]], [[0, 2], [2, 4]], [{1}, {0}]),        # -1: the quantizer found no more lists
    ([[5, 0, 9]], [[0, 1], [1, 6], [6, 10]], [{0, 1, 2}]),
    ([[-1, -1]], [[0, 4]], [set()]),
    ([[7]], [[0, 3], [3, 7], [7, 8]], [{2}]),
]


@pytest.mark.parametrize("lists,ranges,want", ROUTE_ROWS)
def test_shards_for_lists(lists, ranges, want):
    assert shards_for_lists(np.array(lists), ranges) == want


def test_list_owner_matches_the_ranges():
    ranges = ivf_ranges(np.arange(50) % 7, 6)
    owner = list_owner(np.arange(50), ranges)
    for s, (a, b) in enumerate(ranges):
        assert (owner[a:b] == s).all()
    np.testing.assert_array_equal(range_shard(np.arange(50), ranges), owner)
    with pytest.raises(ValueError, match="list numbers"):
        list_owner(np.array([50]), ranges)

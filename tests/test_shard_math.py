"""index_builder/shard_math.py: the hash of an id to its shard, the IVF list ranges of --sharding ivf,
and the order-free digests of id sets that add and merge check."""
from __future__ import annotations

import numpy as np
import pytest

from index_builder.plan.corpus import string_ids
from index_builder.shard_math import add_rows, add_units, hash_shard, ids_digest, ivf_ranges, mix64, sum_digests
from shards.errors import ConfigError


def _splitmix64(x: int) -> int:
    """Reference splitmix64 finaliser in Python ints."""
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


@pytest.mark.parametrize("ids", [[0, 1, 2, 3], [12345, 2**62, 2**63 - 1], [7] * 3, list(range(1000, 1010))])
def test_mix64_matches_splitmix64(ids):
    with np.errstate(over="ignore"):
        got = mix64(np.asarray(ids, dtype=np.int64))
    assert [int(v) for v in got] == [_splitmix64(i) for i in ids]


@pytest.mark.parametrize("n,shards", [(100_000, 1), (100_000, 2), (100_000, 3), (100_000, 4), (100_000, 7),
                                      (100_000, 8), (100_000, 16), (1_000_000, 64)])
def test_hash_shard_spreads_sequential_ids(n, shards):
    ids = np.arange(n, dtype=np.int64)
    s = hash_shard(ids, shards)
    assert s.dtype == np.int64 and s.shape == ids.shape
    assert s.min() >= 0 and s.max() < shards
    counts = np.bincount(s, minlength=shards)
    assert counts.sum() == n
    assert np.all(np.abs(counts - n / shards) <= 0.05 * n / shards), counts


@pytest.mark.parametrize("ids,shards", [
    (np.arange(100_000, dtype=np.int64) * 3 + 1, 4),               # the test corpora's ids
    (np.arange(100_000, dtype=np.int64) * 1024, 8),                # strided by a power of two
    (np.arange(2**40, 2**40 + 100_000, dtype=np.int64), 5),        # large ids
    (string_ids([f"doc-{i}" for i in range(50_000)]), 3),          # hashed string ids
])
def test_hash_shard_spreads_other_ids(ids, shards):
    counts = np.bincount(hash_shard(ids, shards), minlength=shards)
    assert np.all(np.abs(counts - len(ids) / shards) <= 0.05 * len(ids) / shards), counts


@pytest.mark.parametrize("shards", [1, 2, 5, 16])
def test_hash_shard_is_deterministic_and_elementwise(shards):
    """add and merge hash ids in different batches: an id's shard depends on the id alone."""
    ids = np.random.default_rng(0).integers(0, 2**62, size=5_000, dtype=np.int64)
    whole = hash_shard(ids, shards)
    assert np.array_equal(whole, hash_shard(ids.copy(), shards))
    assert np.array_equal(whole, np.concatenate([hash_shard(ids[:1234], shards), hash_shard(ids[1234:], shards)]))
    assert np.array_equal(whole[::-1], hash_shard(ids[::-1], shards))
    assert [int(hash_shard([int(i)], shards)[0]) for i in ids[:50]] == whole[:50].tolist()  # lists too
    assert np.array_equal(whole, [_splitmix64(int(i)) % shards for i in ids])


def test_hash_shard_one_shard():
    assert not hash_shard(np.arange(10_000), 1).any()


# ---------------------------------------------------------------- ivf_ranges

# (list sizes, shards, the ranges)
RANGE_ROWS = [
    ([10, 10, 10, 10], 1, [[0, 4]]),
    ([10, 10, 10, 10], 2, [[0, 2], [2, 4]]),
    ([10, 10, 10, 10], 4, [[0, 1], [1, 2], [2, 3], [3, 4]]),
    ([30, 10, 10, 10], 2, [[0, 1], [1, 4]]),                 # by vectors: one big list is half
    ([1, 1, 1, 1, 1, 1, 1, 1, 24], 2, [[0, 8], [8, 9]]),     # eight lists weigh what one does
    ([0, 0, 0, 0, 0, 0], 3, [[0, 2], [2, 4], [4, 6]]),       # no vectors: split the lists evenly
    ([0, 0, 5, 5, 0, 0], 2, [[0, 3], [3, 6]]),
    ([100, 0, 0, 0], 4, [[0, 1], [1, 2], [2, 3], [3, 4]]),   # every shard keeps at least one list
    ([0, 0, 0, 100], 2, [[0, 3], [3, 4]]),
    ([5, 1, 1, 1, 1, 1, 0, 10], 3, [[0, 3], [3, 7], [7, 8]]),
    ([7], 1, [[0, 1]]),
]


@pytest.mark.parametrize("sizes,shards,want", RANGE_ROWS)
def test_ivf_ranges(sizes, shards, want):
    assert ivf_ranges(sizes, shards) == want


@pytest.mark.parametrize("seed,nlist,shards", [(0, 64, 2), (1, 64, 3), (2, 1024, 7), (3, 4096, 16), (4, 100, 100),
                                               (5, 37, 5), (6, 4096, 1)])
def test_ivf_ranges_cover_and_balance(seed, nlist, shards):
    """Contiguous, covering 0..nlist, and each shard within one list's size of its even share."""
    rng = np.random.default_rng(seed)
    sizes = rng.zipf(1.6, nlist).clip(0, 5000)             # skewed, as real IVF lists are
    r = ivf_ranges(sizes, shards)
    assert r[0][0] == 0 and r[-1][1] == nlist and len(r) == shards
    assert all(a < b for a, b in r) and all(r[i][1] == r[i + 1][0] for i in range(shards - 1))
    loads = np.array([sizes[a:b].sum() for a, b in r])
    assert loads.sum() == sizes.sum()
    # every cut sits at the boundary nearest its ideal point, so a shard is off by at most one list
    assert np.abs(loads - sizes.sum() / shards).max() <= sizes.max() + 1e-9


@pytest.mark.parametrize("sizes,shards", [([1, 2, 3], 4), ([], 1)])
def test_ivf_ranges_more_shards_than_lists(sizes, shards):
    with pytest.raises(ConfigError, match="shards"):
        ivf_ranges(sizes, shards)


# ---------------------------------------------------------------- id digests

@pytest.mark.parametrize("ids", [[], [0], [1, 2, 3], [2**63 - 1, 0, -1], list(range(1000))])
def test_ids_digest_is_order_free_and_adds_up(ids):
    ids = np.array(ids, dtype=np.int64)
    d = ids_digest(ids)
    assert d[0] == len(ids) and ids_digest(ids[::-1]) == d
    k = len(ids) // 2
    assert sum_digests([ids_digest(ids[:k]), ids_digest(ids[k:])]) == d


@pytest.mark.parametrize("change", ["drop", "duplicate", "alter", "swap_for_duplicate"])
def test_ids_digest_sees_changes(change):
    ids = np.arange(10_000, dtype=np.int64) * 3 + 1
    bad = {"drop": ids[1:], "duplicate": np.append(ids, ids[5]), "alter": np.where(ids == 4, 5, ids),
           "swap_for_duplicate": np.append(ids[1:], ids[2])}[change]
    assert ids_digest(bad) != ids_digest(ids)


@pytest.mark.parametrize("parts, rows, want", [
    ([("a", 5), ("b", 3), ("c", 12)], 4,
     [[("a", 0, 4)], [("a", 4, 5), ("b", 0, 3)], [("c", 0, 4)], [("c", 4, 8)], [("c", 8, 12)]]),
    ([("a", 5)], 10, [[("a", 0, 5)]]),                                 # one small part: one unit
    ([("a", 1)] * 3, 2, [[("a", 0, 1), ("a", 0, 1)], [("a", 0, 1)]]),  # tiny parts grouped
    ([("a", 0), ("b", 2)], 2, [[("b", 0, 2)]]),                       # empty parts give nothing
    ([], 3, []),
])
def test_add_units_group_small_parts_and_split_big_ones(parts, rows, want):
    got = add_units(parts, rows)
    assert got == want
    assert sum(b - a for u in got for _, a, b in u) == sum(n for _, n in parts)
    assert all(sum(b - a for _, a, b in u) <= rows for u in got)


@pytest.mark.parametrize("d, n, cpus, asked, want", [
    (768, 10**9, 256, None, (3 << 30) // (4 * 768)),   # big builds: bounded by bytes (about 1M at d=768)
    (96, 10**6, 2, None, 500_000),                     # small ones: every CPU gets a unit
    (96, 10**6, 2, 1234, 1234),                        # --add-rows wins
    (8, 3, 16, None, 1),
])
def test_add_rows(d, n, cpus, asked, want):
    assert add_rows(d, n, cpus, asked) == want

"""Pure functions, tested with tables (no Ray): factory choice, shard math, config, corpus
splitting and ids, encode-pool sizing, top-k merge, storage and the manifest.

Every table row is one `pytest.mark.parametrize` case; data is tiny and seeded.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index_builder.plan import factory as params
from index_builder.config import BuildConfig, make, parse_bytes
from index_builder.plan.corpus import ID_MASK, InputShard, _check_schema, int_ids, plan_corpus, split_rows, string_ids
from index_builder.encode.pool import shape
from index_builder.plan.factory import (FLAT_MAX, ID_BYTES, LIST_OVERHEAD, MIN_TRAIN_PER_LIST, Choice, choose_factory,
                                  nlist_factor, nlist_for, pq_m, train_size)
from index_builder.encode.reuse import vector_hashes
from index_builder.shard_math import hash_shard, mix64
from index_builder.build.tune import nprobe_ladder
from shards.storage import manifest as mf
from shards.storage import store as store_mod
from shards.search import topk as topk_mod
from shards.errors import ConfigError, CorpusError, IntegrityError, ShardexError, StorageError
from shards.storage.manifest import (DocsInfo, EncoderInfo, FileInfo, IndexInfo, Manifest, ShardingInfo, SourceInfo,
                             current_version, list_versions, load_manifest, new_version_name, set_current, vdir,
                             verify, write_manifest)
from shards.storage.store import Store
from shards.search.topk import merge_topk, recall_at_k

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
FLT_MAX = float(np.finfo(np.float32).max)


# ================================================================ index_builder/plan/factory.py

# (N, d, memory budget, the factory --factory auto must choose)
FACTORY_ROWS = [
    # Flat: tiny corpora (< FLAT_MAX) whose raw vectors fit
    (1, 8, "1M", "Flat"),
    (5_000, 32, "1G", "Flat"),
    (9_999, 768, "1G", "Flat"),
    # IVF{k},Flat: from FLAT_MAX on, while raw vectors still fit
    (10_000, 32, "1G", "IVF256,Flat"),
    (100_000, 32, "1G", "IVF1024,Flat"),
    (1_000_000, 128, "1G", "IVF4096,Flat"),
    (100_000, 768, "1G", "IVF1024,Flat"),          # d >= 256 but it fits: no OPQ needed
    # IVF{k},PQ{M}: the budget shrinks (same N, d) ...
    (1_000_000, 128, "100M", "IVF4096,PQ64"),
    (1_000_000, 128, "40M", "IVF4096,PQ16"),        # 31.9 code bytes: PQ24 fits, but 24 does not divide 128
    (1_000_000, 128, "20M", "IVF4096,PQ8"),
    (1_000_000, 128, "13M", "IVF4096,PQ4"),
    # ... or N grows (same budget)
    (10_000_000, 128, "1G", "IVF32768,PQ64"),           # nlist ~ 8*sqrt(N) above 1M
    (100_000_000, 128, "4G", "IVF65536,PQ32"),
    (1_000_000_000, 128, "64G", "IVF131072,PQ32"),   # 57 code bytes; 48 does not divide 128; 16*sqrt(N)
                                                    # lists would need more than 4 GiB of training sample
    # PQ{M} must divide d without OPQ's rotation
    (1_000_000, 96, "40M", "IVF4096,PQ24"),
    (1_000_000, 100, "20M", "IVF4096,PQ4"),
    # just under FLAT_MAX but over budget: enough vectors (>= 256*39) to train PQ
    (9_990, 64, "1M", "IVF256,PQ64"),
    (20_000, 128, "1M", "IVF512,PQ32"),
    # OPQ{M}_{D},IVF{k},PQ{M} for d >= 256: rotate to D = 4*M dims (at most d)
    (1_000_000, 256, "50M", "OPQ32_128,IVF4096,PQ32"),
    (1_000_000, 300, "100M", "OPQ64_256,IVF4096,PQ64"),   # M need not divide d with OPQ
    (1_000_000, 384, "20M", "OPQ8_32,IVF4096,PQ8"),
    (1_000_000, 768, "1G", "OPQ128_512,IVF4096,PQ128"),
    (100_000, 768, "100M", "OPQ128_512,IVF1024,PQ128"),
    (10_000_000, 1024, "300M", "OPQ16_64,IVF16384,PQ16"),
]


@pytest.mark.parametrize("n,d,budget,factory", FACTORY_ROWS)
def test_choose_factory(n, d, budget, factory):
    c = choose_factory(n, d, parse_bytes(budget))
    assert isinstance(c, Choice)
    assert c.factory == factory, c.reason
    assert c.reason


@pytest.mark.parametrize("n,d,budget,factory", FACTORY_ROWS)
def test_choose_factory_fits_budget(n, d, budget, factory):
    """The promise: the chosen index's codes + ids (+ list overhead) fit the budget."""
    b = parse_bytes(budget)
    c = choose_factory(n, d, b)
    assert n * c.bytes_per_vector * LIST_OVERHEAD <= b
    flat = 4 * d + ID_BYTES
    assert c.bytes_per_vector == (flat if c.factory.endswith("Flat") else int(c.factory.rsplit("PQ", 1)[1]) + ID_BYTES)


@pytest.mark.parametrize("n,d,budget,factory", FACTORY_ROWS)
def test_choose_factory_is_a_valid_faiss_factory(n, d, budget, factory):
    """faiss builds the string for d (no training); PQ's code size is the bytes the budget counted."""
    faiss = pytest.importorskip("faiss")
    c = choose_factory(n, d, parse_bytes(budget))
    index = faiss.index_factory(d, c.factory)
    assert index.d == d
    if "IVF" in c.factory:
        ivf = faiss.extract_index_ivf(index)
        assert ivf.nlist == nlist_for(n, d)
        assert ivf.code_size + ID_BYTES == c.bytes_per_vector


@pytest.mark.parametrize("n,d", [(1_000_000, 128), (1_000_000, 768), (50_000, 96), (10_000_000, 64)])
def test_choose_factory_shrinks_with_the_budget(n, d):
    """A smaller budget never gives a bigger index; the raw-vector budget gives Flat codes."""
    flat = (4 * d + ID_BYTES) * n * LIST_OVERHEAD
    sizes = []
    for frac in (2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.03):
        try:
            sizes.append(choose_factory(n, d, int(flat * frac)).bytes_per_vector)
        except ConfigError:
            break
    assert sizes[0] == sizes[1] == 4 * d + ID_BYTES
    assert len(sizes) >= 4
    assert sizes == sorted(sizes, reverse=True)


# (N, d, budget, a fragment of the message)
FACTORY_ERROR_ROWS = [
    (5_000, 768, "1M", "too few vectors to train PQ"),
    (9_000, 32, 1000, "too few vectors to train PQ"),
    (1_000_000, 128, "12M", "at least"),      # PQ4 + id needs 12.0 MiB + 5%
    (1_000_000, 128, "1k", "at least"),
    (1_000_000, 768, "1M", "at least"),       # OPQ cannot help either
    (1_000_000, 128, 0, "at least"),
    (1_000_000, 30, "100M", "divides d=30)"),  # no PQ{M} of PQ_M divides 30: only raw vectors work
    (1_000_000, 2, "10M", "divides d=2"),
]


@pytest.mark.parametrize("n,d,budget,fragment", FACTORY_ERROR_ROWS)
def test_choose_factory_nothing_fits(n, d, budget, fragment):
    with pytest.raises(ConfigError) as e:
        choose_factory(n, d, parse_bytes(budget))
    msg = str(e.value)
    assert msg.startswith("memory_budget: ")
    assert "--memory-budget" in msg and "--factory" in msg
    assert fragment in msg
    assert f"{n:,} vectors of d={d}" in msg


@pytest.mark.parametrize("n,d,budget,fragment", FACTORY_ERROR_ROWS)
def test_choose_factory_suggested_budget_is_enough(n, d, budget, fragment):
    """The fix the message names works: --memory-budget set to what it says, written as it says it."""
    with pytest.raises(ConfigError) as e:
        choose_factory(n, d, parse_bytes(budget))
    m = re.search(r"raise --memory-budget to (?:at least )?([\d.]+ [KMGT]iB)", str(e.value))
    assert m, str(e.value)
    c = choose_factory(n, d, parse_bytes(m.group(1)))
    assert n * c.bytes_per_vector * LIST_OVERHEAD <= parse_bytes(m.group(1))


@pytest.mark.parametrize("n,d", [(0, 32), (-5, 32), (10, 0), (10, -1)])
def test_choose_factory_empty(n, d):
    with pytest.raises(ConfigError, match="at least one vector"):
        choose_factory(n, d, GiB)


@pytest.mark.parametrize("n,k", [
    (1, 1), (38, 1), (77, 1), (78, 2), (100, 2), (1_000, 16), (9_984, 256), (10_000, 256),
    (100_000, 1024), (1_000_000, 4096), (10_000_000, 32768), (100_000_000, 65536), (1_000_000_000, 524288),
])
def test_nlist_for(n, k):
    assert nlist_for(n) == k


@pytest.mark.parametrize("n", [1, 2, 39, 40, 500, 4_321, 10_000, 12_345, 77_777, 1 << 20, 3_000_000, 987_654_321])
def test_nlist_for_rules(n):
    k = nlist_for(n)
    assert k >= 1 and k & (k - 1) == 0                     # a power of two
    assert k == 1 or n >= k * MIN_TRAIN_PER_LIST           # enough vectors per list
    assert k <= 2 * nlist_factor(n) * n ** 0.5 + 1         # near c*sqrt(N), never far above


@pytest.mark.parametrize("d,code_bytes,need_divisor,m", [
    (128, 1000, True, 128),
    (128, 64, True, 64),
    (128, 63.9, True, 32),     # 48 does not divide 128
    (128, 31.9, True, 16),     # nor 24
    (96, 40, True, 32),
    (96, 31.9, True, 24),
    (100, 20, True, 4),
    (30, 1000, True, None),    # nothing in PQ_M divides 30
    (30, 1000, False, 24),     # with OPQ: the largest M <= d
    (768, 1000, False, 128),
    (768, 3.9, False, None),   # not even PQ4 fits
    (768, -8, False, None),
    (8, 8, True, 8),
    (2, 100, False, None),     # M never exceeds d
])
def test_pq_m(d, code_bytes, need_divisor, m):
    assert pq_m(d, code_bytes, need_divisor) == m


@pytest.mark.parametrize("n,d,factory,nlist,kw,want", [
    (1_000, 128, "Flat", None, {}, 1_000),                       # never more than N
    (50_000, 128, "Flat", None, {}, 10_000),                     # the 10k floor
    (1_000_000, 128, "IVF64,Flat", 64, {}, 10_000),
    (1_000_000, 128, "IVF64,PQ16", 64, {}, 25_600),              # PQ's 256 centroids x 100
    (1_000_000, 128, "OPQ16_64,IVF64,PQ16", 64, {}, 25_600),
    (1_000_000, 128, "IVF4096,Flat", 4096, {}, 409_600),         # 100 per list
    (1_000_000, 128, "IVF4096,PQ64", 4096, {}, 409_600),
    (20_000, 128, "IVF512,PQ32", 512, {}, 20_000),
    (10**9, 128, "IVF131072,PQ64", 131072, {}, 8_388_608),       # capped: 4 GiB of float32
    (10**9, 768, "IVF131072,PQ64", 131072, {}, 5_111_808),       # the cap is under 39 a list: 39 a list wins
    (10**9, 128, "IVF1024,Flat", 1024, {"cap_bytes": 50_000 * 512}, 50_000),
    (10**9, 768, "IVF65536,PQ64", 65536, {"cap_bytes": 1 << 30}, 2_555_904),
])
def test_train_size(n, d, factory, nlist, kw, want):
    assert train_size(n, d, factory, nlist, **kw) == want


@pytest.mark.parametrize("n,d,budget,factory", [r for r in FACTORY_ROWS if "IVF" in r[3] and r[0] <= 1_000_000])
def test_train_size_trains_every_list(n, d, budget, factory):
    """Up to a million vectors, the auto factory's k-means gets >= 39 training vectors per list."""
    k = nlist_for(n, d)
    assert train_size(n, d, factory, k) >= min(n, k * MIN_TRAIN_PER_LIST)


# ================================================================ index_builder/shard_math.py

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


# ================================================================ index_builder/config.py

@pytest.mark.parametrize("text,want", [
    ("512M", 512 * MiB),
    ("4G", 4 * GiB),
    ("1.5G", int(1.5 * GiB)),
    ("100k", 100 * KiB),
    ("100K", 100 * KiB),
    ("1T", 1 << 40),
    ("4GiB", 4 * GiB),
    ("4GB", 4 * GiB),
    ("4gib", 4 * GiB),
    ("12.5 MiB", int(12.5 * MiB)),
    (" 2 G ", 2 * GiB),
    ("123", 123),
    ("0", 0),
    (4096, 4096),
])
def test_parse_bytes(text, want):
    assert parse_bytes(text) == want


@pytest.mark.parametrize("text", ["", "G", "4X", "-1G", "1,5G", "1e9", "four", "4 G B", "4P", "4GG", "0x10"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="write it like 512M, 4G"):
        parse_bytes(text)


def cfg(**kw) -> BuildConfig:
    return make(BuildConfig, {"source": "corpus", "index_root": "index", **kw})


# (config overrides, fragments the one ConfigError must contain)
CONFIG_ERROR_ROWS = [
    ({"shards": 0}, ["shards: must be at least 1, got 0"]),
    ({"shards": "two"}, ["shards:", "integer"]),
    ({"batch_size": -1}, ["batch_size: must be at least 1"]),
    ({"part_rows": 0}, ["part_rows: must be at least 1"]),
    ({"shards": 0, "batch_size": 0}, ["shards:", "batch_size:"]),
    ({"shard": 2}, ["shard: unknown option", "check the spelling"]),
    ({"bad_rows": "drop"}, ["bad_rows:", "'error' or 'skip'"]),
    ({"metric": "cosine"}, ["metric:", "'ip' or 'l2'"]),
    ({"sharding": "range"}, ["sharding:", "'hash'"]),
    ({"actors": 0}, ["actors: must be at least 1", "leave it out"]),
    ({"target_recall": 0}, ["target_recall: must be in (0, 1]"]),
    ({"target_recall": 1.5}, ["target_recall:", "got 1.5"]),
    ({"memory_budget": "lots"}, ["memory_budget: 'lots' is not a size", "512M"]),
    ({"memory_budget": "4X"}, ["memory_budget:", "4G"]),
    ({"memory_budget": "0"}, ["memory_budget: '0' is under 1 MiB", "4G"]),
    ({"memory_budget": 1000}, ["memory_budget: '1000' is under 1 MiB"]),
    ({"vector_column": "vec", "model": "m"}, ["--model or --vector-column, not both"]),
    ({"fields": "id,title"}, ["fields: 'id' is the id column"]),
]


@pytest.mark.parametrize("overrides,fragments", CONFIG_ERROR_ROWS)
def test_config_errors_name_the_field(overrides, fragments):
    with pytest.raises(ConfigError) as e:
        cfg(**overrides)
    msg = str(e.value)
    assert msg.startswith("config: ")
    for f in fragments:
        assert f in msg


def test_config_missing_fields_are_named():
    with pytest.raises(ConfigError, match="source: required; index_root: required"):
        make(BuildConfig, {})


def test_config_errors_name_where():
    with pytest.raises(ConfigError, match=r"^build\.yaml: shards:"):
        make(BuildConfig, {"source": "s", "index_root": "r", "shards": 0}, where="build.yaml")


def test_config_assignment_is_validated():
    c = cfg()
    with pytest.raises(Exception, match="shards"):
        c.shards = 0


@pytest.mark.parametrize("overrides,attr,want", [
    ({}, "budget_bytes", 4 * GiB),
    ({"memory_budget": "512M"}, "budget_bytes", 512 * MiB),
    ({"memory_budget": 1 << 30}, "budget_bytes", 1 << 30),      # YAML writes a byte count as an int
    ({"fields": "title, url ,"}, "fields", ["title", "url"]),
    ({}, "stored_fields", ["text"]),
    ({"text_column": "body"}, "stored_fields", ["body"]),
    ({"vector_column": "vec"}, "stored_fields", []),
    ({"vector_column": "vec", "fields": ["title"]}, "stored_fields", ["title"]),
    ({"fields": []}, "stored_fields", []),
])
def test_config_values(overrides, attr, want):
    assert getattr(cfg(**overrides), attr) == want


@pytest.mark.parametrize("text,overrides,fragments", [
    ("source: c\nindex_root: i\nshrads: 2\n", {}, ["shrads: unknown option"]),
    ("source: c\nindex_root: i\nbad_rows: maybe\n", {}, ["bad_rows:"]),
    ("source: c\nindex_root: i\nshards: 0\n", {}, ["shards: must be at least 1"]),
    ("source: c\nshards: 2\n", {}, ["index_root: required"]),
    ("", {}, ["source: required"]),
    ("- a\n- b\n", {}, ["expected a mapping of option names to values"]),
    ("source: c\nindex_root: i\n", {"shards": 0}, ["shards:"]),        # overrides are checked too
])
def test_from_yaml_errors_name_the_file_and_key(tmp_path, text, overrides, fragments):
    path = tmp_path / "build.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        BuildConfig.from_yaml(str(path), **overrides)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ")
    for f in fragments:
        assert f in msg


def test_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "build.yaml"
    path.write_text("source: s3://bucket/corpus\nindex_root: ./index\nshards: 4\nmemory_budget: 2G\n"
                    "fields: title,url\nbad_rows: skip\n")
    c = BuildConfig.from_yaml(str(path), shards=8, factory=None, metric="ip")  # None: not given on the CLI
    assert (c.source, c.shards, c.factory, c.metric, c.bad_rows) == ("s3://bucket/corpus", 8, "auto", "ip", "skip")
    assert c.budget_bytes == 2 * GiB and c.fields == ["title", "url"]


# ================================================================ index_builder/plan/corpus.py

@pytest.mark.parametrize("n,part_rows,parts", [
    (0, 10, []),
    (1, 1000, [(0, 1)]),
    (10, 10, [(0, 10)]),
    (11, 10, [(0, 6), (6, 11)]),
    (10, 3, [(0, 2), (2, 5), (5, 8), (8, 10)]),
    (7, 1, [(i, i + 1) for i in range(7)]),
    (3000, 1000, [(0, 1000), (1000, 2000), (2000, 3000)]),
    (3001, 1000, [(0, 750), (750, 1500), (1500, 2251), (2251, 3001)]),
])
def test_split_rows(n, part_rows, parts):
    assert split_rows(n, part_rows) == parts


@pytest.mark.parametrize("n,part_rows", [(1, 1), (2, 3), (999, 1000), (1001, 1000), (12_345, 678),
                                         (100_000, 20_000), (100_001, 20_000), (1_000_003, 7_919)])
def test_split_rows_covers_every_row_once(n, part_rows):
    parts = split_rows(n, part_rows)
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))    # contiguous: no gap, no overlap
    sizes = [b - a for a, b in parts]
    assert len(parts) == -(-n // part_rows)                        # as few parts as part_rows allows
    assert max(sizes) <= part_rows and max(sizes) - min(sizes) <= 1
    assert all(isinstance(x, int) for p in parts for x in p)


def _blake_id(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


@pytest.mark.parametrize("values", [[], ["a"], ["doc-1", "doc-2", "doc-1"], ["", " ", "ünï©ødé", "x" * 10_000],
                                    ["os.path:join", "os.path:join "]])
def test_string_ids_table(values):
    ids = string_ids(values)
    assert ids.dtype == np.int64 and ids.shape == (len(values),)
    assert ids.tolist() == [_blake_id(v) for v in values]          # stable: defined by the string alone
    assert np.array_equal(ids, string_ids(list(values)))
    assert (ids >= 0).all() and (ids <= ID_MASK).all()


def test_string_ids_distinct_on_100k():
    values = [f"doc-{i}" for i in range(60_000)] + [f"https://example.org/{i:x}" for i in range(40_000)]
    ids = string_ids(values)
    assert len(np.unique(ids)) == len(values)
    assert (ids >= 0).all()
    assert ids[ids > 2**62].size > 0                               # the high half is used too


@pytest.mark.parametrize("col,kind,want", [
    (pa.array([3, 1, 2], pa.int32()), "int", [3, 1, 2]),
    (pa.array([2**40, 0], pa.uint64()), "int", [2**40, 0]),
    (pa.chunked_array([[1, 2], [3]], pa.int16()), "int", [1, 2, 3]),
    (pa.array(["a", "b"]), "str", [_blake_id("a"), _blake_id("b")]),
    (pa.chunked_array([["a"], ["b"]], pa.large_string()), "str", [_blake_id("a"), _blake_id("b")]),
])
def test_int_ids(col, kind, want):
    got = int_ids(col, kind)
    assert got.dtype == np.int64 and got.tolist() == want


VEC = pa.list_(pa.float32())


# (schema fields, config overrides, the id kind, or a CorpusError fragment)
SCHEMA_ROWS = [
    ([("id", pa.int64()), ("text", pa.string())], {}, "int"),
    ([("id", pa.int32()), ("text", pa.large_string())], {}, "int"),
    ([("id", pa.string()), ("text", pa.string())], {}, "str"),
    ([("doc", pa.large_string()), ("body", pa.string())], {"id_column": "doc", "text_column": "body"}, "str"),
    ([("id", pa.int64()), ("vec", VEC)], {"vector_column": "vec"}, "int"),
    ([("id", pa.int64()), ("vec", pa.list_(pa.float16(), 8))], {"vector_column": "vec"}, "int"),
    ([("id", pa.int64()), ("vec", pa.large_list(pa.int8()))], {"vector_column": "vec"}, "int"),
    ([("id", pa.int64()), ("text", pa.string()), ("title", pa.string())], {"fields": ["title"]}, "int"),
    ([("text", pa.string())], {}, "no column 'id' (columns: text); set --id-column"),
    ([("id", pa.int64())], {}, "no column 'text' (columns: id); set --text-column"),
    ([("id", pa.int64())], {"vector_column": "vec"}, "no column 'vec' (columns: id); set --vector-column"),
    ([("id", pa.int64()), ("text", pa.string())], {"fields": ["url"]}, "no column 'url'"),
    ([("id", pa.float64()), ("text", pa.string())], {}, "id column 'id' has type double"),
    ([("id", pa.int64()), ("text", pa.binary())], {}, "text column 'text' has type binary"),
    ([("id", pa.int64()), ("vec", pa.string())], {"vector_column": "vec"}, "vector column 'vec' has type string"),
    ([("id", pa.int64()), ("vec", pa.list_(pa.string()))], {"vector_column": "vec"}, "expected list<float>"),
]


@pytest.mark.parametrize("fields,overrides,want", SCHEMA_ROWS)
def test_check_schema(fields, overrides, want):
    schema = pa.schema(fields)
    c = cfg(**overrides)
    if want in ("int", "str"):
        assert _check_schema("f.parquet", schema, c) == want
    else:
        with pytest.raises(CorpusError) as e:
            _check_schema("f.parquet", schema, c)
        assert str(e.value).startswith("f.parquet: ") and want in str(e.value)


@pytest.mark.parametrize("rows,part_rows,row_group", [((10,), 3, 4), ((1000, 1, 250), 100, 64), ((0, 7), 7, 3)])
def test_plan_parts_cover_every_file_row_once(tmp_path, rows, part_rows, row_group):
    src = tmp_path / "corpus"
    src.mkdir()
    start = 0
    for f, n in enumerate(rows):
        t = pa.table({"id": pa.array(range(start, start + n), pa.int64()), "text": pa.array([f"t{i}" for i in range(n)], pa.string())})
        pq.write_table(t, src / f"f{f}.parquet", row_group_size=row_group)
        start += n
    corpus = plan_corpus(cfg(source=str(src), part_rows=part_rows))
    assert corpus.rows == list(rows) and corpus.total_rows == sum(rows) and corpus.id_kind == "int"
    assert [s.part for s in corpus.shards] == list(range(len(corpus.shards)))
    for f, n in zip(corpus.files, rows):
        mine = [(s.start, s.stop) for s in corpus.shards if s.file == f]
        assert mine == split_rows(n, part_rows)
    assert sum(s.rows for s in corpus.shards) == sum(rows)
    assert all(not s.drops for s in corpus.shards)


def test_plan_skip_puts_drops_in_their_part(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    pq.write_table(pa.table({"id": pa.array([1, 2, None, 4, 2, 6], pa.int64()), "text": list("abcdef")}),
                   src / "a.parquet")
    pq.write_table(pa.table({"id": pa.array([7, 1], pa.int64()), "text": list("gh")}), src / "b.parquet")
    with pytest.raises(CorpusError, match=r"a\.parquet row 2: null id .*--bad-rows skip"):
        plan_corpus(cfg(source=str(src), part_rows=3))
    corpus = plan_corpus(cfg(source=str(src), part_rows=3, bad_rows="skip"))
    assert corpus.rejected_ids == 3
    drops = {(os.path.basename(s.file), s.start): [r for r, _ in s.drops] for s in corpus.shards}
    assert drops == {("a.parquet", 0): [2], ("a.parquet", 3): [4], ("b.parquet", 0): [1]}
    why = {r: w for s in corpus.shards for r, w in s.drops}
    assert "first at" in why[4] and "row 1" in why[4]


def test_input_shard_rows():
    assert InputShard(0, "f", 10, 25).rows == 15


# ================================================================ index_builder/encode/pool.py

# (total CPUs, CPUs of the largest node, GPUs, GPUs per actor, --actors) -> (actors, threads, GPUs per actor)
SHAPE_ROWS = [
    # CPU: 4 threads per actor, fewer on small nodes
    (1, 1, 0, 0.0, None, (1, 1, 0.0)),
    (2, 2, 0, 0.0, None, (1, 2, 0.0)),
    (6, 6, 0, 0.0, None, (1, 4, 0.0)),
    (16, 16, 0, 0.0, None, (4, 4, 0.0)),
    (64, 16, 0, 0.0, None, (16, 4, 0.0)),
    (12, 3, 0, 0.0, None, (4, 3, 0.0)),      # 4 nodes of 3 CPUs
    # CPU, --actors given: the CPUs shared between them, at most one node's worth each
    (16, 16, 0, 0.0, 2, (2, 8, 0.0)),
    (16, 16, 0, 0.0, 3, (3, 5, 0.0)),
    (16, 16, 0, 0.0, 16, (16, 1, 0.0)),
    (64, 16, 0, 0.0, 2, (2, 16, 0.0)),
    (2, 2, 0, 0.0, 1, (1, 2, 0.0)),
    # GPU: one actor per GPU share, up to 4 tokenising threads each
    (8, 8, 4, 1.0, None, (4, 2, 1.0)),
    (16, 16, 8, 1.0, None, (8, 2, 1.0)),
    (32, 16, 2, 0.5, None, (4, 4, 0.5)),
    (64, 32, 2, 1.0, None, (2, 4, 1.0)),
    (4, 4, 1, 1.0, None, (1, 4, 1.0)),
    (2, 1, 1, 1.0, None, (1, 1, 1.0)),
    (16, 16, 4, 1.0, 2, (2, 4, 1.0)),
    (16, 16, 4, 0.25, None, (16, 1, 0.25)),
]


@pytest.mark.parametrize("total,node,gpus,gpa,actors,want", SHAPE_ROWS)
def test_pool_shape(total, node, gpus, gpa, actors, want):
    assert shape(total, node, gpus, gpa, actors) == want


@pytest.mark.parametrize("total,node,gpus,gpa,actors,want", SHAPE_ROWS)
def test_pool_shape_never_oversubscribes(total, node, gpus, gpa, actors, want):
    n, threads, g = shape(total, node, gpus, gpa, actors)
    assert n >= 1 and threads >= 1
    assert threads <= node                     # one actor's threads fit on one node
    assert n * threads <= total                # the pool fits the cluster's CPUs
    if g:
        assert threads <= 4
        assert n * g <= gpus


@pytest.mark.parametrize("node", [1, 2, 3, 4, 5, 8, 16, 48])
def test_pool_shape_sweep(node):
    for nodes in (1, 2, 3, 8):
        total = node * nodes
        for actors in (None, *range(1, total + 1)):
            n, threads, _ = shape(total, node, 0, 0.0, actors)
            assert n * threads <= total and threads <= node, (total, node, actors)
            assert actors is None or n == actors
        for gpus in (1, 2, 4, 8):
            n, threads, g = shape(total, node, gpus, 1.0, None)
            assert (n, g) == (gpus, 1.0) and 1 <= threads <= min(4, node)


# ================================================================ shards/search/topk.py

def _shard_results(rng, nq, sizes, k_s, metric, id_base=1000):
    """Per-shard (D, I) as a faiss index returns them: sorted best first, padded to k_s with -1."""
    out, start = [], 0
    worst = -FLT_MAX if metric == "ip" else FLT_MAX
    for size in sizes:
        D = np.full((nq, k_s), worst, dtype=np.float32)
        I = np.full((nq, k_s), -1, dtype=np.int64)
        m = min(size, k_s)
        for q in range(nq):
            d = rng.standard_normal(size).astype(np.float32)
            ids = id_base + start + rng.permutation(size)
            o = np.argsort(-d if metric == "ip" else d, kind="stable")[:m]
            D[q, :m], I[q, :m] = d[o], ids[o]
        out.append((D, I))
        start += size
    return out


def _brute_topk(results, k, metric):
    D = np.concatenate([d for d, _ in results], axis=1)
    I = np.concatenate([i for _, i in results], axis=1)
    worst = -FLT_MAX if metric == "ip" else FLT_MAX
    outD = np.full((D.shape[0], k), worst, dtype=np.float32)
    outI = np.full((D.shape[0], k), -1, dtype=np.int64)
    for q in range(D.shape[0]):
        ok = I[q] >= 0
        d, i = D[q, ok], I[q, ok]
        o = np.argsort(-d if metric == "ip" else d, kind="stable")[:k]
        outD[q, :len(o)], outI[q, :len(o)] = d[o], i[o]
    return outD, outI


# (shard sizes, k per shard, k)
TOPK_ROWS = [
    ([50], 10, 10),
    ([50, 50], 10, 10),
    ([30, 20, 40], 5, 5),
    ([100, 100, 100, 100, 100], 10, 1),
    ([100, 100], 20, 10),       # shards asked for more than k
    ([3, 4], 10, 10),           # fewer results than k in all: -1 padding
    ([0, 6], 10, 10),           # an empty shard
    ([0, 0], 5, 5),             # nothing at all
    ([2, 50, 1], 8, 8),
    ([7], 7, 10),               # one shard, shorter than k
]


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("sizes,k_s,k", TOPK_ROWS)
def test_merge_topk_matches_brute_force(sizes, k_s, k, metric):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(len(sizes) * 100 + k)
    res = _shard_results(rng, 6, sizes, k_s, metric)
    D, I = merge_topk(res, k, metric)
    wantD, wantI = _brute_topk(res, k, metric)
    assert D.shape == I.shape == (6, k)
    assert np.array_equal(I, wantI)
    assert np.allclose(D, wantD)
    found = min(sum(sizes), k)
    assert (I[:, found:] == -1).all() and (I[:, :found] >= 0).all()
    # best first, in the metric's direction
    valid = D[:, :found]
    assert (np.diff(valid, axis=1) <= 0).all() if metric == "ip" else (np.diff(valid, axis=1) >= 0).all()


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("sizes,k", [([40, 25, 35], 10), ([3, 4], 10), ([0, 9], 5), ([1, 1, 1, 1], 3)])
def test_merge_topk_of_real_flat_shards_is_the_monolithic_topk(sizes, k, metric):
    """Invariant 4 on tiny exact shards: merged shard results == one index over everything."""
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(sum(sizes))
    d, n = 16, sum(sizes)
    x = rng.standard_normal((n, d)).astype(np.float32)
    xq = rng.standard_normal((5, d)).astype(np.float32)
    ids = rng.permutation(10 * n + 10)[:n].astype(np.int64) + 7
    mt = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2

    def index(a, b):
        ix = faiss.IndexIDMap(faiss.IndexFlat(d, mt))
        ix.add_with_ids(x[a:b], ids[a:b])
        return ix

    bounds = np.cumsum([0, *sizes])
    shards = [index(a, b).search(xq, k) for a, b in zip(bounds[:-1], bounds[1:])]
    D, I = merge_topk(shards, k, metric)
    wantD, wantI = index(0, n).search(xq, k)
    assert np.array_equal(I, wantI)
    assert np.allclose(D, wantD, rtol=1e-5, atol=1e-5)


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
    monkeypatch.setattr(topk_mod, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(n + k)
    d = 48
    xb, xq = rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((nq, d)).astype(np.float32)
    flat = faiss.IndexFlat(d, faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
    flat.add(xb)
    wantD, wantI = flat.search(xq, k)
    D, I = topk_mod.exact_knn(xq, xb, k, metric)
    assert np.array_equal(I, wantI)
    assert np.allclose(D[I >= 0], wantD[wantI >= 0], rtol=1e-4, atol=1e-4)


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


# ================================================================ shards/storage/store.py

def _tmp_files(root) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if ".tmp-" in f]


@pytest.mark.parametrize("rel,data", [
    ("a.bin", b""),
    ("a.bin", b"x"),
    ("x/y/z.bin", bytes(range(256)) * 100),
    ("versions/v1/manifest.json", b'{"a": 1}'),
    ("d\u00e9j\u00e0/\u03b1.txt", "h\u00e9llo".encode()),
    ("big.bin", np.random.default_rng(0).bytes(3 * MiB + 5)),
])
def test_store_round_trip(tmp_path, rel, data):
    s = Store(str(tmp_path / "root"))
    s.write_bytes(rel, data)
    assert s.read_bytes(rel) == data
    assert s.exists(rel) and s.size(rel) == len(data)
    assert s.sha256(rel) == hashlib.sha256(data).hexdigest()
    assert not _tmp_files(tmp_path)
    s.write_bytes(rel, data + b"!")                       # overwrite in place
    assert s.read_bytes(rel) == data + b"!"
    assert not _tmp_files(tmp_path)


@pytest.mark.parametrize("root", ["{tmp}/r", "{tmp}/r/", "file://{tmp}/r"])
def test_store_roots(tmp_path, root):
    s = Store(root.format(tmp=tmp_path))
    assert s.local and not s.root.endswith("/")
    s.write_text("a/b.txt", "hi")
    assert (tmp_path / "r" / "a" / "b.txt").read_text() == "hi"
    assert s.uri("a/b.txt") == s.root + "/a/b.txt"
    assert s.child("a").read_text("b.txt") == "hi"


def test_store_read_missing_names_the_uri(tmp_path):
    s = Store(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(s.uri("no/such.bin"))):
        s.read_bytes("no/such.bin")


def test_store_write_is_atomic_for_a_concurrent_reader(tmp_path):
    """A reader sees the old bytes or the new bytes, never a mix or a short file."""
    s = Store(str(tmp_path))
    a, b = b"A" * (512 * KiB), b"B" * (256 * KiB)
    s.write_bytes("f.bin", a)
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(s.read_bytes("f.bin"))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(30):
            s.write_bytes("f.bin", b if i % 2 == 0 else a)
    finally:
        stop.set()
        t.join()
    assert seen <= {a, b}
    assert not _tmp_files(tmp_path)


def test_store_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    s = Store(str(tmp_path))
    s.write_bytes("f.bin", b"old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        s.write_bytes("f.bin", b"new and longer")
    monkeypatch.undo()
    assert s.read_bytes("f.bin") == b"old"


def test_store_sha256_reads_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "CHUNK", 7)
    s = Store(str(tmp_path))
    data = np.random.default_rng(1).bytes(1000)
    s.write_bytes("f", data)
    assert s.sha256("f") == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("columns", [None, ["id"], ["vec", "text"]])
def test_store_table_round_trip(tmp_path, columns):
    s = Store(str(tmp_path))
    t = pa.table({"id": pa.array([3, 1, 2], pa.int64()), "text": ["a", None, "c\u00e9"],
                  "vec": pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], pa.list_(pa.float32()))})
    s.write_table("docs/part-0.parquet", t)
    assert not _tmp_files(tmp_path)
    got = s.read_table("docs/part-0.parquet", columns=columns)
    assert got.equals(t if columns is None else t.select(columns))


def test_store_ls(tmp_path):
    s = Store(str(tmp_path / "root"))
    assert s.ls() == [] and s.ls("versions") == []
    for rel in ("versions/v2/manifest.json", "versions/v10/manifest.json", "versions/v1/x", "CURRENT", "b.txt"):
        s.write_text(rel, rel)
    assert s.ls() == ["CURRENT", "b.txt", "versions"]
    assert s.ls("versions") == ["v1", "v10", "v2"]                  # names, sorted as strings
    assert s.ls("versions/v2") == ["manifest.json"]


def test_store_rm(tmp_path):
    s = Store(str(tmp_path))
    s.write_text("w/a/1", "1")
    s.write_text("w/b", "2")
    s.rm("w/b")
    s.rm("w/nothing")                                                 # missing: no error
    assert s.ls("w") == ["a"]
    s.rm("w", recursive=True)
    assert not s.exists("w")


def test_store_copy(tmp_path):
    s = Store(str(tmp_path))
    s.write_bytes("work/shard-0.index", b"index bytes")
    s.copy("work/shard-0.index", "versions/v1/shard-0.index")
    assert s.read_bytes("versions/v1/shard-0.index") == b"index bytes"
    assert s.sha256("versions/v1/shard-0.index") == s.sha256("work/shard-0.index")
    assert not _tmp_files(tmp_path)
    # the copy is independent of later (atomic) rewrites of its source ...
    s.write_bytes("work/shard-0.index", b"rewritten")
    assert s.read_bytes("versions/v1/shard-0.index") == b"index bytes"
    # ... and copying over an existing file replaces it
    s.copy("work/shard-0.index", "versions/v1/shard-0.index")
    assert s.read_bytes("versions/v1/shard-0.index") == b"rewritten"
    with pytest.raises(FileNotFoundError):
        s.copy("work/missing", "versions/v1/missing")


def test_store_put_file_and_fetch(tmp_path):
    s = Store(str(tmp_path / "root"))
    local = tmp_path / "local.bin"
    local.write_bytes(b"payload")
    s.put_file(str(local), "a/b.bin")
    assert s.read_bytes("a/b.bin") == b"payload"
    assert s.fetch("a/b.bin", str(tmp_path)) == s.path("a/b.bin")    # local: the file itself
    assert not _tmp_files(tmp_path)


def test_store_pickles_by_uri(tmp_path):
    import pickle

    s = Store(str(tmp_path))
    s.write_text("x", "y")
    t = pickle.loads(pickle.dumps(s))
    assert t.root == s.root and t.read_text("x") == "y"


# ================================================================ shards/storage/manifest.py

VERSION_RE = re.compile(r"^v\d{8}-\d{6}-[0-9a-z]{1,6}-[0-9a-f]{4}$")


@pytest.mark.parametrize("run_id", ["abcdef123456", "ab12cd", "r1", "0f9e8d7c6b5a4"])
def test_new_version_name_format(run_id):
    v = new_version_name(run_id)
    assert VERSION_RE.match(v), v
    assert v.split("-")[2] == run_id[:6]
    assert new_version_name(run_id) != v                      # two publishes never share a name


def test_new_version_names_sort_by_time(monkeypatch):
    from datetime import datetime, timezone

    times = [datetime(2025, 12, 31, 23, 59, 59, tzinfo=timezone.utc), datetime(2026, 1, 1, 0, 0, 0, tzinfo=timezone.utc),
             datetime(2026, 1, 1, 0, 0, 1, tzinfo=timezone.utc), datetime(2026, 2, 1, 9, 5, 0, tzinfo=timezone.utc),
             datetime(2026, 11, 22, 5, 30, 0, tzinfo=timezone.utc)]
    it = iter(times)

    class FakeDatetime:
        @staticmethod
        def now(tz=None):
            return next(it)

    monkeypatch.setattr(mf, "datetime", FakeDatetime)
    names = [new_version_name(run) for run in ("zzzzzz", "yyyyyy", "000000", "mmmmmm", "aaaaaa")]
    assert names == sorted(names)
    assert names[0].startswith("v20251231-235959-zzzzzz-") and names[-1].startswith("v20261122-053000-aaaaaa-")


def _publish_files(store: Store, version: str, files: dict[str, bytes]) -> dict[str, FileInfo]:
    out = {}
    for name, data in files.items():
        rel = f"{vdir(version)}/{name}"
        store.write_bytes(rel, data)
        out[name] = FileInfo(file=name, sha256=store.sha256(rel), bytes=store.size(rel), ntotal=len(data))
    return out


def _manifest(store: Store, version: str, shards: int = 2, documents: int = 100) -> Manifest:
    files = {"trained.index": b"T" * 64, **{f"shard-{s}.index": bytes([s]) * (100 + s) for s in range(shards)}}
    info = _publish_files(store, version, files)
    return Manifest(version=version,
                    source=SourceInfo(uri="s3://b/corpus", fingerprint="0123456789abcdef", documents=documents),
                    encoder=EncoderInfo(name="precomputed", dim=32, normalize=False, metric="l2"),
                    index=IndexInfo(factory="IVF64,PQ8", metric="l2", nlist=64, train_vectors=25_600),
                    sharding=ShardingInfo(shards=shards),
                    trained=info["trained.index"].model_copy(update={"ntotal": 0}),
                    shards=[info[f"shard-{s}.index"] for s in range(shards)],
                    docs=DocsInfo(files=["docs/part-0.parquet"], fields=["title"]),
                    timings={"train": 1.5})


@pytest.mark.parametrize("shards", [1, 2, 5])
def test_manifest_round_trip(tmp_path, shards):
    s = Store(str(tmp_path))
    m = _manifest(s, "v1", shards)
    write_manifest(s, m)
    assert s.exists("versions/v1/manifest.json") and not _tmp_files(tmp_path)
    got = load_manifest(s, "v1")
    assert got == m
    assert got.ntotal == sum(100 + i for i in range(shards))
    assert [f.file for f in got.files()] == ["trained.index", *[f"shard-{i}.index" for i in range(shards)]]
    verify(s, got)


# (file to damage, how) -> IntegrityError naming that file
@pytest.mark.parametrize("name,damage", [
    ("shard-1.index", lambda b: bytes([b[0] ^ 1]) + b[1:]),   # same size, different bytes
    ("shard-0.index", lambda b: b[:-1]),                      # truncated
    ("trained.index", lambda b: b + b"\0"),                   # grown
    ("trained.index", lambda b: b[::-1].replace(b"T", b"t", 1)),
])
def test_verify_detects_a_damaged_file(tmp_path, name, damage):
    s = Store(str(tmp_path))
    m = _manifest(s, "v1")
    rel = f"versions/v1/{name}"
    s.write_bytes(rel, damage(s.read_bytes(rel)))
    with pytest.raises(IntegrityError) as e:
        verify(s, m)
    assert s.uri(rel) in str(e.value) and "sha256" in str(e.value)


def test_verify_missing_file_names_it(tmp_path):
    s = Store(str(tmp_path))
    m = _manifest(s, "v1")
    s.rm("versions/v1/shard-1.index")
    with pytest.raises((IntegrityError, FileNotFoundError), match="shard-1.index"):
        verify(s, m)


def test_current_and_set_current(tmp_path):
    s = Store(str(tmp_path))
    with pytest.raises(StorageError, match=r"CURRENT: no published version"):
        current_version(s)
    with pytest.raises(StorageError, match=r"no such version 'v1'"):
        set_current(s, "v1")                                  # no manifest yet: CURRENT must not move
    assert not s.exists("CURRENT")
    write_manifest(s, _manifest(s, "v1"))
    set_current(s, "v1")
    assert current_version(s) == "v1" and s.read_text("CURRENT") == "v1\n"
    write_manifest(s, _manifest(s, "v2"))
    set_current(s, "v2")
    assert current_version(s) == "v2"
    assert not _tmp_files(tmp_path)
    assert issubclass(StorageError, ShardexError)


def test_load_manifest_errors(tmp_path):
    s = Store(str(tmp_path))
    with pytest.raises(StorageError, match="no such version 'nope'"):
        load_manifest(s, "nope")
    m = _manifest(s, "v9").model_copy(update={"format": "shardex-index/99"})
    write_manifest(s, m)
    with pytest.raises(StorageError, match=r"format 'shardex-index/99', this shardex reads 'shardex-index/1'"):
        load_manifest(s, "v9")


def test_list_versions(tmp_path):
    s = Store(str(tmp_path))
    assert list_versions(s) == []
    names = ["v20260102-000000-bbbbbb-0001", "v20260101-120000-aaaaaa-0002", "v20260103-000000-cccccc-0003"]
    for i, v in enumerate(names):
        write_manifest(s, _manifest(s, v, shards=i + 1, documents=10 * (i + 1)))
    s.write_bytes("versions/v20260104-000000-dddddd-0004/shard-0.index", b"unfinished")   # no manifest
    set_current(s, names[0])
    got = list_versions(s)
    assert [r["version"] for r in got] == sorted(names)          # oldest first; the unfinished one left out
    assert [r["current"] for r in got] == [False, True, False]
    assert {r["version"]: (r["shards"], r["documents"]) for r in got} == {
        names[0]: (1, 10), names[1]: (2, 20), names[2]: (3, 30)}
    assert all(r["factory"] == "IVF64,PQ8" and r["encoder"] == "precomputed" for r in got)


def test_summary_leaves_out_the_file_list(tmp_path):
    m = _manifest(Store(str(tmp_path)), "v1")
    out = mf.summary(m)
    assert set(out) == {"version", "created", "source", "encoder", "index", "sharding", "search"}
    assert out["sharding"] == {"mode": "hash", "shards": 2, "ranges": None}

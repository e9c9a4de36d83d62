"""index_builder/plan/factory.py: the --factory auto chooser (nlist, PQ size, training sample) and
index_plan, the memory and disk a build will need. Tables of parametrize rows; faiss checks the factories."""
from __future__ import annotations

import re

import pytest

from index_builder.config import parse_bytes
from index_builder.plan.factory import (
    ID_BYTES,
    LIST_OVERHEAD,
    MIN_TRAIN_PER_LIST,
    TRAIN_MAX_BYTES,
    Choice,
    check_trainable,
    choose_factory,
    factory_shape,
    index_plan,
    nlist_factor,
    nlist_for,
    plan_warnings,
    pq_recall_cap,
    train_size,
    trained_bytes,
)
from shards.errors import ConfigError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


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
    (1_000_000, 128, "15M", "IVF4096,PQ4"),         # 12.0 MiB of codes + 5%, and 2.1 MiB trained
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
    (20_000, 128, "1M", "IVF512,PQ16"),             # PQ32's codes fit, not with the 384 KiB trained part
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


@pytest.mark.parametrize("shards", [1, 2, 16])
@pytest.mark.parametrize("n,d,budget,factory", FACTORY_ROWS)
def test_choose_factory_fits_budget(n, d, budget, factory, shards):
    """The promise: the chosen index's codes + ids (+ list overhead), and the trained part held by
    every shard, fit the budget."""
    b = parse_bytes(budget)
    try:
        c = choose_factory(n, d, b, shards=shards)
    except ConfigError as e:
        assert shards > 1 and "each holds its own trained part" in str(e)   # 16 copies of the centroids
        return
    assert n * c.bytes_per_vector * LIST_OVERHEAD + shards * trained_bytes(c.factory, d) <= b
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
    """A smaller budget never gives a bigger index; a budget above the raw vectors gives Flat codes."""
    flat = (4 * d + ID_BYTES) * n * LIST_OVERHEAD
    sizes = []
    for frac in (2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.03):
        try:
            sizes.append(choose_factory(n, d, int(flat * frac)).bytes_per_vector)
        except ConfigError:
            break
    assert sizes[0] == 4 * d + ID_BYTES      # twice the raw vectors: room for them and the centroids
    assert len(sizes) >= 4
    assert sizes == sorted(sizes, reverse=True)


# (N, d, budget, a fragment of the message)
FACTORY_ERROR_ROWS = [
    (5_000, 768, "1M", "too few vectors to train PQ"),
    (9_000, 32, 1000, "too few vectors to train PQ"),
    (1_000_000, 128, "14M", "at least"),      # PQ4 + id needs 12.0 MiB + 5%, + 2.1 MiB trained
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
    assert n * c.bytes_per_vector * LIST_OVERHEAD + trained_bytes(c.factory, d) <= parse_bytes(m.group(1))


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


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "IVF16,PQ8", "IVF16,PQ8x4fs", "OPQ8_16,IVF16,PQ8",
                                     "PCA16,IVF16,Flat", "IVF16,SQ8", "PQ8", "SQ8"])
def test_trained_bytes_is_what_faiss_writes(factory):
    """The trained part the budget counts once per shard: a trained, empty index as faiss writes it
    is that many bytes plus its headers (under 1 KiB)."""
    import numpy as np

    from index_builder.train.quantizer import make_index
    from shards.storage.faissio import to_bytes

    d = 32
    x = np.random.default_rng(0).standard_normal((2_000, d)).astype("float32")
    index = make_index(factory, d, "l2")
    index.train(x)
    assert trained_bytes(factory, d) <= len(to_bytes(index)) < trained_bytes(factory, d) + KiB


@pytest.mark.parametrize("factory", ["IVF1024_HNSW32,Flat", "IVF1024_HNSW16,PQ8"])
def test_trained_bytes_of_an_hnsw_quantizer(factory):
    """An HNSW coarse quantizer's graph is counted too: its levels are drawn at random, so within 5%."""
    import numpy as np

    from index_builder.train.quantizer import make_index
    from shards.storage.faissio import to_bytes

    d = 32
    index = make_index(factory, d, "l2")
    index.train(np.random.default_rng(0).standard_normal((40_000, d)).astype("float32"))
    assert abs(len(to_bytes(index)) / trained_bytes(factory, d) - 1) < 0.05


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


# ---------------------------------------------------------------- at real sizes, and the plan

# (N, d, nlist): about 4*sqrt(N) to 16*sqrt(N), growing with N, halved to fit the training sample
NLIST_ROWS = [
    (1_000, None, 16),
    (1_000_000, 128, 4096),              # 4*sqrt(N)
    (1_000_001, 128, 8192),              # 8*sqrt(N) above a million
    (10_000_000, 768, 32768),
    (100_000_000, 128, 65536),
    (100_000_001, None, 131072),         # 16*sqrt(N) above a hundred million ...
    (1_000_000_000, None, 524288),
    (1_000_000_000, 128, 131072),        # ... unless 39 a list would not fit 4 GiB of sample
    (1_000_000_000, 768, 32768),
    (1_000_000_000, 4096, 4096),
]


@pytest.mark.parametrize("n,d,want", NLIST_ROWS)
def test_nlist_grows_with_n_within_the_training_memory(n, d, want):
    k = nlist_for(n, d)
    assert k == want
    assert k * MIN_TRAIN_PER_LIST * 4 * (d or 0) <= TRAIN_MAX_BYTES or k == 1
    assert train_size(n, d or 128, f"IVF{k},PQ16", k) >= k * MIN_TRAIN_PER_LIST


# (N, d, budget, need_ivf, factory): --sharding ivf never gets plain Flat
@pytest.mark.parametrize("n,d,budget,need_ivf,want", [
    (5_000, 32, "1G", False, "Flat"),
    (5_000, 32, "1G", True, "IVF128,Flat"),
    (100, 8, "1G", True, "IVF2,Flat"),
    (1, 8, "1G", True, "IVF1,Flat"),
    (1_000_000, 384, "512M", False, "OPQ128_384,IVF4096,PQ128"),    # 1M MiniLM vectors in 512 MiB
    (1_000_000, 384, "100M", True, "OPQ64_256,IVF4096,PQ64"),
])
def test_choose_factory_for_ivf_sharding(n, d, budget, need_ivf, want):
    assert choose_factory(n, d, parse_bytes(budget), need_ivf=need_ivf).factory == want


# (factory, d, (dims after pre-transforms, nlist, code bytes))
@pytest.mark.parametrize("factory,d,want", [
    ("Flat", 32, (32, None, 128)),
    ("IVF4096,Flat", 128, (128, 4096, 512)),
    ("IVF4096,PQ32", 128, (128, 4096, 32)),
    ("IVF256,PQ16x4", 64, (64, 256, 8)),
    ("IVF256,PQ32x4fs", 64, (64, 256, 16)),
    ("OPQ64_256,IVF4096,PQ64", 768, (256, 4096, 64)),
    ("OPQ16,IVF64,PQ16", 64, (64, 64, 16)),
    ("PCA64,IVF128,SQ8", 384, (64, 128, 64)),
    ("PCAR32,IVF16,SQfp16", 64, (32, 16, 64)),
    ("IVF64,SQ4", 30, (30, 64, 15)),
    ("HNSW32", 64, (64, None, None)),             # not sized: the plan says so
    ("IVF1024_HNSW32,PQ8", 64, (64, 1024, 8)),
])
def test_factory_shape(factory, d, want):
    assert factory_shape(factory, d) == want


# (N, d, factory, shards, merge RAM budget) -> (memory per shard, on disk, training sample)
PLAN_ROWS = [
    (1_000_000, 128, "IVF4096,PQ32", 4, "1G", (1_000_000 / 4 * 40 * LIST_OVERHEAD, False, 409_600)),
    (1_000_000, 128, "IVF4096,PQ32", 1, "10M", (1_000_000 * 40 * LIST_OVERHEAD, True, 409_600)),
    # 4 GiB of sample is 1.4M vectors, under 39 a list: the 39 a list win
    (100_000_000, 768, "OPQ64_256,IVF65536,PQ64", 16, "256M", (100_000_000 / 16 * 72 * LIST_OVERHEAD, True,
                                                              65536 * MIN_TRAIN_PER_LIST)),
    (5_000, 32, "Flat", 2, "0", (2_500 * (128 + ID_BYTES) * LIST_OVERHEAD, False, 5_000)),   # Flat: never on disk
]


@pytest.mark.parametrize("n,d,factory,shards,ram,want", PLAN_ROWS)
def test_plan(n, d, factory, shards, ram, want):
    p = index_plan(n, d, factory, shards, parse_bytes(ram))
    shard, on_disk, train = want
    assert p.shard_bytes == pytest.approx(shard, abs=1) and p.on_disk == on_disk and p.train_vectors == train
    assert p.index_bytes == p.shard_bytes * shards and p.train_bytes == train * d * 4
    text = "\n".join(p.lines())
    for fragment in ("memory per shard", "disk", "training sample", f"{train:,} vectors"):
        assert fragment in text
    assert ("on-disk lists" in text) == on_disk


def test_plan_of_an_unknown_encoding():
    p = index_plan(10_000, 64, "HNSW32", 2, 1 << 30)
    assert p.shard_bytes is None and "unknown" in "\n".join(p.lines())


def test_budget_counts_the_trained_part_once_per_shard():
    """The issue's case: 60k x 384 in 2 shards under 8 MiB. OPQ96_384,IVF1024,PQ96 has 6.2 MiB of
    codes and 2.4 MiB of trained part (rotation, centroids, codebooks) in each shard; a smaller code fits."""
    c = choose_factory(60_000, 384, 8 * MiB, shards=2)
    assert c.factory == "OPQ64_256,IVF1024,PQ64", c.reason
    assert 60_000 * c.bytes_per_vector * LIST_OVERHEAD + 2 * trained_bytes(c.factory, 384) <= 8 * MiB
    big = "OPQ96_384,IVF1024,PQ96"
    assert 60_000 * (96 + ID_BYTES) * LIST_OVERHEAD + 2 * trained_bytes(big, 384) > 8 * MiB
    assert choose_factory(60_000, 384, 10 * MiB, shards=1).factory == big   # one copy: the bigger code fits,
    assert choose_factory(60_000, 384, 10 * MiB, shards=2).factory != big   # two do not
    assert "2 x" in c.reason


# (factory, N, d, shards, sharding) -> a fragment of the one-line error
UNTRAINABLE_ROWS = [
    ("IVF4096,Flat", 200, 32, 1, "hash", "has 4,096 IVF lists"),      # more lists than vectors
    ("IVF4096,Flat", 200, 32, 1, "hash", "give at most IVF"),
    ("IVF0,PQ4", 20_000, 32, 1, "hash", "has no IVF lists"),
    ("PQ8", 200, 32, 1, "hash", "256 centroids each"),                # 8-bit codebooks need 256 vectors
    ("IVF4,PQ8", 100, 32, 1, "hash", "256 centroids each"),
    ("IVF16,Flat", 10_000, 32, 32, "ivf", "--shards <= 16"),
]


@pytest.mark.parametrize("factory,n,d,shards,sharding,fragment", UNTRAINABLE_ROWS)
def test_check_trainable_refuses(factory, n, d, shards, sharding, fragment):
    with pytest.raises(ConfigError) as e:
        check_trainable(factory, n, d, shards, sharding)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg
    assert msg.startswith(("factory: ", "shards: ")) and repr(factory) in msg


@pytest.mark.parametrize("factory,n,d,shards,sharding", [
    ("IVF64,Flat", 200, 32, 1, "hash"),          # 3 a list: a warning, not an error
    ("IVF16,PQ8", 10_000, 32, 16, "ivf"),
    ("PQ4x4", 16, 32, 1, "hash"),                # 4-bit codebooks: 16 centroids
    ("Flat", 1, 32, 1000, "hash"),
    ("HNSW32", 10, 32, 1, "hash"),               # not this check's to refuse (check_factory's)
])
def test_check_trainable_accepts(factory, n, d, shards, sharding):
    check_trainable(factory, n, d, shards, sharding)


# (N, d, factory, shards) -> fragments of the warnings (none: no warning)
WARNING_ROWS = [
    (200, 32, "Flat", 1000, ["1,000 shards over 200 vectors", "800 of them empty", "--shards 1"]),
    (60_000, 32, "IVF256,Flat", 100, ["600.0 a shard", "--shards 60"]),
    (60_000, 32, "IVF256,Flat", 60, []),                       # 1,000 a shard: fine
    (200, 32, "IVF64,Flat", 1, ["3.1 a list", "IVF"]),
    (100_000, 32, "IVF1024,Flat", 1, []),
    (10, 32, "Flat", 1, []),
]


@pytest.mark.parametrize("n,d,factory,shards,fragments", WARNING_ROWS)
def test_plan_warnings(n, d, factory, shards, fragments):
    text = " | ".join(plan_warnings(n, d, factory, shards))
    for f in fragments:
        assert f in text, text
    assert bool(text) == bool(fragments), text


@pytest.mark.parametrize("factory,fast", [("IVF16,PQ8x4fs", True), ("OPQ8_32,IVF16,PQ8x4fs", True),
                                          ("IVF16,PQ8", False), ("IVF16,Flat", False), ("PQ8x4fs", True)])
def test_fast_scan(factory, fast):
    from index_builder.plan.factory import fast_scan

    assert fast_scan(factory) is fast


# ---------------------------------------------------------------- --refine auto: codes for two tiers

@pytest.mark.parametrize("code_bytes,dims,cap", [(96, 384, 0.89), (16, 128, 0.66), (64, 128, 1.0), (8, 384, 0.5),
                                                 (32, 128, 0.89)])
def test_pq_recall_cap(code_bytes, dims, cap):
    assert pq_recall_cap(code_bytes, dims) == cap


# (N, d, budget, target, factory, refine)
REFINE_ROWS = [
    (60_000, 384, "8M", 0.95, "OPQ64_256,IVF1024,PQ128x4fs", "fp32"),   # PQ64's 2 bits a dim cap it near 0.89
    (60_000, 384, "8M", 0.85, "OPQ64_256,IVF1024,PQ64", None),          # that cap is over this target
    (60_000, 384, "8M", None, "OPQ64_256,IVF1024,PQ64", None),          # --refine none: codes alone
    (1_000_000, 128, "40M", 0.95, "IVF4096,PQ32x4fs", "fp32"),           # PQ16: 1 bit a dimension
    (1_000_000, 128, "100M", 0.95, "IVF4096,PQ64", None),                # PQ64: 4 bits a dimension
    (1_000_000, 96, "40M", 0.95, "IVF4096,PQ48x4fs", "fp32"),            # 2 x 24 = 48 divides 96 ...
    (1_000_000, 100, "20M", 0.95, "IVF4096,PQ4", "fp32"),                # ... 8 does not divide 100: plain PQ4
    (1_000_000, 128, "1G", 0.95, "IVF4096,Flat", None),                  # raw vectors fit: nothing to rerank
]


@pytest.mark.parametrize("n,d,budget,target,factory,refine", REFINE_ROWS)
def test_choose_factory_with_refine(n, d, budget, target, factory, refine):
    c = choose_factory(n, d, parse_bytes(budget), target=target)
    assert (c.factory, c.refine) == (factory, refine), c.reason
    if refine:
        assert f"under the target {target}" in c.reason and "refine store" in c.reason
    faiss = pytest.importorskip("faiss")
    ivf = faiss.extract_index_ivf(faiss.index_factory(d, c.factory))
    assert ivf.code_size + ID_BYTES == c.bytes_per_vector      # the same bytes as the plain PQ it replaces

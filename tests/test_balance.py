"""Balanced IVF lists (index_builder/train/balance.py): the largest list split down to the cap on skewed
data, the index still exact where it was, the codec retrained on the new lists, and the build's manifest
recording the lists' imbalance, largest list and cap."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from index_builder.reindex.drift import imbalance
from index_builder.train.balance import balance_lists, split_pass
from index_builder.train.quantizer import make_index
from shards.storage.faissio import faiss, ivf, set_nprobe
from shards.storage.manifest import current_version, load_manifest
from shards.storage.store import Store

from helpers import build, vector_table

D = 16


def skewed(n: int, seed: int = 0) -> np.ndarray:
    """Clusters of very unequal sizes (Zipf-like weights): k-means gives lists many times the mean."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(60, D)) * 3
    w = 1 / np.arange(1, 61) ** 1.5
    lab = rng.choice(60, size=n, p=w / w.sum())
    return (centres[lab] + rng.normal(size=(n, D))).astype(np.float32)


def sizes(index) -> np.ndarray:
    iv = ivf(index)
    return np.array([iv.invlists.list_size(i) for i in range(iv.nlist)])


def trained(factory: str, x: np.ndarray, metric: str = "l2"):
    index = make_index(factory, D, metric)
    index.train(x)
    return index


# (sizes, cap, budget) -> splits done: the largest above cap is split while budget lasts; never a list
# of under three points
SPLITS = [
    ([40, 1, 1, 1], 30, 5, 1),
    ([40, 1, 1, 1], 50, 5, 0),   # under the cap
    ([40, 1, 1, 1], 5, 1, 1),    # the budget stops it
    ([2, 0, 0, 0], 0.5, 5, 0),   # too small to split
]


@pytest.mark.parametrize("counts,cap,budget,want", SPLITS)
def test_split_pass_table(counts, cap, budget, want):
    rng = np.random.default_rng(1)
    c = rng.normal(size=(len(counts), D)).astype(np.float32) * 10
    a = np.repeat(np.arange(len(counts)), counts)
    x = (c[a] + rng.normal(size=(len(a), D))).astype(np.float32)
    got = split_pass(x, c, a, cap, budget, ip=False, spherical=False, seed=0)
    assert got == want
    assert np.bincount(a, minlength=len(c)).sum() == len(x)   # every point still has a list


@pytest.mark.parametrize("factory,metric", [("IVF64,Flat", "l2"), ("IVF64,PQ8", "l2"), ("IVF64,Flat", "ip"),
                                            ("OPQ4,IVF64,PQ4", "l2")])
def test_largest_list_split_to_the_cap(factory, metric):
    x = skewed(15_000)  # under 256 per list: the sample measured is all of it
    if metric == "ip":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    plain, capped = trained(factory, x, metric), trained(factory, x, metric)
    rec = balance_lists(capped, x, 2.0)
    plain.add(x)
    capped.add(x)
    a, b = sizes(plain), sizes(capped)
    assert rec["splits"] > 0 and rec["sample_largest"] == [a.max(), b.max()]
    assert a.max() > 2.5 * a.mean() and b.max() <= 2.05 * b.mean()   # added with the same assignment
    assert imbalance(b) < imbalance(a) and rec["sample_imbalance"][1] == pytest.approx(imbalance(b))
    set_nprobe(capped, 64)   # every list: an exhaustive scan of the capped index is exact (Flat) or near it
    xq = x[:200]
    _, I = capped.search(xq, 1)
    if "PQ" not in factory:
        assert (I[:, 0] == np.arange(200)).mean() > 0.99
    else:   # the codec was trained again on the new lists' residuals: no worse than on k-means' lists
        set_nprobe(plain, 64)
        r_plain = (plain.search(xq, 1)[1][:, 0] == np.arange(200)).mean()
        assert (I[:, 0] == np.arange(200)).mean() >= r_plain - 0.05


def test_cap_zero_and_even_lists_change_nothing():
    x = skewed(5000)
    index = trained("IVF16,Flat", x)
    before = ivf(index).quantizer.reconstruct_n(0, 16).copy()
    assert balance_lists(index, x, 0) == {}
    even = faiss().index_factory(D, "IVF16,Flat")
    u = np.random.default_rng(0).random((5000, D)).astype(np.float32)
    even.train(u)
    assert balance_lists(even, u, 50.0)["splits"] == 0
    assert np.array_equal(ivf(index).quantizer.reconstruct_n(0, 16), before)


def test_a_filled_index_is_refused():
    x = skewed(3000)
    index = trained("IVF16,Flat", x)
    index.add(x)
    with pytest.raises(ValueError, match="holds vectors"):
        balance_lists(index, x, 2.0)


@pytest.mark.parametrize("cap", [0, 2.0])
def test_build_records_the_lists(ray_session, tmp_path, cap):
    x = skewed(8000, seed=3)
    (tmp_path / "corpus").mkdir()
    ids = np.arange(len(x), dtype=np.int64)
    pq.write_table(vector_table(ids, x), tmp_path / "corpus" / "part-0.parquet")
    root = str(tmp_path / "index")
    build(ray_session, source=str(tmp_path / "corpus"), index_root=root, vector_column="vector",
          factory="IVF64,Flat", shards=2, sharding="ivf", metric="l2", list_cap=cap)
    m = load_manifest(Store(root), current_version(Store(root)))
    li = m.index.lists
    assert li.cap == cap and li.mean == pytest.approx(len(x) / 64, abs=0.1)
    assert li.imbalance == pytest.approx(m.drift.imbalance)
    if cap:
        assert li.split > 0 and li.largest <= 2.2 * li.mean   # the training sample is most of the corpus here
    else:
        assert li.split == 0 and li.largest > 2.5 * li.mean

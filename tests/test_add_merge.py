"""index_builder/build/payload.py and merge.py without Ray: add units' payloads merge, in RAM or on disk,
in one batch or many, into the monolithic index, for every kind of code; codes from another trained
index, a missing unit, other ids or a truncated payload are refused."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from index_builder.build import merge as merge_mod
from index_builder.build import payload
from index_builder.build.merge import index_digest, merge_shard, open_merged, shard_info
from index_builder.shard_math import hash_shard, ids_digest, range_shard, sum_digests
from index_builder.train.quantizer import make_index
from index_builder.workdir import WorkDir
from shards.errors import IntegrityError
from shards.storage.faissio import faiss, index_ids, ivf, set_nprobe, to_bytes, write_index
from shards.storage.store import Store

from helpers import clustered

D, NL, N = 16, 16, 4000
FACTORIES = [f"IVF{NL},PQ4x4", f"IVF{NL},PQ4x4fs", f"IVF{NL},Flat", f"IVF{NL},SQ8", f"OPQ4,IVF{NL},PQ4", "PQ4",
             "Flat"]


@pytest.fixture(scope="module")
def data():
    x = clustered(N, D, seed=3)
    return x, np.arange(N, dtype=np.int64) * 5 + 2


@functools.cache
def _trained_once(factory: str, seed: int):
    index = make_index(factory, D, "l2")
    top = faiss().downcast_index(index)
    if isinstance(top, faiss().IndexPreTransform):  # a few OPQ iterations are enough to rotate the codes
        opq = faiss().downcast_VectorTransform(top.chain.at(0))
        opq.niter = opq.niter_pq = 4
    index.train(clustered(N, D, seed=seed))
    return index


def _trained(factory: str, x: np.ndarray, seed: int = 3):
    """x: the data (clustered seed 3); trained once per module and factory, a fresh copy each time."""
    return faiss().clone_index(_trained_once(factory, seed))


def _work(tmp_path, index, x, ids, S=1, units=3, ranges=None):
    """A work dir as the add stage leaves it: trained.index and one payload per unit, by id hash
    (ranges None) or in one section sorted by list (ivf sharding)."""
    store, work = Store(str(tmp_path)), WorkDir("work/w")
    write_index(store, work.trained, index)
    fp = payload.fingerprint(to_bytes(index))
    names, digests = [], [[] for _ in range(S)]
    for u, sl in enumerate(np.array_split(np.arange(len(x)), units)):
        lists, codes = payload.encode(index, x[sl])
        sh = np.zeros(len(sl), np.int64) if ranges else hash_shard(ids[sl], S)
        name = f"unit-{u:05d}"
        payload.write(store, work.unit_payload(name), fp, ivf(index).nlist if ivf(index) else 1, sh,
                      1 if ranges else S, lists, ids[sl], codes)
        names.append(name)
        for s in range(S):
            digests[s].append(ids_digest(ids[sl][(range_shard(lists, ranges) if ranges else sh) == s]))
    return store, work, names, [list(sum_digests(d)) for d in digests]


def _mono(index, x, ids):
    mono = faiss().clone_index(index)
    mono.add_with_ids(x, ids)
    return mono


def _same(a, b, xq, nprobes=(1, 4, NL)):
    for nprobe in nprobes:
        set_nprobe(a, nprobe)
        set_nprobe(b, nprobe)
        D1, I1 = a.search(xq, 10)
        D2, I2 = b.search(xq, 10)
        np.testing.assert_array_equal(I1, I2)
        np.testing.assert_array_equal(D1, D2)


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("ondisk", [False, True])
def test_merge_equals_the_monolithic_index(tmp_path, data, factory, ondisk, monkeypatch):
    x, ids = data
    index = _trained(factory, x)
    monkeypatch.setattr(merge_mod, "BATCH_BYTES", 20_000)  # several batches of lists
    store, work, names, want = _work(tmp_path, index, x, ids)
    out = merge_shard(store, work, names, 0, 0, (0, ivf(index).nlist if ivf(index) else 1), want[0], ondisk)
    packed = ivf(index) is not None and ivf(index).get_CodePacker().nvec > 1
    assert out["ntotal"] == N and out["ondisk"] == (ondisk and ivf(index) is not None and not packed)
    shard = open_merged(store, work, 0)
    _same(shard, _mono(index, x, ids), x[::50])
    assert index_digest(shard) == ids_digest(ids)
    info = shard_info(store, work, 0)
    assert (info.sha256, info.bytes) == (store.sha256(work.shard(0)), store.size(work.shard(0)))
    if out["ondisk"]:
        assert info.ivfdata_sha256 == store.sha256(work.shard_data(0))
        assert info.ivfdata_bytes == N * (8 + ivf(shard).code_size)   # lists sized exactly, no slack


@pytest.mark.parametrize("factory", [f"IVF{NL},PQ4x4", f"IVF{NL},PQ4x4fs"])  # fast-scan: cut by list too
@pytest.mark.parametrize("ondisk", [False, True])
def test_hash_and_ivf_shards_together_are_the_monolithic_index(tmp_path, data, factory, ondisk):
    x, ids = data
    index = _trained(factory, x)
    mono = _mono(index, x, ids)
    for mode, ranges in (("hash", None), ("ivf", [[0, 5], [5, 11], [11, NL]])):
        store, work, names, want = _work(tmp_path / mode, index, x, ids, S=3, ranges=ranges)
        got = []
        for s in range(3):
            sec, lists = (0, tuple(ranges[s])) if ranges else (s, (0, NL))
            merge_shard(store, work, names, s, sec, lists, want[s], ondisk)
            shard = open_merged(store, work, s)
            got.append(index_ids(shard))
            if ranges:  # a shard holds its own lists, every vector of them
                inv = ivf(shard).invlists
                sizes = [inv.list_size(l) for l in range(NL)]
                assert all(n == 0 for l, n in enumerate(sizes) if not ranges[s][0] <= l < ranges[s][1])
                assert sizes[slice(*ranges[s])] == [ivf(mono).invlists.list_size(l) for l in range(*ranges[s])]
        assert sorted(np.concatenate(got).tolist()) == sorted(ids.tolist())


def test_payload_codes_are_what_faiss_stores(data):
    x, ids = data
    index = _trained(f"OPQ4,IVF{NL},PQ4", x)
    mono = _mono(index, x, ids)
    lists, codes = payload.encode(index, x)
    inv = ivf(mono).invlists
    for l in range(NL):
        n = inv.list_size(l)
        got = faiss().rev_swig_ptr(inv.get_codes(l), n * inv.code_size).reshape(n, -1)
        np.testing.assert_array_equal(got, codes[lists == l])
        np.testing.assert_array_equal(faiss().rev_swig_ptr(inv.get_ids(l), n), ids[lists == l])


@pytest.mark.parametrize("ondisk", [False, True])
def test_merge_refuses_codes_of_another_trained_index(tmp_path, data, ondisk):
    x, ids = data
    index = _trained(f"IVF{NL},PQ4x4", x)
    store, work, names, want = _work(tmp_path, index, x, ids)
    other = _trained(f"IVF{NL},PQ4x4", x, seed=99)
    lists, codes = payload.encode(other, x[:10])
    payload.write(store, work.unit_payload(names[1]), payload.fingerprint(to_bytes(other)), NL,
                  np.zeros(10, np.int64), 1, lists, ids[:10], codes)
    with pytest.raises(IntegrityError, match=r"unit-00001/payload.bin: encoded with another trained index"):
        merge_shard(store, work, names, 0, 0, (0, NL), want[0], ondisk)
    assert not store.exists(work.shard_record(0))


@pytest.mark.parametrize("damage", ["missing_unit", "other_ids", "truncated"])
def test_merge_checks_ntotal_ids_and_payloads(tmp_path, data, damage):
    x, ids = data
    index = _trained(f"IVF{NL},PQ4x4", x)
    store, work, names, want = _work(tmp_path, index, x, ids)
    if damage == "missing_unit":
        names, match = names[:2], r"shard 0: merged \d+ vectors, not the 4000"
    elif damage == "other_ids":  # a unit re-added with shifted ids: same count
        sl = np.array_split(np.arange(N), 3)[2]
        lists, codes = payload.encode(index, x[sl])
        payload.write(store, work.unit_payload(names[2]), payload.fingerprint(to_bytes(index)), NL,
                      np.zeros(len(sl), np.int64), 1, lists, ids[sl] + 1, codes)
        match = r"shard 0: merged other ids than the 4000"
    else:
        rel = work.unit_payload(names[0])
        store.write_bytes(rel, store.read_bytes(rel)[:-100])
        match = r"unit-00000/payload.bin: truncated"
    with pytest.raises(IntegrityError, match=match):
        merge_shard(store, work, names, 0, 0, (0, NL), want[0], False)
    assert not store.exists(work.shard_record(0))


def test_merge_commit_is_reused(tmp_path, data):
    x, ids = data
    index = _trained(f"IVF{NL},PQ4x4", x)
    store, work, names, want = _work(tmp_path, index, x, ids)
    first = merge_shard(store, work, names, 0, 0, (0, NL), want[0], True)
    again = merge_shard(store, work, names, 0, 0, (0, NL), want[0], True)
    assert again["reused"] and not first["reused"]
    assert first["rss_anon_peak_mib"] >= first["rss_anon_start_mib"] > 0       # the merge's memory, recorded
    assert json.loads(store.read_text(work.shard_record(0)))["ivfdata"] == "shard-0.ivfdata"
    assert list(store.ls(work.shards)) == ["shard-0.index", "shard-0.index.json", "shard-0.ivfdata",
                                           "shard-0.sizes.npy"]

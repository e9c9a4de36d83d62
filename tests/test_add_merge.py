"""index_builder/build/add.py and merge.py without Ray: a work dir of part sub-indexes merges, in RAM
or on disk, into the monolithic index; a foreign quantizer, a missing part or other ids are refused."""
from __future__ import annotations

import json

import numpy as np
import pytest

from index_builder.build.add import add_assigned
from index_builder.build.merge import index_digest, merge_shard, open_merged, shard_info
from index_builder.shard_math import ids_digest, sum_digests
from index_builder.workdir import WorkDir
from shards.errors import IntegrityError
from shards.storage.faissio import faiss, ivf, probed_lists, set_nprobe, write_index
from shards.storage.store import Store

from helpers import clustered

D, NL = 16, 16


@pytest.fixture(scope="module")
def trained():
    x = clustered(4000, D, seed=3)
    index = faiss().index_factory(D, f"IVF{NL},PQ4x4")
    index.train(x)
    return index, x


def _work(tmp_path, trained, parts=3):
    """A work dir as the add stage leaves it for one shard (s=0): trained.index and part sub-indexes."""
    index, x = trained
    store, work = Store(str(tmp_path)), WorkDir("work/w")
    write_index(store, f"{work.root}/trained.index", index)
    ids = np.arange(len(x), dtype=np.int64) * 5 + 2
    digests = []
    for p, sl in enumerate(np.array_split(np.arange(len(x)), parts)):
        sub = faiss().clone_index(index)
        add_assigned(sub, x[sl], ids[sl])
        write_index(store, f"{work.part(p)}/shard-0.index", sub)
        digests.append(ids_digest(ids[sl]))
    return store, work, ids, x, list(sum_digests(digests))


@pytest.mark.parametrize("ondisk", [False, True])
def test_merge_in_ram_and_on_disk_equal_the_monolithic_index(tmp_path, trained, ondisk):
    store, work, ids, x, want = _work(tmp_path, trained)
    out = merge_shard(store, work, [0, 1, 2], 0, want, ondisk)
    assert out["ntotal"] == len(x) and bool(out["ivfdata"]) == ondisk
    shard = open_merged(store, work, 0)
    assert isinstance(faiss().downcast_InvertedLists(ivf(shard).invlists), faiss().OnDiskInvertedLists) == ondisk
    mono = faiss().clone_index(trained[0])
    mono.add_with_ids(x, ids)
    for nprobe in (1, 4, NL):
        set_nprobe(shard, nprobe)
        set_nprobe(mono, nprobe)
        D1, I1 = shard.search(x[::50], 10)
        D2, I2 = mono.search(x[::50], 10)
        np.testing.assert_array_equal(I1, I2)
        np.testing.assert_array_equal(D1, D2)
    assert index_digest(shard) == ids_digest(ids)
    info = shard_info(store, work, 0)
    assert info.sha256 == store.sha256(f"{work.root}/shards/shard-0.index")
    if ondisk:
        assert info.ivfdata_sha256 == store.sha256(f"{work.root}/shards/shard-0.ivfdata")
        assert info.ivfdata_bytes == len(x) * (8 + ivf(shard).code_size)   # lists sized exactly, no slack


@pytest.mark.parametrize("ondisk", [False, True])
def test_merge_refuses_another_quantizer(tmp_path, trained, ondisk):
    store, work, ids, x, want = _work(tmp_path, trained)
    other = faiss().index_factory(D, f"IVF{NL},PQ4x4")
    other.train(clustered(4000, D, seed=99))
    other.add_with_ids(x[:10], ids[:10])
    write_index(store, f"{work.part(1)}/shard-0.index", other)
    with pytest.raises(IntegrityError, match=r"part-00001/shard-0.index: trained with a different quantizer"):
        merge_shard(store, work, [0, 1, 2], 0, want, ondisk)
    assert not store.exists(f"{work.root}/shards/shard-0.index.json")


@pytest.mark.parametrize("ondisk", [False, True])
@pytest.mark.parametrize("damage", ["missing_part", "other_ids"])
def test_merge_checks_ntotal_and_ids(tmp_path, trained, ondisk, damage):
    store, work, ids, x, want = _work(tmp_path, trained)
    parts = [0, 1, 2]
    if damage == "missing_part":
        parts = [0, 1]
        match = r"shard 0: merged \d+ vectors, not the 4000"
    else:   # a part re-added with shifted ids (what merge_from with add_id != 0 does): same count
        index, _ = trained
        sub = faiss().clone_index(index)
        sl = np.array_split(np.arange(len(x)), 3)[2]
        add_assigned(sub, x[sl], ids[sl] + 1)
        write_index(store, f"{work.part(2)}/shard-0.index", sub)
        match = r"shard 0: merged other ids than the 4000"
    with pytest.raises(IntegrityError, match=match):
        merge_shard(store, work, parts, 0, want, ondisk)
    assert not store.exists(f"{work.root}/shards/shard-0.index.json")


def test_merge_commit_is_reused(tmp_path, trained):
    store, work, ids, x, want = _work(tmp_path, trained)
    first = merge_shard(store, work, [0, 1, 2], 0, want, True)
    again = merge_shard(store, work, [0, 1, 2], 0, want, True)
    assert again["reused"] and not first["reused"]
    assert first["rss_anon_peak_mib"] >= first["rss_anon_start_mib"] > 0       # the merge's memory, recorded
    assert json.loads(store.read_text(f"{work.root}/shards/shard-0.index.json"))["ivfdata"] == "shard-0.ivfdata"
    assert list(store.ls(f"{work.root}/shards")) == ["shard-0.index", "shard-0.index.json", "shard-0.ivfdata"]


def test_add_assigned_equals_add_with_ids(trained):
    index, x = trained
    ids = np.arange(len(x), dtype=np.int64) * 7
    a, b = faiss().clone_index(index), faiss().clone_index(index)
    lists = add_assigned(a, x, ids)
    b.add_with_ids(x, ids)
    assert a.ntotal == b.ntotal == len(x)
    np.testing.assert_array_equal(lists, probed_lists(index, x, 1)[:, 0])
    for l in range(NL):
        got = faiss().rev_swig_ptr(ivf(a).invlists.get_ids(l), ivf(a).invlists.list_size(l))
        np.testing.assert_array_equal(np.sort(got), np.sort(ids[lists == l]))
    set_nprobe(a, 4)
    set_nprobe(b, 4)
    np.testing.assert_array_equal(a.search(x[:20], 5)[1], b.search(x[:20], 5)[1])

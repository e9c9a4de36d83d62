"""Storage faults, injected for real: moto's S3 server behind a TCP proxy on 127.0.0.1
(tests/faultproxy.py) that refuses, cuts mid-stream or answers 503 SlowDown to a share of the
connections. A build from and to S3 through it completes with the same index as one without faults;
a corrupt file is still named corrupt; storage that keeps failing is named as such, not as a corrupt
file or a bad configuration."""
from __future__ import annotations

import os
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faultproxy import FaultProxy

from shards.errors import TRANSIENT_FIX, CorpusError, TransientStorageError
from shards.storage.faissio import index_ids, read_index
from shards.storage.manifest import current_version, load_manifest, vdir
from shards.storage.store import Store

from helpers import build, write_vector_corpus

pytestmark = [pytest.mark.s3, pytest.mark.slow]

N, D = 1000, 32
KW = dict(vector_column="vector", factory="IVF16,Flat", shards=2, seed=3, part_rows=500)


@pytest.fixture(scope="module")
def proxy(s3):
    p = FaultProxy(urlparse(s3).port, seed=7).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, s3):
    src = tmp_path_factory.mktemp("faults") / "corpus"
    ids, _ = write_vector_corpus(str(src), n=N, d=D, files=2, seed=5)
    up = Store("s3://corpus/faults", s3)
    for name in sorted(os.listdir(src)):
        up.put_file(str(src / name), name)
    return "s3://corpus/faults", ids


def published(root: str, endpoint: str) -> tuple[list[tuple[str, int]], np.ndarray, object]:
    """(sha256 and bytes of each shard, every id in them, the manifest) of root's CURRENT version."""
    store = Store(root, endpoint)
    m = load_manifest(store, current_version(store))
    ids = np.concatenate([index_ids(read_index(store, f"{vdir(m.version)}/{s.file}")) for s in m.shards])
    return [(s.sha256, s.bytes) for s in m.shards], ids, m


def test_build_through_refused_cut_and_throttled_connections_equals_one_without(ray_session, s3, proxy, corpus):
    src, ids = corpus
    build(ray_session, source=src, index_root="s3://indexes/faults-clean", s3_endpoint=s3, **KW)
    proxy.set(refuse=0.5, cut=0.2, slow=0.05)
    try:
        s = build(ray_session, source=src, index_root="s3://indexes/faults-proxy", s3_endpoint=proxy.url, **KW)
    finally:
        proxy.set()
    assert s.documents == N
    assert min(proxy.counts[f] for f in ("refused", "cut", "slow")) > 0, proxy.counts
    clean, clean_ids, m0 = published("s3://indexes/faults-clean", s3)
    faulty, faulty_ids, m1 = published("s3://indexes/faults-proxy", s3)
    assert faulty == clean  # byte for byte the same shards
    assert np.array_equal(np.sort(faulty_ids), np.sort(ids))  # every id exactly once
    assert (m1.search.nprobe, m1.search.recall_at_10) == (m0.search.nprobe, m0.search.recall_at_10)


def test_a_corrupt_file_is_named_corrupt_through_faults(ray_session, s3, proxy, tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"id": np.arange(10), "x": np.arange(10.0)}), good)
    raw = good.read_bytes()
    Store("s3://corpus/corrupt", s3).write_bytes("bad.parquet", raw[:-48] + b"\7" * 40 + raw[-8:])
    proxy.set(refuse=0.5, cut=0.2, slow=0.05)
    try:
        with pytest.raises(CorpusError, match=r"^s3://corpus/corrupt/bad.parquet: not a readable Parquet file"):
            build(ray_session, source="s3://corpus/corrupt", index_root="s3://indexes/corrupt",
                  s3_endpoint=proxy.url, **KW)
    finally:
        proxy.set()


def test_storage_that_keeps_failing_is_named_transient(s3, proxy, monkeypatch):
    Store("s3://indexes/down", s3).write_text("x.json", "{}")
    monkeypatch.setenv("SHARDEX_S3_ATTEMPTS", "2")
    proxy.set(refuse=1.0)
    try:
        with pytest.raises(TransientStorageError) as e:
            Store("s3://indexes/down", proxy.url).read_text("x.json")
    finally:
        proxy.set()
        monkeypatch.delenv("SHARDEX_S3_ATTEMPTS")
        Store("s3://indexes/down", s3)  # s3fs's cached filesystem gets its retries back
    msg = str(e.value)
    assert msg.startswith("s3://indexes/down/x.json: ") and msg.endswith(TRANSIENT_FIX) and "\n" not in msg
    assert "not a readable" not in msg and "credentials" not in msg

"""SOURCE and INDEX_ROOT on S3: moto's real HTTP server on 127.0.0.1, spoken to by s3fs unchanged.

The session's Ray may have started before this module set AWS_ENDPOINT_URL, so its workers
may not see the variable: in-process builds and routers pass s3_endpoint explicitly, which
travels to the workers inside the config and the pickled Store. One test leaves it out and
relies on the variable alone, set on the driver only, to prove the driver's endpoint reaches the
workers. The console script is run in a subprocess with the variable in its environment,
as a user would, and starts its own Ray.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shards.search.router import Router
from shards.storage.faissio import index_ids, read_index
from shards.storage.manifest import CURRENT, current_version, load_manifest, vdir
from shards.storage.store import Store

from helpers import build, write_vector_corpus

pytestmark = pytest.mark.s3

SHARDEX = str(Path(sys.executable).with_name("shardex"))
N, D = 3000, 32
KW = dict(vector_column="vector", fields=["title"], factory="IVF16,Flat", shards=2, seed=3)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def s3fs_client(s3):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3}, key="testing", secret="testing",
                             skip_instance_cache=True, use_listings_cache=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, s3fs_client):
    """(local dir, s3:// URI, ids, vectors): one seeded corpus, on disk and uploaded to S3."""
    src = tmp_path_factory.mktemp("s3vec") / "corpus"
    ids, x = write_vector_corpus(str(src), n=N, d=D, files=2, seed=11)
    for name in sorted(os.listdir(src)):
        s3fs_client.put_file(str(src / name), f"corpus/vec/{name}")
    assert len(s3fs_client.ls("corpus/vec")) == 2
    return str(src), "s3://corpus/vec", ids, x


# ---------------------------------------------------------------- helpers

def all_ids(root: str, endpoint: str | None = None) -> np.ndarray:
    """Every id in every shard of the CURRENT version, read straight from storage."""
    store = Store(root, endpoint)
    m = load_manifest(store, current_version(store))
    return np.concatenate([index_ids(read_index(store, f"{vdir(m.version)}/{s.file}")) for s in m.shards])


def assert_exactly_once(root: str, ids: np.ndarray, endpoint: str | None = None) -> None:
    got = all_ids(root, endpoint)
    assert len(got) == len(ids)
    np.testing.assert_array_equal(np.sort(got), np.sort(ids))


def assert_finds_itself(r: Router, ids: np.ndarray, x: np.ndarray, rows) -> None:
    hits = r.search(x[rows], k=5)
    for row, hs in zip(rows, hits):
        assert hs[0].id == ids[row], f"row {row}: top hit {hs[0].id}, expected {ids[row]}"
        assert hs[0].score == pytest.approx(0.0, abs=1e-4)  # l2 to itself
        assert hs[0].fields == {"title": f"doc {ids[row]}"}


def hits_of(r: Router, xq: np.ndarray, k: int = 10):
    return [[(h.id, h.score) for h in hs] for hs in r.search(xq, k=k)]


def shardex(*args, timeout: int = 300, **extra) -> subprocess.CompletedProcess:
    """The real console script, with this module's environment (AWS_ENDPOINT_URL, dummy credentials)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", **extra}
    env.pop("RAY_ADDRESS", None)  # start its own Ray: it must get the endpoint from its own environment
    return subprocess.run([SHARDEX, *args], capture_output=True, text=True, timeout=timeout, env=env)


# ---------------------------------------------------------------- tests

def test_s3_to_s3_build_equals_local_build(ray_session, s3, corpus, tmp_path):
    """s3:// corpus -> s3:// index: published on S3, every doc once, and the same hits as a local build."""
    local_src, s3_src, ids, x = corpus
    root = "s3://indexes/idx"
    s = build(ray_session, source=s3_src, index_root=root, s3_endpoint=s3, **KW)
    assert s.documents == N and s.shards == 2 and s.index_root == root

    store = Store(root, s3)
    assert store.exists(CURRENT) and current_version(store) == s.version
    m = load_manifest(store, s.version)
    assert m.source.uri == s3_src and m.source.documents == N
    assert store.exists(f"{vdir(s.version)}/manifest.json")
    for f in m.files():
        assert store.size(f"{vdir(s.version)}/{f.file}") == f.bytes
    assert sum(sh.ntotal for sh in m.shards) == N
    assert_exactly_once(root, ids, s3)

    local_root = str(tmp_path / "index")
    ls = build(ray_session, source=local_src, index_root=local_root, **KW)
    lm = load_manifest(Store(local_root), ls.version)
    assert lm.trained.sha256 == m.trained.sha256          # same sample, same training
    assert [x.sha256 for x in lm.shards] == [x.sha256 for x in m.shards]
    assert lm.search.nprobe == m.search.nprobe

    xq = x[::151][:20]
    want = hits_of(Router(local_root, backend="local"), xq)
    r_local = Router(root, s3_endpoint=s3, backend="local")
    r_ray = Router(root, s3_endpoint=s3, backend="ray")
    try:
        assert hits_of(r_local, xq) == want
        assert hits_of(r_ray, xq) == want
        assert_finds_itself(r_ray, ids, x, [0, 1, N // 2, N - 1])
    finally:
        r_ray.close()


def test_s3_on_disk_shards_merged_over_list_ranges(ray_session, s3, corpus, tmp_path):
    """On S3, on-disk shards merged by several range tasks (their stretches put and read back through
    S3) answer what an in-RAM local build with the same trained index answers."""
    local_src, s3_src, ids, x = corpus
    root = "s3://indexes/ranges"
    s = build(ray_session, source=s3_src, index_root=root, s3_endpoint=s3, merge_ram_budget="0",
              merge_task_bytes="8K", **KW)
    m = load_manifest(Store(root, s3), s.version)
    assert all(f.ivfdata for f in m.shards) and sum(f.ntotal for f in m.shards) == N
    local_root = str(tmp_path / "index")
    build(ray_session, source=local_src, index_root=local_root, **KW)
    xq, r = x[::151][:20], Router(root, s3_endpoint=s3, backend="local")
    assert hits_of(r, xq) == hits_of(Router(local_root, backend="local"), xq)
    got = np.concatenate([sh.ids() for sh in r.shards])   # the mmapped lists, from the cache
    np.testing.assert_array_equal(np.sort(got), np.sort(ids))


def test_local_source_to_s3_index(ray_session, s3, corpus):
    local_src, _, ids, x = corpus
    root = "s3://indexes/from-local"
    s = build(ray_session, source=local_src, index_root=root, s3_endpoint=s3, **{**KW, "factory": "Flat"})
    assert s.documents == N
    assert_exactly_once(root, ids, s3)
    assert_finds_itself(Router(root, s3_endpoint=s3, backend="local"), ids, x, [0, 7, N - 1])


def test_s3_source_to_local_index(ray_session, s3, corpus, tmp_path):
    _, s3_src, ids, x = corpus
    root = str(tmp_path / "index")
    s = build(ray_session, source=s3_src + "/part-*.parquet", index_root=root, s3_endpoint=s3,
              **{**KW, "factory": "Flat"})
    assert s.documents == N
    assert_exactly_once(root, ids)
    assert_finds_itself(Router(root, backend="local"), ids, x, [0, 7, N - 1])


def test_endpoint_from_the_driver_environment_alone(ray_session, s3, corpus):
    """No s3_endpoint anywhere: AWS_ENDPOINT_URL on the driver must reach the Ray tasks and actors,
    which may have been started before it was set."""
    _, s3_src, ids, x = corpus
    assert os.environ["AWS_ENDPOINT_URL"] == s3
    root = "s3://indexes/env-only"
    s = build(ray_session, source=s3_src, index_root=root, **{**KW, "factory": "Flat", "part_rows": 1500})
    assert s.documents == N
    assert_exactly_once(root, ids)
    r = Router(root, backend="ray")
    try:
        assert_finds_itself(r, ids, x, [3, N - 2])
    finally:
        r.close()


def test_cli_build_and_search_on_s3(s3, corpus, tmp_path):
    """`shardex build s3:// s3://` then `shardex search s3:// --vectors q.npy --json --local`,
    with the endpoint only in AWS_ENDPOINT_URL."""
    _, s3_src, ids, x = corpus
    root = "s3://indexes/cli"
    p = shardex("build", s3_src, root, "--vector-column", "vector", "--fields", "title", "--factory", "Flat",
                "--shards", "2", "--part-rows", "1500", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout)
    assert summary["documents"] == N and summary["shards"] == 2 and summary["index_root"] == root

    rows = [0, 5, N - 1]
    q = tmp_path / "q.npy"
    np.save(q, x[rows])
    p = shardex("search", root, "--vectors", str(q), "--json", "--local", "-k", "3", timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert out["version"] == summary["version"]
    assert len(out["results"]) == len(rows)
    for row, hs in zip(rows, out["results"]):
        assert len(hs) == 3
        assert hs[0]["id"] == int(ids[row]) and hs[0]["score"] == pytest.approx(0.0, abs=1e-4)
        assert hs[0]["fields"] == {"title": f"doc {ids[row]}"}
    assert_exactly_once(root, ids, s3)


@pytest.mark.parametrize("source", ["s3://corpus/nope/", "s3://no-such-bucket/corpus"])
def test_cli_missing_s3_source_is_one_clear_line(s3, source):
    p = shardex("build", source, "s3://indexes/never", "--vector-column", "vector", timeout=120)
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("shardex: error: ")]
    assert len(errors) == 1, p.stderr[-3000:]
    assert source.rstrip("/") in errors[0]
    assert "Traceback" not in p.stderr
    assert all(ln.startswith(("shardex: error: ", "[shardex ")) for ln in lines), p.stderr[-3000:]
    assert p.stdout == ""


def test_cli_search_missing_s3_index_is_one_clear_line(s3, tmp_path):
    q = tmp_path / "q.npy"
    np.save(q, np.zeros((1, D), np.float32))
    p = shardex("search", "s3://indexes/nope", "--vectors", str(q), "--json", "--local", timeout=120)
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("shardex: error: "), p.stderr[-3000:]
    assert "s3://indexes/nope" in lines[0]


def test_cli_unreachable_endpoint_is_one_clear_line(s3):
    """Nothing listens on port 9: the S3 client's connection error, after its retries (2 here, not the
    default 10 over ~28 s), becomes one line naming the source and saying what to do."""
    p = shardex("build", "s3://corpus/vec", "s3://indexes/never", "--vector-column", "vector",
                "--s3-endpoint", "http://127.0.0.1:9", timeout=180, SHARDEX_S3_ATTEMPTS="2")
    assert p.returncode == 1
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("shardex: error: ")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "s3://corpus/vec" in errors[0] and "EndpointConnectionError" in errors[0]
    assert "run the same command again" in errors[0] and "else check its URL" in errors[0]

"""Router replicas (--router-replicas 2): both answer, a hot swap under load switches both with no
failed request, and the old version's app is deleted once neither holds it.

One Serve instance for the module, on the session's Ray; two versions built before it starts.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from shards.storage.manifest import set_current
from shards.storage.store import Store

from helpers import Client, build, clustered, free_port, start_app, under_load, wait_until, write_filterable_corpus

pytestmark = pytest.mark.slow
N, D = 2000, 16


@pytest.fixture(scope="module")
def versions(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routers")
    root = str(tmp / "index")
    out = []
    for seed, off in ((1, 1), (2, 2)):   # ids 3i+1 in v1, 3i+2 in v2: an answer shows which version gave it
        src = str(tmp / f"c{seed}")
        write_filterable_corpus(src, np.arange(N, dtype=np.int64) * 3 + off, clustered(N, D, seed), seed)
        out.append(build(ray_session, source=src, index_root=root, vector_column="vector", factory="IVF16,Flat",
                         shards=2).version)
    set_current(Store(root), out[0])
    return root, out


@pytest.fixture(scope="module")
def app(ray_session, versions):
    from ray import serve

    port = free_port()
    cfg = start_app(versions[0], port=port, poll_seconds=0, router_replicas=2, filter_fields=[])
    yield cfg, Client(f"http://127.0.0.1:{port}")
    serve.shutdown()


def test_both_router_replicas_answer(app, versions):
    cfg, c = app
    # /health answered from one replica: the other may still be loading its first version (a 503)
    r = wait_until(lambda: all(c.get("/version").status_code == 200 for _ in range(6)) and c.get("/version"), 30,
                   what="/version from both router replicas")
    assert r.json()["serving"]["router_replicas"] == 2
    seen = wait_until(lambda: len({c.get("/stats").json()["replica"] for _ in range(12)}) == 2, 30,
                      what="/stats from two router replicas")
    assert seen


def test_swap_under_load_switches_every_router_replica(app, versions):
    from ray import serve

    from shards.serve.versions import app_name

    cfg, c = app
    root, (v1, v2) = versions
    set_current(Store(root), v2)
    body = {"vectors": clustered(2, D, seed=5).tolist(), "k": 5}
    with under_load(c.base, body, threads=4) as out:
        wait_until(lambda: len(out) >= 10, 60, what="answers from v1")
        r = c.post("/admin/reload")
        assert r.status_code == 200 and r.json() == {"version": v2, "previous": v1, "switched": True}
        at = time.time()
        wait_until(lambda: sum(t > at + 1 for t, *_ in list(out)) >= 20, 60, what="20 requests a second after")
    assert all(code == 200 for _, _, code, _ in out), [o for o in out if o[2] != 200][:2]
    for t, _, _, res in out:  # whole, from the version it names, and from v2 once both replicas followed
        ids = np.array([h["id"] for hs in res["results"] for h in hs])
        assert (ids % 3 == (2 if res["version"] == v2 else 1)).all() and res["shards"]["answered"] == 2
        if t > at + 1:
            assert res["version"] == v2
    assert {c.get("/stats").json()["version"] for _ in range(12)} == {v2}
    assert wait_until(lambda: app_name(cfg.name, v1) not in serve.status().applications, 90,
                      what="v1's app deleted once neither router replica holds it")

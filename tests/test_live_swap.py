"""A reindex published while `shardex serve` answers: the router follows CURRENT with no failed request.

The Serve app runs on the session's Ray (started as tests/test_serve.py starts it, polling
CURRENT every 0.5 s). The reindex is `shardex reindex` as a real process with a local Ray of its
own, as in production, where the nightly reindex runs on its own cluster (cluster/kuberay) and
the serving cluster only sees the new CURRENT on shared storage. (It could not share the
serving cluster here anyway: train, tune and baseline each ask for a whole node's CPUs, which a
2-CPU node holding Serve replicas never has free.)

Threads keep querying, with the vectors of a deleted, a new and a changed document, from before
the reindex starts until after the router has swapped; every answer must be whole and come from
the version it names. The reindex keeps the trained index and adds delta segments, so the swap is
in place: the app's own shard replicas load the new version from its new segments, beside the old.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from shards.storage.manifest import current_version
from shards.storage.store import Store

from helpers import Client, build, free_port, mutate, start_app, under_load, wait_until, write_vector_corpus

N, D, K = 3000, 32, 5
SHARDEX = os.path.join(os.path.dirname(sys.executable), "shardex")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def served(out: list, version: str) -> int:
    """How many of under_load's answers came from this version."""
    return sum(code == 200 and r["version"] == version for _, _, code, r in list(out))


def damaged_delta_refused(c: Client, store: Store, good: str) -> bool:
    """A copy of `good` whose first delta segment the manifest gives a wrong sha256: the swap in place
    to it is refused naming the file, and `good` serves on."""
    import json
    import shutil

    from shards.storage.manifest import set_current, vdir

    bad = good + "-bad"
    shutil.copytree(store.path(vdir(good)), store.path(vdir(bad)))
    m = json.loads(store.read_text(f"{vdir(bad)}/manifest.json"))
    d = next(d for sh in m["shards"] for d in sh["deltas"])
    d["sha256"] = ("0" if d["sha256"][0] != "0" else "1") + d["sha256"][1:]
    m["version"] = bad
    store.write_text(f"{vdir(bad)}/manifest.json", json.dumps(m))
    set_current(store, bad)
    try:
        r = c.post("/admin/reload")
        err = r.json().get("error", "")
        ok = r.status_code == 503 and d["file"] in err and f"still serving {good}" in err
        return ok and c.get("/version").json()["version"] == good
    finally:
        set_current(store, good)


def reindex_process(src, root) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    return subprocess.Popen([SHARDEX, "reindex", str(src), str(root)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_reindex_while_serving_swaps_with_no_failed_request(ray_session, tmp_path):
    from ray import serve

    from shards.serve.versions import app_name

    src, root = tmp_path / "corpus", tmp_path / "index"
    ids, x = write_vector_corpus(str(src), n=N, d=D, files=2, seed=1)
    v1 = build(ray_session, source=str(src), index_root=str(root), vector_column="vector", fields=["title"],
               factory="IVF16,Flat", shards=2, part_rows=500).version   # built before Serve holds CPUs
    port = free_port()
    cfg = start_app(str(root), port=port, poll_seconds=0.5, filter_fields=[])
    try:
        base = f"http://127.0.0.1:{port}"
        m = mutate(src)  # 100 deleted, 100 changed, 100 new
        gone, new, changed = int(m["gone"][0]), int(m["new"][0]), int(m["changed"][0])
        xq = np.stack([x[np.searchsorted(ids, gone)], m["new_x"][0], m["changed_x"][0]])
        body = {"vectors": xq.tolist(), "k": K, "nprobe": 16}          # every list: exact answers

        # paced, so the reindex gets CPU time too
        with under_load(base, body, threads=3, pause=0.02) as out:
            wait_until(lambda: served(out, v1) >= 10, 60, what="10 answers from v1 before the reindex")
            p = reindex_process(src, root)
            try:
                log, _ = p.communicate(timeout=240)
            finally:
                if p.poll() is None:
                    os.killpg(p.pid, 9)
                    p.wait()
            assert p.returncode == 0, log[-4000:]
            v2 = current_version(Store(str(root)))
            assert v2 != v1 and f"reindex      from {v1}: 100 new, 100 changed, 100 deleted" in log, log[-2000:]
            wait_until(lambda: Client(base).get("/version").json()["version"] == v2, 30,
                       what="the router to follow CURRENT")
            wait_until(lambda: served(out, v2) >= 10, 60, what="10 answers from v2")
        stats = Client(base).get("/stats").json()
        serving = Client(base).get("/version").json()["serving"]
        apps = [a for a in serve.status().applications if a.startswith(cfg.name + "--")]
        refused = damaged_delta_refused(Client(base), Store(str(root)), v2)
    finally:
        serve.shutdown()

    # in place: v1's app serves v2, its replicas read the deltas and dead sets, the bases they held stay
    assert apps == [app_name(cfg.name, v1)] and serving["app"] == app_name(cfg.name, v1)
    assert stats["swaps_in_place"] == 1 and stats["last_load"]["in_place"] and stats["last_load"]["version"] == v2
    assert stats["last_load"]["segments_reused"] == 2, stats["last_load"]   # one base per shard, not read again
    assert refused

    failed = [(code, res) for _, _, code, res in out if code != 200]
    assert not failed, failed[:3]
    versions = [res["version"] for _, _, _, res in out]
    assert set(versions) == {v1, v2}, {v: versions.count(v) for v in set(versions)}
    assert stats["swaps"] == 1
    first_new = min(got for _, got, _, res in out if res["version"] == v2)
    for sent, _, _, res in out:
        assert res["shards"]["answered"] == 2 and len(res["results"]) == 3
        if sent > first_new:  # the swap is one reference: once a request saw v2, later ones do too
            assert res["version"] == v2
        ids_of = [[h["id"] for h in hs] for hs in res["results"]]
        titles = [[h["fields"]["title"] for h in hs] for hs in res["results"]]
        if res["version"] == v1:  # the deleted document is there; nothing new or changed yet
            assert ids_of[0][0] == gone
            assert not any(t.startswith(("new", "changed")) for row in titles for t in row)
        else:  # the reindex's result: the deleted id is gone, the new and changed ones found as they are now
            assert gone not in {i for row in ids_of for i in row}
            assert ids_of[1][0] == new and titles[1][0] == f"new {new}"
            assert ids_of[2][0] == changed and titles[2][0] == f"changed {changed}"
    n1 = versions.count(v1)
    assert n1 >= 10 and len(versions) - n1 >= 10, (n1, len(versions) - n1)

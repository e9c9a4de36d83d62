"""A node lost while serving, for real: a ray.cluster_utils.Cluster (a head without CPUs and three
1-CPU workers), `shardex serve --replicas 2` joined to it, queries sent throughout, and the worker
holding a replica of a shard (not the router's) removed. Every request is answered whole by the
other replica, the replicas of each shard sit on different nodes before and after, and the lost
replica comes back on a node that has none of its shard.

Where the replicas are is read by a separate process joined to the cluster (this one runs the
session's local Ray): the actor table names each replica's node.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import Client, build, clustered, free_port, under_load, wait_until, write_vector_corpus

pytestmark = pytest.mark.slow

SHARDEX = str(Path(sys.executable).with_name("shardex"))
N, D = 3000, 16
PLACED = """
import json, sys, ray, ray._private.state as st
ray.init(address=sys.argv[1], logging_level="error")
print(json.dumps([{"name": a["Name"], "node": a["Address"]["NodeID"]} for a in st.actors().values()
                  if a["State"] == "ALIVE" and a["Name"].startswith("SERVE_REPLICA::")]))
"""


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(3):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


def env() -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}


def placed(c) -> dict[str, list[str]]:
    """{deployment: [node id of each live replica]}, e.g. {"router": [...], "shard-0": [a, b]}."""
    out = subprocess.run([sys.executable, "-c", PLACED, c.address], env=env(), capture_output=True, text=True,
                         timeout=60, check=True).stdout
    by: dict[str, list[str]] = {}
    for a in json.loads(out.strip().splitlines()[-1]):
        by.setdefault(a["name"].split("::", 1)[1].split("#")[1], []).append(a["node"])
    return by


def test_a_node_lost_while_serving_loses_no_request(ray_session, cluster, tmp_path):
    src, root = tmp_path / "corpus", tmp_path / "index"
    ids, x = write_vector_corpus(str(src), n=N, d=D, files=2, seed=4)
    build(ray_session, source=str(src), index_root=str(root), vector_column="vector", factory="IVF16,Flat",
          shards=2)
    port = free_port()
    serve = subprocess.Popen([SHARDEX, "serve", str(root), "--address", cluster.address, "--port", str(port),
                              "--replicas", "2", "--poll-seconds", "0", "--shard-timeout", "10",
                              "--proxy-location", "HeadOnly"],   # one proxy: these nodes share one machine's ports
                             env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    c = Client(f"http://127.0.0.1:{port}")
    try:
        def up():
            assert serve.poll() is None, serve.stderr.read()[-3000:]
            try:
                return c.get("/health", headers={}).status_code == 200
            except Exception:  # noqa: BLE001 (not listening yet)
                return False

        wait_until(up, 240, 1.0, what="shardex serve healthy on the cluster")
        before = placed(cluster)
        for s in ("shard-0", "shard-1"):
            assert len(before[s]) == 2 and len(set(before[s])) == 2, before   # replicas apart
        router = set(before["router"])
        victim = next(n for n in before["shard-0"] if n not in router)
        node = next(n for n in cluster.worker_nodes if n.node_id == victim)
        body = {"vectors": clustered(4, D, seed=9).tolist(), "k": 10}
        with under_load(c.base, body, threads=3) as got:
            wait_until(lambda: len(got) >= 20, 60, what="answers before the node is removed")
            cluster.remove_node(node, allow_graceful=False)   # as if the machine died
            n_at = len(got)
            wait_until(lambda: len(got) >= n_at + 60, 120, what="answers after the node is removed")
        bad = [(st, js) for _, _, st, js in got if st != 200 or js["shards"]["answered"] != js["shards"]["queried"]]
        assert not bad, (len(bad), len(got), bad[:3])
        assert all(js["shards"]["missing"] == [] for *_, js in got)

        def back():
            now = placed(cluster)
            return all(len(now.get(s, [])) == 2 and len(set(now[s])) == 2 and victim not in now[s]
                       for s in ("shard-0", "shard-1"))

        wait_until(back, 180, 2.0, what=lambda: f"replicas back on distinct live nodes: {placed(cluster)}")
        r = c.search(**body)
        assert r["shards"]["answered"] == r["shards"]["queried"] == 2
        assert np.isin([h["id"] for hs in r["results"] for h in hs], ids).all()
    finally:
        serve.terminate()
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()
        time.sleep(1)

"""cluster/kuberay/rayservice.yaml's serveConfigV2, applied to a real `ray start --head` the way
the KubeRay operator applies it: a PUT of the config as JSON to the dashboard's
/api/serve/applications/. Only what cannot hold on a 2-CPU test machine is changed: the
index_root, the HTTP port, and the CPUs each shard replica reserves.

The app it builds is shardex's router; it loads CURRENT and answers. KubeRay re-sends the same
config after an operator restart: that must leave the version app the router deployed alone.
Bad args fail that app's deploy with the key named, in the status KubeRay shows.
"""
from __future__ import annotations

import json

import pytest
import requests
import yaml

from helpers import build, free_port, rayservice, wait_until, write_vector_corpus

pytestmark = pytest.mark.slow


def put(address: str, config: dict) -> None:
    r = requests.put(f"{address}/api/serve/applications/", data=json.dumps(config),
                     headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text


def apps(address: str) -> dict:
    r = requests.get(f"{address}/api/serve/applications/", timeout=30)
    r.raise_for_status()
    return r.json().get("applications") or {}


def wait_status(address: str, want: dict, timeout: float = 180) -> dict:
    """Wait until each named app has the wanted status; the apps' details."""
    def reached():
        got = apps(address)
        return got if all(got.get(a, {}).get("status") == s for a, s in want.items()) else None

    return wait_until(reached, timeout, 0.5,
                      what=lambda: f"{want} (now { {a: d.get('status') for a, d in apps(address).items()} })")


@pytest.fixture
def head(ray_head):
    """The session's head with no Serve on it before and after (Serve keeps its first http_options)."""
    requests.delete(f"{ray_head['address']}/api/serve/applications/", timeout=120).raise_for_status()
    yield ray_head
    requests.delete(f"{ray_head['address']}/api/serve/applications/", timeout=120).raise_for_status()


def test_rayservice_config_serves_and_survives_a_reapply(ray_session, head, tmp_path):
    src, root = tmp_path / "corpus", tmp_path / "index"
    _, x = write_vector_corpus(str(src), n=2000, d=16, files=2, seed=6)
    v = build(ray_session, source=str(src), index_root=str(root), vector_column="vector", fields=["title"],
              factory="IVF16,Flat", shards=2, part_rows=500).version

    config = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    port = free_port()
    config["http_options"] = {**config["http_options"], "host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    app["args"].update(index_root=str(root), shard_cpus=0.05, threads=1, router_cpus=0.05)  # a 2-CPU head
    name, address, base = app["name"], head["address"], f"http://127.0.0.1:{port}"

    put(address, config)
    got = wait_status(address, {name: "RUNNING", f"{name}--{v}": "RUNNING"})
    assert set(got) == {name, f"{name}--{v}"}
    # RUNNING is Serve's view; /health is the router's own (first pings of fresh replicas can be slow
    # on a loaded machine), which a readiness probe waits on the same way
    h = wait_until(lambda: (r := requests.get(base + "/health", timeout=30)).status_code == 200 and r, 60,
                   what="/health")
    assert h.json()["version"] == v
    r = requests.post(base + "/search", json={"vectors": x[:2].tolist(), "k": 3}, timeout=30).json()
    assert r["version"] == v and r["results"][0][0]["id"] == 1 and r["results"][0][0]["fields"] == {"title": "doc 1"}
    served = requests.get(base + "/version", timeout=30).json()["serving"]
    assert served["replicas"] == app["args"]["replicas"] and served["app"] == f"{name}--{v}"

    # KubeRay re-sends the config (operator restart), here with a second app whose args are wrong
    bad = {**app, "name": "broken", "route_prefix": "/broken", "args": {**app["args"], "poll_secs": 1}}
    put(address, {**config, "applications": [app, bad]})
    got = wait_status(address, {"broken": "DEPLOY_FAILED"})
    assert "poll_secs: unknown option" in got["broken"]["message"]
    assert got[name]["status"] == "RUNNING" and got[f"{name}--{v}"]["status"] == "RUNNING"
    again = requests.get(base + "/version", timeout=30).json()["serving"]
    assert again["loaded_at"] == served["loaded_at"]                 # the same load: nothing was redeployed
    assert requests.get(base + "/stats", timeout=30).json()["swaps"] == 0
    assert requests.post(base + "/search", json={"vectors": x[:1].tolist(), "k": 1}, timeout=30).json()["version"] == v

    put(address, config)                                              # dropped from the config: deleted
    wait_status(address, {"broken": None, name: "RUNNING"}, timeout=60)

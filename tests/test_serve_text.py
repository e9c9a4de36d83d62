"""Text queries over HTTP: encoded by the version's own encoder (a deployment of the version app),
batched across concurrent requests, and answered as the Python API answers them."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import requests

from index_builder.demo.textcorpus import example_queries, write_corpus

from helpers import build, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def text_app(ray_session, tmp_path_factory):
    from ray import serve

    from shards.config import ServeConfig
    from shards.serve import lifecycle as sv

    tmp = tmp_path_factory.mktemp("text-serve")
    src, root = str(tmp / "corpus"), str(tmp / "index")
    write_corpus(src, limit=300, files=2)
    build(ray_session, source=src, index_root=root, fields=["title", "text"], shards=2, part_rows=150)
    port = free_port()
    cfg = ServeConfig(index_root=root, port=port, poll_seconds=0, shard_cpus=0.05, threads=1, batch_wait_ms=20)
    version = sv.wait_ready(sv.start(cfg), 180)
    yield {"root": root, "base": f"http://127.0.0.1:{port}", "cfg": cfg, "version": version}
    serve.shutdown()


def test_text_queries_answer_like_the_python_api(text_app):
    from shards.search.router import Router

    qs = example_queries()
    r = requests.post(text_app["base"] + "/search", json={"queries": qs, "k": 5}, timeout=120)
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["version"] == text_app["version"] and len(res["results"]) == len(qs)
    local = Router(text_app["root"], backend="local")
    want = local.search(qs, k=5)
    for got, exp in zip(res["results"], want):
        assert [h["id"] for h in got] == [h.id for h in exp]
        np.testing.assert_allclose([h["score"] for h in got], [h.score for h in exp], rtol=1e-4, atol=1e-4)
        assert set(got[0]["fields"]) == {"title", "text"}
    local.close()


def test_concurrent_text_requests_share_encoder_batches(text_app):
    from ray import serve

    from shards.serve.versions import app_name

    enc = serve.get_deployment_handle("encoder", app_name(text_app["cfg"].name, text_app["version"]))
    before = enc.ping.remote().result()
    codes = []

    def one(q):
        codes.append(requests.post(text_app["base"] + "/search", json={"queries": [q], "k": 3}, timeout=120)
                     .status_code)

    qs = [f"read a file line by line {i}" for i in range(12)]
    ts = [threading.Thread(target=one, args=(q,)) for q in qs]
    [t.start() for t in ts]
    [t.join() for t in ts]
    after = enc.ping.remote().result()
    assert codes == [200] * len(qs)
    assert after["requests"] - before["requests"] == len(qs)
    assert after["batches"] - before["batches"] < len(qs)

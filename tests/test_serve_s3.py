"""The Serve app over an index root on S3 (moto's server): shards, refine stores, filters and stored fields
are read through s3fs by the replicas, which get the endpoint from the process that started serving."""
from __future__ import annotations

import numpy as np
import pytest
import requests

from helpers import as_arrays, build, free_port, write_filterable_corpus

pytestmark = pytest.mark.s3


def test_serving_an_s3_index_equals_the_local_python_api(ray_session, s3, tmp_path):
    from ray import serve

    from shards.config import ServeConfig
    from shards.search.router import Router
    from shards.serve import lifecycle as sv

    n, d = 2000, 16
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64) * 5
    write_filterable_corpus(str(tmp_path / "c"), ids, x, seed=4)
    kw = dict(source=str(tmp_path / "c"), vector_column="vector", fields=["title", "year", "cat"],
              factory="IVF16,PQ4", refine="fp32", shards=2, metric="l2")
    build(ray_session, index_root="s3://indexes/served", **kw)
    build(ray_session, index_root=str(tmp_path / "local"), **kw)
    port = free_port()
    cfg = ServeConfig(index_root="s3://indexes/served", port=port, poll_seconds=0, shard_cpus=0.05, threads=1,
                      filter_fields=["year", "cat"])
    assert sv.settings(cfg)["s3_endpoint"] == s3
    try:
        sv.wait_ready(sv.start(cfg), 120)
        flt = {"cat": {"in": ["a", "b"]}, "year": {"gte": 2000}}
        r = requests.post(f"http://127.0.0.1:{port}/search", timeout=60,
                          json={"vectors": x[:5].tolist(), "k": 5, "nprobe": 16, "filter": flt, "refine": 1000})
        assert r.status_code == 200, r.text
        res = r.json()
        local = Router(str(tmp_path / "local"), backend="local", filter_fields=["year", "cat"])
        # every candidate reranked from the refine store: exact distances, whatever codes either build trained
        D, I = local.search_vectors(x[:5], 5, nprobe=16, filter=flt, refine=1000)
        D1, I1 = as_arrays(res, 5)
        np.testing.assert_array_equal(I1, I)
        np.testing.assert_allclose(D1, D, rtol=1e-5)
        hit = res["results"][0][0]
        assert hit["fields"]["cat"] in ("a", "b") and hit["fields"]["year"] >= 2000
        assert hit["fields"]["title"] == f"doc {hit['id']}"
    finally:
        serve.shutdown()

"""The Ray Serve app over HTTP: exact merge, filters, bad requests, auth, a killed shard, hot swap.

One Serve instance for the module, on a free port of 127.0.0.1, on the session's Ray.
The tests run in file order and share the app; the ones that change what it serves
(a killed replica, a swap) come last, and each leaves the app healthy.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest

from shards.storage.faissio import read_index
from shards.storage.manifest import current_version, set_current, vdir
from shards.storage.store import Store

from helpers import (
    AUTH,
    FILTERABLE,
    TOKEN,
    Client,
    as_arrays,
    assert_same_topk,
    build,
    clustered,
    free_port,
    monolithic,
    scrape,
    start_app,
    under_load,
    wait_until,
    write_filterable_corpus,
)

pytestmark = pytest.mark.slow
N, D = 3000, 32


def build_version(ray_session, root: str, src: str, ids: np.ndarray, x: np.ndarray, seed: int) -> dict:
    attrs = write_filterable_corpus(src, ids, x, seed)
    s = build(ray_session, source=src, index_root=root, vector_column="vector", fields=["title", *FILTERABLE],
              factory="IVF32,Flat", shards=2, metric="ip")
    return {"root": root, "version": s.version, "ids": ids, "x": x, "attrs": attrs, "nprobe": s.nprobe}


@pytest.fixture(scope="module")
def index(ray_session, tmp_path_factory):
    """Three versions, built before Serve starts; CURRENT moves back to v1 to be served.

    They are built first because a build's train stage reserves every CPU of the node,
    which it cannot get while Serve's replicas hold fractions of them (on a 2-CPU test
    cluster). The tests publish v2 and v3 later by moving CURRENT, as a build does last.
    """
    tmp = tmp_path_factory.mktemp("serve")
    root = str(tmp / "index")
    ids = np.arange(N, dtype=np.int64) * 3
    v1 = build_version(ray_session, root, str(tmp / "c1"), ids + 1, clustered(N, D, seed=3), 1)
    v2 = build_version(ray_session, root, str(tmp / "c2"), ids + 2, clustered(N, D, seed=11), 2)
    v3 = build_version(ray_session, root, str(tmp / "c3"), ids[:1000], clustered(1000, D, seed=12), 3)
    set_current(Store(root), v1["version"])
    ivf_root = str(tmp / "ivf-index")
    attrs = write_filterable_corpus(str(tmp / "c1"), ids + 1, v1["x"], 1)
    s = build(ray_session, source=str(tmp / "c1"), index_root=ivf_root, vector_column="vector", fields=["title"],
              factory="IVF32,Flat", shards=4, sharding="ivf", metric="ip", route="all")
    ivf = {"root": ivf_root, "version": s.version, "ids": ids + 1, "x": v1["x"], "attrs": attrs, "nprobe": s.nprobe}
    return {"root": root, "tmp": tmp, "v1": v1, "v2": v2, "v3": v3, "ivf": ivf}


@pytest.fixture(scope="module")
def app(ray_session, index):
    from ray import serve

    port = free_port()
    cfg = start_app(index["root"], port=port, poll_seconds=0)
    yield {"cfg": cfg, "client": Client(f"http://127.0.0.1:{port}"), "port": port}
    serve.shutdown()


def monolithic_of(v: dict, nprobe: int):
    """One index over all of version v's vectors (helpers.monolithic), at this nprobe."""
    return monolithic(v["root"], v["ids"], v["x"], v["version"], nprobe)


# ---- answers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k,nprobe", [(10, None), (5, 1), (1000, 32)])
def test_search_equals_monolithic(app, index, k, nprobe):
    v = index["v1"]
    xq = v["x"][::151][:20]
    res = app["client"].search(vectors=xq.tolist(), k=k, **({"nprobe": nprobe} if nprobe else {}))
    assert res["version"] == v["version"]
    assert res["shards"] == {"queried": 2, "answered": 2, "missing": [], "touched": [2] * len(xq)}
    D1, I1 = as_arrays(res, k)
    D2, I2 = monolithic_of(v, nprobe or v["nprobe"]).search(xq, k)
    assert_same_topk(D1, I1, D2, I2)
    assert (np.diff(D1, axis=1) <= 1e-6).all()  # inner product: best (largest) first


def test_fields_are_attached(app, index):
    v = index["v1"]
    res = app["client"].search(vectors=v["x"][:3].tolist(), k=4)
    pos = {int(i): j for j, i in enumerate(v["ids"])}
    for hs in res["results"]:
        for h in hs:
            j = pos[h["id"]]
            assert h["fields"] == {"title": f"doc {h['id']}", "year": int(v["attrs"]["year"][j]),
                                   "cat": str(v["attrs"]["cat"][j]), "price": float(v["attrs"]["price"][j])}
    only = app["client"].search(vectors=v["x"][:1].tolist(), k=2, fields=["cat"])
    assert set(only["results"][0][0]["fields"]) == {"cat"}
    none = app["client"].search(vectors=v["x"][:1].tolist(), k=2, fields=[])
    assert none["results"][0][0]["fields"] == {}


FILTERS = [
    {"cat": "b"},
    {"cat": {"in": ["a", "d"]}, "year": {"gte": 2000, "lt": 2010}},
    {"price": {"gt": 10.5, "lte": 11.5}},          # about 30 documents: fewer than k for some shards
    {"year": 1995, "cat": {"in": ["c"]}},
    {"cat": "zzz"},                                 # a value no document has: no results
]


@pytest.mark.parametrize("flt", FILTERS, ids=[json.dumps(f) for f in FILTERS])
def test_filter_equals_brute_force(app, index, flt):
    """Every list probed (nprobe = nlist): the filtered IVF-Flat answer is exact, so it must equal
    brute force over the matching documents; at the default nprobe every hit still matches and
    k hits come back whenever k documents match."""
    v, k = index["v1"], 20
    xq = v["x"][::300][:8]
    a = v["attrs"]
    match = np.ones(N, bool)
    for f, c in flt.items():
        col = np.asarray(a[f])
        if isinstance(c, dict):
            if "in" in c:
                match &= np.isin(col, c["in"])
            for op, fn in (("gt", np.greater), ("gte", np.greater_equal), ("lt", np.less), ("lte", np.less_equal)):
                if op in c:
                    match &= fn(col, c[op])
        else:
            match &= col == c
    xs, ids = v["x"][match], v["ids"][match]
    S = xq @ xs.T
    order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    exact = app["client"].search(vectors=xq.tolist(), k=k, nprobe=32, filter=flt)
    D1, I1 = as_arrays(exact, k)
    want = min(k, int(match.sum()))
    if want:
        assert_same_topk(D1[:, :want], I1[:, :want], np.take_along_axis(S, order, 1)[:, :want].astype(np.float32),
                         ids[order][:, :want])
    assert (I1[:, want:] == -1).all()
    fast = app["client"].search(vectors=xq.tolist(), k=k, filter=flt)
    _, I2 = as_arrays(fast, k)
    assert ((I2 >= 0).sum(1) == want).all()
    assert np.isin(I2[I2 >= 0], ids).all()


def test_concurrent_requests_share_fanouts(app, index):
    """Concurrent single-query requests are batched: fewer fan-outs than requests."""
    c = app["client"]
    before = c.get("/stats").json()
    xq = index["v1"]["x"][:32]
    errors = []

    def one(q):
        r = Client(c.base).post("/search", {"vectors": [q.tolist()], "k": 5})
        if r.status_code != 200:
            errors.append(r.text)

    ts = [threading.Thread(target=one, args=(q,)) for q in xq]
    [t.start() for t in ts]
    [t.join() for t in ts]
    after = c.get("/stats").json()
    assert not errors
    assert after["requests"] - before["requests"] == len(xq)
    assert after["fanouts"] - before["fanouts"] < len(xq)


def test_metrics_are_exported_and_charted(app, index):
    """Searches show in the Prometheus metrics Ray's agent exports (ray_shardex_*), and every series
    the Grafana dashboard in cluster/ charts is one of them."""
    import re

    c, name = app["client"], app["cfg"].name
    xq = index["v1"]["x"][:3]
    for q in xq:
        c.search(vectors=[q.tolist()], k=5)
    assert c.post("/search", {"vectors": [[0.0] * 3], "k": 5}).status_code == 422  # wrong dimension

    def count(metric, **labels):
        want = {("app", name), *labels.items()}
        return sum(v for (n, ls), v in seen.items() if n == metric and want <= set(ls))

    seen = {}

    def exported():
        seen.clear()
        seen.update(scrape())
        return (count("ray_shardex_requests_total", code="200") >= 3 and count("ray_shardex_requests_total",
                code="422") >= 1 and count("ray_shardex_version_served", version=index["v1"]["version"]) == 1)

    wait_until(exported, 60, 1.0, what=lambda: f"metrics exported: {sorted(seen)}")
    assert count("ray_shardex_queries_total") >= 3
    assert count("ray_shardex_shards_total", outcome="queried") >= 2 * 3   # two shards a query
    assert count("ray_shardex_shards_total", outcome="answered") == count("ray_shardex_shards_total",
                                                                          outcome="queried")
    assert count("ray_shardex_request_seconds_count") >= 4
    dash = json.load(open(os.path.join(os.path.dirname(__file__), "..", "cluster", "grafana", "shardex.json")))
    charted = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"ray_shardex_\w+", t["expr"])}
    names = {n for n, _ in seen} | {"ray_shardex_swaps_total", "ray_shardex_partial_total"}  # none yet: no swap
    assert charted and charted <= names, charted - names


def test_health_version_openapi(app, index):
    c = app["client"]
    h = c.get("/health", headers={})
    assert h.status_code == 200 and h.json()["missing"] == [] and h.json()["version"] == index["v1"]["version"]
    v = c.get("/version").json()
    assert v["version"] == index["v1"]["version"] and v["sharding"]["shards"] == 2
    assert v["serving"]["filter_fields"] == {"year": "int", "cat": "str", "price": "float"}
    spec = c.get("/openapi.json", headers={}).json()
    assert {"/search", "/health", "/version", "/admin/reload"} <= set(spec["paths"])


def test_ivf_routing_reports_shards_touched_and_stays_exact(app, index):
    """An IVF-sharded index behind its own router (/ivf): each query goes only to the shards owning
    its probed lists, the response says how many, and the answer equals the monolithic index's."""
    v = index["ivf"]
    start_app(v["root"], port=app["port"], name="ivf", route_prefix="/ivf", filter_fields=[])
    c = Client(app["client"].base + "/ivf")
    assert c.get("/version").json()["serving"]["routing"] == "ivf"
    assert c.get("/version", headers={}).status_code == 401            # under a route prefix too
    assert c.post("/search", {"k": 0}, headers={}).status_code == 401
    xq = v["x"][::151][:20]
    for nprobe in (1, 4, 32):
        res = c.search(vectors=xq.tolist(), k=10, nprobe=nprobe)
        D2, I2 = monolithic_of(v, nprobe).search(xq, 10)
        assert_same_topk(*as_arrays(res, 10), D2, I2)
        touched = res["shards"]["touched"]
        assert all(1 <= t <= 4 for t in touched)
        if nprobe == 1:
            assert max(touched) < 4 and res["shards"]["queried"] <= 4


# ---- bad requests ---------------------------------------------------------------------------------

V = [0.1] * D
BAD = [
    ({"vectors": [[0.1] * 16]}, 422, "vectors"),
    ({"vectors": [V, V[:-1]]}, 422, "vectors"),
    ({"vectors": [V], "k": 0}, 422, "k"),
    ({"vectors": [V], "k": 1001}, 422, "k"),
    ({"vectors": []}, 422, "vectors"),
    ({"queries": []}, 422, "queries"),
    ({}, 422, "queries"),
    ({"vectors": [V], "queries": ["x"]}, 422, "queries"),
    ({"queries": ["text on a vector index"]}, 422, "queries"),
    ({"vectors": [V] * 65}, 413, "vectors"),
    ({"vectors": [V], "filter": {"colour": "red"}}, 422, "filter.colour"),
    ({"vectors": [V], "filter": {"cat": {"gte": 3}}}, 422, "filter.cat"),
    ({"vectors": [V], "filter": {"year": "1999"}}, 422, "filter.year.eq"),
    ({"vectors": [V], "filter": {"year": {"between": [1, 2]}}}, 422, "filter.year"),
    ({"vectors": [V], "filter": {"title": "doc 1"}}, 422, "filter.title"),
    ({"vectors": [V], "fields": ["nope"]}, 422, "fields"),
    ({"vectors": [V], "nprobe": 0}, 422, "nprobe"),
    ({"vectors": [V], "refine": -1}, 422, "refine"),
    ({"vectors": [V], "refine": 4}, 422, "refine"),            # this version keeps no refine store
    ({"vectors": [V], "k": 1000, "refine": 101}, 422, "refine"),  # 101,000 candidates a query
    ({"vectors": [V], "colour": "red"}, 422, "colour"),
    ({"vectors": [["a"] * D]}, 422, "vectors.0.0"),
]


@pytest.mark.parametrize("body,status,field", BAD, ids=[f"{f}-{i}" for i, (_, _, f) in enumerate(BAD)])
def test_bad_request_names_the_field(app, body, status, field):
    r = app["client"].post("/search", body)
    assert r.status_code == status, r.text
    e = r.json()
    assert e["field"] == field and e["error"].startswith(field), e


def test_malformed_json_and_auth(app):
    c = app["client"]
    r = c.s.post(c.base + "/search", data=b'{"vectors": [[0.1,', headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body"
    for headers in ({}, {"Authorization": "Bearer wrong-token-123"}, {"Authorization": f"Basic {TOKEN}"}):
        for path in ("/search", "/version", "/admin/reload"):
            r = c.post(path, {"vectors": [V]}, headers=headers) if path != "/version" else c.get(path, headers)
            assert r.status_code in (401, 403) and r.json()["field"] == "authorization", (path, headers, r.text)


@pytest.mark.parametrize("raw", [b'{"vectors": [[0.1,', b'{"colour": "red"}', b'{"vectors": [[0.1]], "k": 0}', b"k=5"])
def test_the_token_is_checked_before_the_body(app, raw):
    """Without the token, any body gets 401 (a stranger learns nothing of the API); with it, the same
    body gets the 4xx naming what is wrong with it."""
    c = app["client"]
    r = c.s.post(c.base + "/search", data=raw, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 401 and r.json()["field"] == "authorization", r.text
    r = c.s.post(c.base + "/search", data=raw, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code in (400, 422) and r.json()["field"] != "authorization", r.text


def test_a_json_body_is_read_whatever_its_content_type(app, index):
    """`curl -d` sends application/x-www-form-urlencoded; the body is JSON all the same."""
    c = app["client"]
    body = json.dumps({"vectors": index["v1"]["x"][:1].tolist(), "k": 3})
    for ctype in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {**AUTH, **({"Content-Type": ctype} if ctype else {})}
        r = c.s.post(c.base + "/search", data=body, headers=headers, timeout=60)
        assert r.status_code == 200 and len(r.json()["results"][0]) == 3, (ctype, r.text)


def test_docs_page_is_offline_and_lists_every_route(app):
    import re

    c = app["client"]
    r = c.get("/docs", headers={})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not re.search(r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", r.text), "the page fetches from elsewhere"
    assert "<script" not in r.text.lower()
    spec = c.get("/openapi.json", headers={}).json()
    for path, ops in spec["paths"].items():
        for method in ops:
            assert f"id='{method}-{path}'" in r.text, (method, path)
    assert "SearchRequest" in r.text and "nprobe" in r.text
    assert c.get("/redoc", headers={}).status_code == 404       # FastAPI's CDN pages are off


def test_openapi_fuzz_finds_no_5xx(app):
    """schemathesis generates valid and invalid requests from /openapi.json; none may get a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    base = app["client"].base
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    seen = []
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path == "/admin/reload":
            continue  # an authorised reload re-reads CURRENT; its refusals are covered above
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                r = case.call(base_url=base, headers=AUTH, timeout=60)
                seen.append(r.status_code)
                assert r.status_code < 500, (case.path, case.body, r.text[:300])

            try:
                check()
            except Unsatisfiable:
                assert mode == GenerationMode.NEGATIVE  # nothing to get wrong in GET /health
    assert len(seen) >= 50 and any(s == 200 for s in seen) and any(400 <= s < 500 for s in seen)


# ---- a killed shard replica ---------------------------------------------------------------------


def replica_of(cfg, version: str, shard: str) -> str:
    from ray import serve

    from shards.serve.versions import app_name

    return serve.get_deployment_handle(shard, app_name(cfg.name, version)).ping.remote().result()["replica"]


def answered(out: list, shards: int, after: float = 0.0, version: str | None = None) -> bool:
    """Whether under_load's `out` holds an answer from `shards` shards (of `version`), sent after `after`."""
    return any(code == 200 and r["shards"]["answered"] == shards and t > after and version in (None, r["version"])
               for t, _, code, r in list(out))


def test_killed_shard_replica_is_reported_never_silent(app, index):
    import ray

    c, v = app["client"], index["v1"]
    xq = v["x"][::97][:4]
    body = {"vectors": xq.tolist(), "k": 10}
    actor = ray.get_actor(replica_of(app["cfg"], v["version"], "shard-1"), namespace="serve")
    with under_load(c.base, body, threads=3) as out:
        # each phase ends on what it is there to see, not after a time: a request to the killed
        # replica may take the whole 1.5 s shard timeout before it comes back partial
        wait_until(lambda: answered(out, 2), 60, what="a whole answer before the kill")
        ray.kill(actor, no_restart=True)
        down = wait_until(lambda: (h := c.get("/health", {})).status_code == 503 and h.json(), 20,
                          what="/health to report")
        assert down["missing"] == ["shard-1"] and down["field"] == "shards"
        wait_until(lambda: answered(out, 1), 60, what="a partial answer while shard-1 is down")
        wait_until(lambda: c.get("/health", {}).status_code == 200, 90, what="Serve to replace the replica")
        healed = time.time()
        wait_until(lambda: answered(out, 2, after=healed), 60, what="a whole answer from the new replica")

    assert all(code == 200 for _, _, code, _ in out), [r for r in out if r[2] != 200][:2]
    full = [r for _, _, _, r in out if r["shards"]["answered"] == 2]
    part = [r for _, _, _, r in out if r["shards"]["answered"] < 2]
    assert full and part, (len(full), len(part))
    D2, I2 = monolithic_of(v, v["nprobe"]).search(xq, 10)
    for r in full:
        assert_same_topk(*as_arrays(r, 10), D2, I2)
    store = Store(index["root"])
    s0 = read_index(store, f"{vdir(v['version'])}/shard-0.index")
    s0.nprobe = v["nprobe"]
    D0, I0 = s0.search(xq, 10)
    for r in part:  # exactly shard 0's answer, and it says so
        assert r["shards"] == {"queried": 2, "answered": 1, "missing": ["shard-1"], "touched": [2] * 4}
        assert_same_topk(*as_arrays(r, 10), D0, I0)


# ---- hot swap -------------------------------------------------------------------------------------


def test_hot_swap_under_load_loses_no_request(app, index):
    from ray import serve

    from shards.serve.versions import app_name

    c, v2 = app["client"], index["v2"]
    old = c.get("/version").json()["version"]
    set_current(Store(index["root"]), v2["version"])  # what a build's publish does last
    assert c.get("/version").json()["version"] == old  # poll_seconds=0: only a reload swaps

    body = {"vectors": v2["x"][:2].tolist(), "k": 5}
    with under_load(c.base, body, threads=4) as out:
        wait_until(lambda: answered(out, 2, version=old), 60, what="answers from the old version after CURRENT moved")
        r = c.post("/admin/reload")
        switched_at = time.time()
        assert r.status_code == 200 and r.json() == {"version": v2["version"], "previous": old, "switched": True}
        wait_until(lambda: sum(t > switched_at for t, *_ in list(out)) >= 8, 60, what="8 requests sent after the swap")

    assert out and all(code == 200 for _, _, code, _ in out), [o for o in out if o[2] != 200][:2]
    versions = [res["version"] for _, _, _, res in out]
    assert set(versions) == {old, v2["version"]}
    for t, _, _, res in out:  # each answer comes whole from the version it names
        ids = np.array([h["id"] for hs in res["results"] for h in hs])
        assert (ids % 3 == (2 if res["version"] == v2["version"] else 1)).all()
        assert res["shards"]["answered"] == 2
        if t > switched_at:
            assert res["version"] == v2["version"]
    gone = wait_until(lambda: app_name(app["cfg"].name, old) not in serve.status().applications, 60,
                      what="the old version to be released")
    assert gone
    assert c.post("/admin/reload").json()["switched"] is False


def test_a_broken_version_is_refused_and_the_old_one_serves_on(app, index):
    c = app["client"]
    store = Store(index["root"])
    good = current_version(store)
    bad = good + "-broken"
    shutil.copytree(store.path(vdir(good)), store.path(vdir(bad)))
    m = json.loads(store.read_text(f"{vdir(bad)}/manifest.json"))
    m["version"] = bad
    store.write_text(f"{vdir(bad)}/manifest.json", json.dumps(m))
    with open(store.path(f"{vdir(bad)}/shard-1.index"), "r+b") as f:
        f.truncate(100)
    set_current(store, bad)
    try:
        r = c.post("/admin/reload")
        assert r.status_code == 503, r.text
        assert bad in r.json()["error"] and f"still serving {good}" in r.json()["error"]
        assert c.search(vectors=[V], k=1)["version"] == good
        assert c.get("/health", {}).json()["reload_error"]
    finally:
        set_current(store, good)


def test_strict_app_follows_current_and_refuses_partial_answers(app, index):
    """A second router on the same Serve instance: --require-all-shards, CURRENT polled every 0.5 s."""
    import ray

    port_base = app["client"].base
    cfg = start_app(index["root"], port=app["port"], name="strict", route_prefix="/strict", require_all_shards=True,
                    poll_seconds=0.5)
    c = Client(port_base + "/strict")
    v = current_version(Store(index["root"]))
    assert c.get("/version").json()["version"] == v
    body = {"vectors": [V], "k": 3}
    assert c.search(**body)["shards"]["answered"] == 2

    ray.kill(ray.get_actor(replica_of(cfg, v, "shard-0"), namespace="serve"), no_restart=True)
    r = wait_until(lambda: (x := c.post("/search", body)).status_code == 503 and x.json(), 20, what="a 503")
    assert r["missing"] == ["shard-0"] and r["field"] == "shards"
    wait_until(lambda: c.post("/search", body).status_code == 200, 90, what="the replica to come back")

    v3 = index["v3"]
    set_current(Store(index["root"]), v3["version"])
    wait_until(lambda: c.get("/version").json()["version"] == v3["version"], 60, what="the poll to load v3")
    res = c.search(vectors=v3["x"][:2].tolist(), k=5)
    assert res["version"] == v3["version"] and all(h["id"] % 3 == 0 for hs in res["results"] for h in hs)
    assert app["client"].get("/version").json()["version"] == v  # the first app does not poll

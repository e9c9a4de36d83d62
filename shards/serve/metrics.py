"""The router's Prometheus metrics, through Ray's metrics API (ray.util.metrics): each node's metrics
agent exports them beside Ray's own (`ray start --metrics-export-port`, scraped by the Prometheus
that Ray's dashboard reads), named ray_shardex_*; cluster/grafana/shardex.json charts them.

    ray_shardex_requests_total{app,code}         search requests, by HTTP status
    ray_shardex_queries_total{app}               queries in them
    ray_shardex_request_seconds{app}             latency of a search request (histogram)
    ray_shardex_shards_total{app,outcome}        per request: shards queried, answered, missing
    ray_shardex_partial_total{app}               answers with a shard missing
    ray_shardex_swaps_total{app,in_place}        versions swapped to
    ray_shardex_version_served{app,version}      1 for the version served, 0 for those it replaced

Counts also stay in GET /stats (per replica); these add up over router replicas and restarts.
"""
from __future__ import annotations

LATENCY_BOUNDS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class Metrics:
    """The metrics of one router replica of app `app` (made inside the replica: Ray's API needs a worker)."""

    def __init__(self, app: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        def made(kind, name, doc, *tags, **kw):
            m = kind(f"shardex_{name}", doc, tag_keys=("app", *tags), **kw)
            m.set_default_tags({"app": app})
            return m

        self.requests = made(Counter, "requests", "search requests, by HTTP status", "code")
        self.queries = made(Counter, "queries", "queries in search requests")
        self.seconds = made(Histogram, "request_seconds", "seconds a search request took",
                            boundaries=LATENCY_BOUNDS_S)
        self.shards = made(Counter, "shards", "shards a request queried, those that answered, those missing",
                           "outcome")
        self.partial = made(Counter, "partial", "answers with a shard missing")
        self.swaps = made(Counter, "swaps", "versions swapped to", "in_place")
        self.served = made(Gauge, "version_served", "1: the version served; 0: one it replaced", "version")

    def search(self, code: int, queries: int, seconds: float, shards: dict | None) -> None:
        """One search request: its status, query count, latency and (answered ones) its shards report."""
        self.requests.inc(tags={"code": str(code)})
        self.seconds.observe(seconds)
        if code != 200:
            return
        self.queries.inc(queries)
        missing = len(shards["missing"])
        for outcome, n in (("queried", shards["queried"]), ("answered", shards["answered"]), ("missing", missing)):
            if n:
                self.shards.inc(n, tags={"outcome": outcome})
        if missing:
            self.partial.inc()

    def swapped(self, version: str, old: str | None, in_place: bool) -> None:
        if old is not None:
            self.swaps.inc(tags={"in_place": str(in_place).lower()})
            self.served.set(0, tags={"version": old})
        self.served.set(1, tags={"version": version})

"""The router: what it knows of a version (IndexView: checks, coarse lists, routing, stored fields), and the
Python API (`Router`), which searches it through the fan-out of shards/search/fanout.py.

The fan-out is the same for the Python API (shard searchers as Ray actors, or in this
process: RayShards, LocalShards) and for the Ray Serve app (shards/serve/: shard
deployments). What differs is only how one shard is called: the `call` given to `fan_out`.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from shards.errors import QueryError, SearchError, ShardexError
from shards.raytools import ensure_ray, ray_get
from shards.search.fanout import Outcome, fan_out, shard_fields
from shards.search.filters import filterable, parse_filter, wire
from shards.search.searcher import ShardSearcher
from shards.storage.docstore import DocStore
from shards.storage.manifest import Manifest, current_version, load_manifest
from shards.storage.store import Store

K_MAX = 1000
MAX_CANDIDATES = 100_000  # k x refine factor a shard may rerank for one query (its scan returns that many)


@dataclass
class Hit:
    id: object
    score: float
    fields: dict

    def as_dict(self) -> dict:
        return {"id": self.id, "score": self.score, "fields": self.fields}


class IndexView:
    """What the router knows of one version: the manifest, the docs dataset (not its rows),
    the filterable fields, the coarse quantizer of an IVF index, and the list ranges of ivf sharding."""

    def __init__(self, store: Store, version: str, filter_fields: list[str] | None = None,
                 prev: IndexView | None = None):
        """prev: a view loaded before; its coarse quantizer is taken when this version keeps it."""
        self.store = store
        self.version = version
        self.manifest: Manifest = load_manifest(store, version)
        m = self.manifest
        self.kinds = filterable(self.fields_schema(), m.docs.fields, filter_fields) if m.docs.files else {}
        self.mode = m.sharding.mode
        self.ranges = [list(r) for r in m.sharding.ranges] if self.mode == "ivf" else None
        # ranked routing: (nprobe, gap) it applies at, the version's default nprobe (clipped to nlist) and gap
        self.ranked = ((min(m.search.nprobe, m.index.nlist or m.search.nprobe), m.search.route_gap)
                       if self.mode == "ivf" and m.search.route_gap is not None and m.search.nprobe else None)
        self.quantizer = None
        if m.index.nlist and prev is not None and self.keeps_trained(prev):
            self.quantizer = prev.quantizer
        elif m.index.nlist:
            from shards.storage.faissio import read_verified

            self.quantizer = read_verified(store, m.dir_of(m.trained), m.trained)  # checked against the manifest

    @cached_property
    def docs(self) -> DocStore:
        """The version's docs files as one dataset (not its rows): lookups in a version without
        fields per shard, and readers of the whole corpus (eval)."""
        return DocStore(self.store, self.manifest)

    def fields_schema(self):
        """The stored fields' schema: one footer, a shard's fields file's when the version has them."""
        m = self.manifest
        first = next((f for sh in m.shards for f in sh.fields), None)
        if first is None:
            return self.docs.schema
        import pyarrow.parquet as pq

        with self.store.open(m.path(first.file)) as f:
            return pq.ParquetFile(f).schema_arrow

    def keeps_trained(self, other: IndexView) -> bool:
        """Whether this version's trained index is other's file (same path, same sha256)."""
        a, b = self.manifest, other.manifest
        return (a.path(a.trained.file), a.trained.sha256) == (b.path(b.trained.file), b.trained.sha256)

    def fits_app_of(self, other: IndexView) -> bool:
        """Whether other's shard replicas can load this version beside their own (a swap in place):
        the same trained index, shard count, filterable fields and encoder."""
        return (self.keeps_trained(other) and self.nshards == other.nshards and self.kinds == other.kinds
                and self.manifest.encoder == other.manifest.encoder)

    @property
    def nshards(self) -> int:
        return len(self.manifest.shards)

    @property
    def dim(self) -> int:
        return self.manifest.encoder.dim

    @property
    def metric(self) -> str:
        return self.manifest.index.metric

    @property
    def text(self) -> bool:
        return self.manifest.encoder.name != "precomputed"

    def vectors(self, xq, where: str = "vectors") -> np.ndarray:
        try:
            xq = np.asarray(xq, dtype=np.float32)
        except (ValueError, TypeError):
            raise QueryError(where, "every vector must be a list of the same number of floats") from None
        if xq.ndim == 1 and xq.size:
            xq = xq[None, :]
        if xq.ndim != 2 or xq.shape[0] == 0:
            raise QueryError(where, "give at least one vector, as a list of lists of floats")
        if xq.shape[1] != self.dim:
            raise QueryError(where, f"dimension {xq.shape[1]}, this index has {self.dim}")
        if not np.isfinite(xq).all():
            raise QueryError(where, "NaN or infinite values")
        return np.ascontiguousarray(xq)

    def check(self, k: int, nprobe: int | None, fields: list[str] | None, flt: dict | None):
        """(nprobe to use, filter in wire form); raise QueryError naming the field."""
        if not 1 <= k <= K_MAX:
            raise QueryError("k", f"{k} is outside 1..{K_MAX}")
        if nprobe is not None and nprobe < 1:
            raise QueryError("nprobe", f"{nprobe}; give at least 1")
        unknown = sorted(set(fields or []) - set(self.manifest.docs.fields))
        if unknown:
            raise QueryError("fields", f"unknown {unknown}; stored fields are {self.manifest.docs.fields}")
        nl = self.manifest.index.nlist
        nprobe = nprobe or self.manifest.search.nprobe
        if nl and nprobe:
            nprobe = min(nprobe, nl)
        return nprobe, wire(parse_filter(flt, self.kinds))

    def refine(self, factor: int | None, k: int = 10) -> int | None:
        """The refine factor a request asked for, checked (None: the version's default): each shard reranks
        k x factor candidates a query, at most MAX_CANDIDATES."""
        if factor is None:
            return None
        if factor < 0:
            raise QueryError("refine", f"{factor}; give 0 (no rerank) or more")
        if k * factor > MAX_CANDIDATES:
            raise QueryError("refine", f"{factor} x k {k} = {k * factor:,} candidates a query; at most "
                             f"{MAX_CANDIDATES:,}: give a smaller refine or k")
        if factor and not self.manifest.index.refine:
            raise QueryError("refine", f"{factor}, but version {self.version} keeps no refine store; "
                             f"build it with --refine fp32 or fp16")
        return factor

    def coarse(self, xq: np.ndarray, nprobe: int | None):
        """(Dq, Iq) [nq, nprobe]: the lists each query probes, or None for an index without lists."""
        if self.quantizer is None:
            return None
        from shards.storage.faissio import coarse_search

        return coarse_search(self.quantizer, xq, nprobe or self.manifest.search.nprobe or 1)

    def route(self, nq: int, coarse, ranked: bool = True) -> np.ndarray:
        """bool [nq, S]: the shards each query must reach. Under ivf sharding, those owning a list it
        probes; at the default nprobe of a version tuned for ranked routing, only those among them
        whose nearest probed list is within route_gap of the query's nearest (shard_selection.gap_mask).
        ranked=False (a filtered search: its matches may lie anywhere it probes) asks every probed shard."""
        if self.mode != "ivf":
            return np.ones((nq, self.nshards), dtype=bool)
        from shards.search.shard_selection import gap_mask, shard_mask

        if ranked and self.ranked is not None and coarse[1].shape[1] == self.ranked[0]:
            return gap_mask(coarse[0], coarse[1], self.ranges, self.ranked[1], self.metric == "ip")
        return route_mask(shard_mask(coarse[1], self.ranges), nq, self.nshards)

    def attach(self, D: np.ndarray, I: np.ndarray, fields: list[str] | None, docs: dict | None = None
               ) -> list[list[Hit]]:
        """Hits with their stored fields: docs as fanout.shard_fields read them, or (None) read here
        from the version's docs files (a version without fields per shard)."""
        docs = self.docs.lookup(I.ravel(), fields) if docs is None else docs
        return [[Hit(docs[i]["id"], float(d), docs[i]["fields"]) for d, i in zip(dr, ir) if i in docs]
                for dr, ir in zip(D, I)]


def route_mask(need, nq: int, S: int) -> np.ndarray:
    """Which shards each query needs, as bool [nq, S], from such a mask or per-query shard lists."""
    if isinstance(need, np.ndarray) and need.dtype == bool:
        if need.shape != (nq, S):
            raise SearchError(f"routing: a mask of shape {need.shape} for {nq} queries over {S} shards")
        return need
    m = np.zeros((nq, S), dtype=bool)
    for q, ss in enumerate(need):
        m[q, list(ss)] = True
    return m


# ---- the Python API -----------------------------------------------------------------------


class _Loop:
    """A private event loop in a thread: the fan-out is async, the Python API is not, and the
    caller may already be inside an event loop (a notebook)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="shardex-router")
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class LocalShards:
    """backend="local": the shards' searchers in this process, searched in threads."""

    def __init__(self, store: Store, version: str, shards: list, threads: int | None, cpus: float | None):
        self.threads, self.cpus = threads, cpus
        m = load_manifest(store, version)  # once: each searcher finds its shard's files through it
        self.shards = [ShardSearcher(store, m, sh, threads) for sh in shards]

    def load_attributes(self, store: Store, m: Manifest, kinds: dict) -> None:
        for s in self.shards:
            s.load_attributes(store, m, kinds)

    def call(self, s, xq, k, nprobe, flt, coarse, refine=None):
        return asyncio.to_thread(self.shards[s].search, xq, k, nprobe, flt, coarse, refine)

    def fields(self, s, ids, names):
        return asyncio.to_thread(self.shards[s].lookup, ids, names)

    def close(self) -> None:
        self.shards = []


class ShardActor(ShardSearcher):
    """A ShardSearcher as a Ray actor that keeps its load error for ready() to raise. An actor whose
    __init__ raises dies, Ray prints the traceback on the caller's terminal and hands back only its text."""

    def __init__(self, *a):
        self.error = None
        try:
            super().__init__(*a)
        except ShardexError as e:
            self.error = e

    def ready(self) -> bool:
        if self.error is not None:
            raise self.error
        return True


class RayShards:
    """backend="ray": one Ray actor per shard (joins RAY_ADDRESS or starts local Ray), reserving `cpus`
    and running `threads` faiss threads each (default: resources.plan_resources)."""

    def __init__(self, store: Store, version: str, shards: list, threads: int | None, cpus: float | None):
        import ray

        from shards.resources import cluster_cpus, plan_resources, shard_memory

        ensure_ray()
        res = plan_resources(*cluster_cpus(), len(shards), 1, 0, False, cpus, threads)
        self.threads, self.cpus = res.threads, res.shard_cpus
        actor = ray.remote(ShardActor)
        self.shards = [actor.options(num_cpus=self.cpus, memory=shard_memory(sh.ram_bytes, sh.live, 0))
                       .remote(store, version, sh, self.threads) for sh in shards]
        ray_get([a.ready.remote() for a in self.shards])  # a damaged shard: its one-line error, now
        self._last = None

    def load_attributes(self, store: Store, m: Manifest, kinds: dict) -> None:
        ray_get([s.load_attributes.remote(store, m, kinds) for s in self.shards])

    def call(self, s, xq, k, nprobe, flt, coarse, refine=None):
        x, c = self._put(xq, coarse)
        return self.shards[s].search.remote(x, k, nprobe, flt, c, refine)

    def fields(self, s, ids, names):
        return self.shards[s].lookup.remote(ids, names)

    def _put(self, xq, coarse):
        """Shards asked for all the queries share one object-store copy of them and their lists."""
        import ray

        if self._last is None or self._last[0] is not xq or self._last[1] is not coarse:
            self._last = (xq, coarse, ray.put(xq), ray.put(coarse))
        return self._last[2], self._last[3]

    def close(self) -> None:
        import ray

        for a in self.shards:
            ray.kill(a)
        self.shards = []


class Router:
    """Search a published version from Python, its shards searched by LocalShards or RayShards
    (backend "local" or "ray"; threads and cpus are per shard).
    A shard that fails raises SearchError naming it: the Python API never returns a
    partial answer (the HTTP router reports one instead; see shards/serve/http.py).
    """

    def __init__(self, index_root: str, version: str | None = None, s3_endpoint: str | None = None,
                 backend: str = "ray", threads: int | None = None, filter_fields: list[str] | None = None,
                 timeout: float | None = None, cpus: float | None = None):
        self.store = Store(index_root, s3_endpoint)
        self.version = version or current_version(self.store)
        self.view = IndexView(self.store, self.version, filter_fields)
        self.manifest: Manifest = self.view.manifest
        self.backend = backend
        self.timeout = timeout
        client = LocalShards if backend == "local" else RayShards
        self.client = client(self.store, self.version, self.manifest.shards, threads, cpus)
        self.threads, self.shard_cpus = self.client.threads, self.client.cpus  # per shard
        if self.view.kinds:
            self.client.load_attributes(self.store, self.manifest, self.view.kinds)
        self._encoder = None
        self._loop = _Loop()
        self.last: Outcome | None = None

    @property
    def docs(self) -> DocStore:
        return self.view.docs

    @property
    def shards(self) -> list:
        """Each shard's ShardSearcher (local) or Ray actor."""
        return self.client.shards

    @property
    def metric(self) -> str:
        return self.view.metric

    @property
    def dim(self) -> int:
        return self.view.dim

    def encoder(self):
        """The index's own encoder, loaded on first use."""
        if self._encoder is None:
            from shards.encoder import Encoder

            self._encoder = Encoder.for_index(self.manifest.encoder)
        return self._encoder

    def encode(self, queries: list[str]) -> np.ndarray:
        if not queries:
            raise QueryError("queries", "empty; give at least one query")
        return self.encoder().encode_queries(list(queries))

    def search_outcome(self, xq, k: int = 10, nprobe: int | None = None, filter: dict | None = None,
                       refine: int | None = None) -> Outcome:
        """The fan-out's whole outcome: merged (D, I), shards touched per query, failures. refine: each
        shard's rerank factor (None: the version's tuned one; 0: none)."""
        xq = self.view.vectors(xq)
        nprobe, flt = self.view.check(k, nprobe, None, filter)
        out = self._loop.run(fan_out(self.view, xq, k, nprobe, flt, self.client.call, self.timeout,
                                     self.view.refine(refine, k)))
        self.last = out
        if out.failed:
            raise SearchError("; ".join(out.failed[s] for s in sorted(out.failed)))
        return out

    def search_vectors(self, xq, k: int = 10, nprobe: int | None = None, filter: dict | None = None,
                       refine: int | None = None):
        """(D, I): the exact merge of the top-k of every shard each query needs."""
        out = self.search_outcome(xq, k, nprobe, filter, refine)
        return out.D, out.I

    def search(self, queries, k: int = 10, nprobe: int | None = None, fields: list[str] | None = None,
               filter: dict | None = None, refine: int | None = None):
        """Text queries (list of str) or vectors -> per query, a list of Hit with stored fields."""
        self.view.check(k, nprobe, fields, None)  # a bad field fails before any encoding
        if isinstance(queries, (list, tuple)) and queries and isinstance(queries[0], str):
            xq = self.encode(list(queries))
        else:
            xq = queries
        out = self.search_outcome(xq, k, nprobe, filter, refine)
        docs = self._loop.run(shard_fields(self.view, out, fields, self.client.fields, self.timeout))
        if out.failed:
            raise SearchError("; ".join(out.failed[s] for s in sorted(out.failed)))
        return self.view.attach(out.D, out.I, fields, docs)

    def close(self) -> None:
        self.client.close()
        self._loop.close()

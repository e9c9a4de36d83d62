"""The router: check a request, send its queries to the shards that need them, merge the top-k exactly.

The same fan-out serves the Python API (`Router`: shard searchers as Ray actors, or in
this process) and the Ray Serve app (shards/serve/deployments.py: shard deployments). What differs
is only how one shard is called; that is the `call` argument of `fan_out`.

Coarse quantization once. For an IVF index the router holds the version's coarse
quantizer (trained.index, with any OPQ pre-transform) and finds the lists each query
probes once; every shard then scans exactly those lists (faiss search_preassigned)
instead of quantizing the query again. Shards agree on the lists, ties included, and S
shards cost one coarse search, not S.

Scan order. A batch's queries go to the shards grouped by their nearest list (the
coarse search gives it for free): queries probing the same lists then come one after
another, and a shard scans each list while it is still in cache. The results are put
back in the caller's order.

Routing. With --sharding hash every query goes to every shard. With --sharding ivf
each shard owns a range of IVF lists, and a query goes only to the shards owning the
lists it probes.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import numpy as np

from shards.storage.docstore import DocStore
from shards.errors import QueryError, SearchError
from shards.storage.faissio import faiss
from shards.search.filters import filterable, parse_filter, wire
from shards.storage.manifest import Manifest, current_version, load_manifest, vdir
from shards.search.shard_selection import scan_order
from shards.search.searcher import ShardSearcher
from shards.storage.store import Store

K_MAX = 1000


@dataclass
class Hit:
    id: object
    score: float
    fields: dict

    def as_dict(self) -> dict:
        return {"id": self.id, "score": self.score, "fields": self.fields}


def shard_name(s: int) -> str:
    return f"shard-{s}"


class IndexView:
    """What the router knows of one version: the manifest, the docs dataset (not its rows),
    the filterable fields, the coarse quantizer of an IVF index, and the list ranges of ivf sharding."""

    def __init__(self, store: Store, version: str, filter_fields: list[str] | None = None):
        self.store = store
        self.version = version
        self.manifest: Manifest = load_manifest(store, version)
        m = self.manifest
        self.docs = DocStore(store, m)
        self.kinds = filterable(self.docs.schema, m.docs.fields, filter_fields) if m.docs.files else {}
        self.mode = m.sharding.mode
        self.ranges = [list(r) for r in m.sharding.ranges] if self.mode == "ivf" else None
        self.quantizer = None
        if m.index.nlist:
            from shards.storage.faissio import read_index

            self.quantizer = read_index(store, f"{vdir(version)}/{m.trained.file}")

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

    def coarse(self, xq: np.ndarray, nprobe: int | None):
        """(Dq, Iq) [nq, nprobe]: the lists each query probes, or None for an index without lists."""
        if self.quantizer is None:
            return None
        from shards.storage.faissio import coarse_search

        return coarse_search(self.quantizer, xq, nprobe or self.manifest.search.nprobe or 1)

    def route(self, nq: int, coarse) -> np.ndarray:
        """bool [nq, S]: the shards each query must reach."""
        if self.mode != "ivf":
            return np.ones((nq, self.nshards), dtype=bool)
        from shards.search.shard_selection import shard_mask

        return route_mask(shard_mask(coarse[1], self.ranges), nq, self.nshards)

    def attach(self, D: np.ndarray, I: np.ndarray, fields: list[str] | None) -> list[list[Hit]]:
        docs = self.docs.lookup(I.ravel(), fields)
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


# ---- the fan-out ------------------------------------------------------------------------


@dataclass
class Outcome:
    """One fan-out: the merged top-k, which shards each query reached, and who answered."""

    D: np.ndarray
    I: np.ndarray
    touched: np.ndarray                                   # [nq] shards each query was sent to
    queried: set = field(default_factory=set)             # shard numbers asked at least once
    failed: dict = field(default_factory=dict)            # shard number -> one-line reason
    asked: np.ndarray | None = None                       # bool [nq, S]: which shard got which query

    @property
    def answered(self) -> int:
        return len(self.queried) - len(self.failed)

    def slice(self, a: int, b: int) -> "Outcome":
        """Queries a..b of a shared fan-out (one request of a server batch): a shard that failed
        counts against them only if one of them was sent to it."""
        asked = self.asked[a:b]
        mine = {int(s) for s in np.flatnonzero(asked.any(0))}
        return Outcome(self.D[a:b], self.I[a:b], self.touched[a:b], mine,
                       {s: r for s, r in self.failed.items() if s in mine}, asked)

    def unordered(self, order: np.ndarray) -> "Outcome":
        """This outcome of the queries xq[order], put back in the order of xq."""
        def back(a):
            b = np.empty_like(a)
            b[order] = a
            return b
        self.D, self.I, self.touched, self.asked = back(self.D), back(self.I), back(self.touched), back(self.asked)
        return self

    def report(self) -> dict:
        return {"queried": len(self.queried), "answered": self.answered,
                "missing": [shard_name(s) for s in sorted(self.failed)],
                "touched": self.touched.tolist()}


class ShardFailure(Exception):
    pass


async def fan_out(view: IndexView, xq: np.ndarray, k: int, nprobe: int | None, flt: list | None,
                  call, timeout: float | None = None) -> Outcome:
    """Send each query to the shards it needs, concurrently, and merge their top-k exactly.

    call(s, xq, k, nprobe, flt, coarse) -> awaitable (D, I) of shard s, where coarse is the
    (Dq, Iq) of those queries (None without IVF). A shard that fails or
    does not answer within `timeout` seconds is recorded in Outcome.failed and left out.
    With a filter under IVF routing, a query still short of k results after its own
    shards is sent to the others as well: a filter may leave its nearest lists empty.
    """
    nq = len(xq)
    coarse = await asyncio.to_thread(view.coarse, xq, nprobe) if view.quantizer is not None else None
    order = scan_order(coarse[1]) if coarse is not None and nq > 1 else None
    if order is not None:  # neighbouring queries probe the same lists: a shard scans each while it is in cache
        xq, coarse = xq[order], (coarse[0][order], coarse[1][order])
    route = view.route(nq, coarse)
    heap = faiss().ResultHeap(nq, k, keep_max=view.metric == "ip")
    out = Outcome(heap.D, heap.I, route.sum(1), asked=route)
    q = (xq, coarse)
    await _round(route, q, k, nprobe, flt, call, timeout, heap, out)
    if flt is not None and view.mode == "ivf":
        short = (heap.I >= 0).sum(1) < k
        more = ~route & short[:, None]
        if more.any():
            await _round(more, q, k, nprobe, flt, call, timeout, heap, out)
            out.touched = out.touched + more.sum(1)
            out.asked = route | more
    heap.finalize()
    out.D, out.I = heap.D, heap.I
    return out if order is None else out.unordered(order)


async def _round(mask, q, k, nprobe, flt, call, timeout, heap, out: Outcome) -> None:
    xq, coarse = q
    jobs = {s: np.flatnonzero(mask[:, s]) for s in range(mask.shape[1]) if mask[:, s].any()}
    jobs = {s: rows for s, rows in jobs.items() if s not in out.failed}
    out.queried |= set(jobs)
    res = await asyncio.gather(*[_call_one(call, s, *_rows(xq, coarse, rows), k, nprobe, flt, timeout)
                                 for s, rows in jobs.items()], return_exceptions=True)
    for (s, rows), r in zip(jobs.items(), res):
        if isinstance(r, BaseException):
            out.failed[s] = str(r) if isinstance(r, ShardFailure) else _one_line(r)
            continue
        D, I = r
        if len(rows) == len(xq):
            heap.add_result(D, I)
        else:
            heap.add_result_subset(rows, np.ascontiguousarray(D, dtype=np.float32),
                                   np.ascontiguousarray(I, dtype=np.int64))


def _rows(xq, coarse, rows):
    """The queries (and their coarse assignment) of some rows: the arrays themselves for all rows."""
    if len(rows) == len(xq):
        return xq, coarse
    return xq[rows], (None if coarse is None else (coarse[0][rows], coarse[1][rows]))


async def _call_one(call, s, xq, coarse, k, nprobe, flt, timeout):
    """One shard's answer; a replica that died mid-call is retried once on another replica."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout if timeout else None
    for attempt in (0, 1):
        aw = call(s, xq, k, nprobe, flt, coarse)
        left = None if deadline is None else max(deadline - loop.time(), 0.0)
        try:
            return await asyncio.wait_for(_awaitable(aw), left)
        except asyncio.TimeoutError:
            _cancel(aw)
            raise ShardFailure(f"{shard_name(s)}: no answer within {timeout:g} s") from None
        except Exception as e:
            if attempt == 0 and _replica_died(e) and (deadline is None or deadline > loop.time()):
                continue
            raise ShardFailure(f"{shard_name(s)}: {_one_line(e)}") from None


async def _awaitable(aw):
    return await aw


def _cancel(aw) -> None:
    cancel = getattr(aw, "cancel", None)
    try:
        if callable(cancel):
            cancel()
        elif type(aw).__name__ == "ObjectRef":
            import ray

            ray.cancel(aw)
    except Exception:  # best effort: the answer is already being ignored
        pass


def _replica_died(e: BaseException) -> bool:
    try:
        import ray.exceptions as rx
    except ImportError:
        return False
    return isinstance(e, rx.RayActorError)


def _one_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    e = cause if isinstance(cause, BaseException) else e
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


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


class Router:
    """Search a published version from Python.

    backend="ray": one Ray actor per shard (joins RAY_ADDRESS or starts local Ray), reserving `cpus`
    and running `threads` faiss threads each (default: resources.plan_resources);
    backend="local": the shards are loaded into this process and searched in threads.
    A shard that fails raises SearchError naming it: the Python API never returns a
    partial answer (the HTTP router reports one instead; see shards/serve/deployments.py).
    """

    def __init__(self, index_root: str, version: str | None = None, s3_endpoint: str | None = None,
                 backend: str = "ray", threads: int | None = None, filter_fields: list[str] | None = None,
                 timeout: float | None = None, cpus: float | None = None):
        self.store = Store(index_root, s3_endpoint)
        self.version = version or current_version(self.store)
        self.view = IndexView(self.store, self.version, filter_fields)
        self.manifest: Manifest = self.view.manifest
        self.docs = self.view.docs
        self.backend = backend
        self.timeout = timeout
        if backend != "local":
            from shards.raytools import ensure_ray

            from shards.serve.resources import cluster_cpus, plan_resources

            ensure_ray()
            res = plan_resources(*cluster_cpus(), self.view.nshards, 1, 0, False, cpus, threads)
            cpus, threads = res.shard_cpus, res.threads
        self.threads, self.shard_cpus = threads, cpus  # per shard: faiss threads, Ray CPUs reserved
        self.shards = [self._start(s, threads, cpus) for s in self.manifest.shards]
        self._load_attributes()
        self._encoder = None
        self._loop = _Loop()
        self._last = None
        self.last: Outcome | None = None

    def _start(self, shard, threads, cpus):
        if self.backend == "local":
            return ShardSearcher(self.store, self.version, shard, threads)
        import ray

        return ray.remote(ShardSearcher).options(num_cpus=cpus).remote(self.store, self.version, shard, threads)

    def _load_attributes(self) -> None:
        if not self.view.kinds:
            return
        if self.backend == "local":
            for s in self.shards:
                s.load_attributes(self.store, self.manifest, self.view.kinds)
            return
        from shards.raytools import ray_get

        ray_get([s.load_attributes.remote(self.store, self.manifest, self.view.kinds) for s in self.shards])

    def _call(self, s, xq, k, nprobe, flt, coarse):
        if self.backend == "local":
            return asyncio.to_thread(self.shards[s].search, xq, k, nprobe, flt, coarse)
        x, c = self._put(xq, coarse)
        return self.shards[s].search.remote(x, k, nprobe, flt, c)

    def _put(self, xq, coarse):
        """Shards asked for all the queries share one object-store copy of them and their lists."""
        import ray

        if self._last is None or self._last[0] is not xq or self._last[1] is not coarse:
            self._last = (xq, coarse, ray.put(xq), ray.put(coarse))
        return self._last[2], self._last[3]

    @property
    def metric(self) -> str:
        return self.view.metric

    @property
    def dim(self) -> int:
        return self.view.dim

    def encoder(self):
        """The index's own encoder, loaded on first use (the only import of the builder here)."""
        if self._encoder is None:
            from shards.encoder import Encoder

            self._encoder = Encoder.for_index(self.manifest.encoder)
        return self._encoder

    def encode(self, queries: list[str]) -> np.ndarray:
        if not queries:
            raise QueryError("queries", "empty; give at least one query")
        return self.encoder().encode_queries(list(queries))

    def search_outcome(self, xq, k: int = 10, nprobe: int | None = None, filter: dict | None = None) -> Outcome:
        """The fan-out's whole outcome: merged (D, I), shards touched per query, failures."""
        xq = self.view.vectors(xq)
        nprobe, flt = self.view.check(k, nprobe, None, filter)
        out = self._loop.run(fan_out(self.view, xq, k, nprobe, flt, self._call, self.timeout))
        self.last = out
        if out.failed:
            raise SearchError("; ".join(out.failed[s] for s in sorted(out.failed)))
        return out

    def search_vectors(self, xq, k: int = 10, nprobe: int | None = None, filter: dict | None = None):
        """(D, I): the exact merge of the top-k of every shard each query needs."""
        out = self.search_outcome(xq, k, nprobe, filter)
        return out.D, out.I

    def search(self, queries, k: int = 10, nprobe: int | None = None, fields: list[str] | None = None,
               filter: dict | None = None):
        """Text queries (list of str) or vectors -> per query, a list of Hit with stored fields."""
        self.view.check(k, nprobe, fields, None)  # a bad field fails before any encoding
        if isinstance(queries, (list, tuple)) and queries and isinstance(queries[0], str):
            xq = self.encode(list(queries))
        else:
            xq = queries
        D, I = self.search_vectors(xq, k, nprobe, filter)
        return self.view.attach(D, I, fields)

    def close(self) -> None:
        if self.backend != "local":
            import ray

            for a in self.shards:
                ray.kill(a)
        self.shards = []
        self._loop.close()

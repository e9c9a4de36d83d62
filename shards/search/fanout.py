"""The fan-out: send each query to the shards that need it, concurrently, and merge their top-k exactly.

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
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from shards.raytools import as_coroutine, one_line
from shards.search.shard_selection import scan_order
from shards.storage.faissio import faiss


def shard_name(s: int) -> str:
    return f"shard-{s}"


@dataclass
class Outcome:
    """One fan-out: the merged top-k, which shards each query reached, and who answered."""

    D: np.ndarray
    I: np.ndarray
    touched: np.ndarray                                   # [nq] shards each query was sent to
    queried: set = field(default_factory=set)             # shard numbers asked at least once
    failed: dict = field(default_factory=dict)            # shard number -> one-line reason
    asked: np.ndarray | None = None                       # bool [nq, S]: which shard got which query
    owner: np.ndarray | None = None                       # owners(), once asked
    got: list = field(default_factory=list, repr=False)   # (shard, rows, D, I) of each answer merged

    @property
    def answered(self) -> int:
        return len(self.queried) - len(self.failed)

    def slice(self, a: int, b: int) -> Outcome:
        """Queries a..b of a shared fan-out (one request of a server batch): a shard that failed
        counts against them only if one of them was sent to it."""
        asked = self.asked[a:b]
        mine = {int(s) for s in np.flatnonzero(asked.any(0))}
        got = [(s, rows[m] - a, D[m], I[m]) for s, rows, D, I in self.got if (m := (rows >= a) & (rows < b)).any()]
        return Outcome(self.D[a:b], self.I[a:b], self.touched[a:b], mine,
                       {s: r for s, r in self.failed.items() if s in mine}, asked,
                       None if self.owner is None else self.owner[a:b], got)

    def unordered(self, order: np.ndarray) -> Outcome:
        """This outcome of the queries xq[order], put back in the order of xq."""
        def back(a):
            b = np.empty_like(a)
            b[order] = a
            return b
        self.D, self.I, self.touched, self.asked = back(self.D), back(self.I), back(self.touched), back(self.asked)
        self.owner = None if self.owner is None else back(self.owner)
        self.got = [(s, order[rows], D, I) for s, rows, D, I in self.got]
        return self

    def remerge(self, keep_max: bool) -> None:
        """The merge again without the shards in failed (they failed after answering the search)."""
        heap = faiss().ResultHeap(len(self.I), self.I.shape[1], keep_max=keep_max)
        for s, rows, D, I in self.got:
            if s not in self.failed:
                heap.add_result_subset(rows, D, I)
        heap.finalize()
        self.D, self.I, self.owner = heap.D, heap.I, None

    def owners(self) -> np.ndarray:
        """[nq, k] the shard each merged hit came from (-1: none): an id is served by one shard only,
        so its value finds it among the answers. Computed when asked (fields), not per fan-out."""
        if self.owner is None:
            self.owner = owners(self.I, [g for g in self.got if g[0] not in self.failed])
        return self.owner

    def report(self) -> dict:
        return {"queried": len(self.queried), "answered": self.answered,
                "missing": [shard_name(s) for s in sorted(self.failed)],
                "touched": self.touched.tolist()}


class ShardFailure(Exception):
    pass


async def fan_out(view, xq: np.ndarray, k: int, nprobe: int | None, flt: list | None,
                  call, timeout: float | None = None, refine: int | None = None) -> Outcome:
    """Send each query to the shards it needs, concurrently, and merge their top-k exactly.

    view is the version's IndexView (shards/search/router.py): its coarse lists, routing and metric.
    call(s, xq, k, nprobe, flt, coarse, refine) -> awaitable (D, I) of shard s, where coarse is the
    (Dq, Iq) of those queries (None without IVF) and refine the refine factor asked (None: the
    version's). A shard that fails or
    does not answer within `timeout` seconds is recorded in Outcome.failed and left out.
    With a filter under IVF routing, a query still short of k results after its own
    shards is sent to the others as well: a filter may leave its nearest lists empty.
    """
    nq = len(xq)
    coarse = await asyncio.to_thread(view.coarse, xq, nprobe) if view.quantizer is not None else None
    order = scan_order(coarse[1]) if coarse is not None and nq > 1 else None
    if order is not None:  # neighbouring queries probe the same lists: a shard scans each while it is in cache
        xq, coarse = xq[order], (coarse[0][order], coarse[1][order])
    route = view.route(nq, coarse, ranked=flt is None)
    heap = faiss().ResultHeap(nq, k, keep_max=view.metric == "ip")
    out = Outcome(heap.D, heap.I, route.sum(1), asked=route)
    q, call = (xq, coarse), partial(_with_refine, call, refine)
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


def owners(I: np.ndarray, got: list[tuple]) -> np.ndarray:
    """The shard each merged hit of I came from, -1 for none; got: (shard, rows, D, I) of each answer."""
    if not got:
        return np.full(I.shape, -1, np.int64)
    ids = np.concatenate([g[3].ravel() for g in got])
    sh = np.concatenate([np.full(g[3].size, g[0], np.int64) for g in got])
    o = np.argsort(ids, kind="stable")
    ids, sh = ids[o], sh[o]
    pos = np.minimum(np.searchsorted(ids, I), len(ids) - 1)
    return np.where((I >= 0) & (ids[pos] == I), sh[pos], -1)


async def _round(mask, q, k, nprobe, flt, call, timeout, heap, out: Outcome) -> None:
    xq, coarse = q
    jobs = {s: np.flatnonzero(mask[:, s]) for s in range(mask.shape[1]) if mask[:, s].any()}
    jobs = {s: rows for s, rows in jobs.items() if s not in out.failed}
    out.queried |= set(jobs)
    res = await asyncio.gather(*[_call_one(call, s, *_rows(xq, coarse, rows), k, nprobe, flt, timeout)
                                 for s, rows in jobs.items()], return_exceptions=True)
    for (s, rows), r in zip(jobs.items(), res):
        if isinstance(r, BaseException):
            out.failed[s] = one_line(r, ShardFailure)
            continue
        D, I = r
        D, I = np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64)
        out.got.append((s, rows, D, I))
        if len(rows) == len(xq):
            heap.add_result(D, I)
        else:
            heap.add_result_subset(rows, D, I)


def _with_refine(call, refine, s, xq, k, nprobe, flt, coarse):
    return call(s, xq, k, nprobe, flt, coarse, refine)


def _rows(xq, coarse, rows):
    """The queries (and their coarse assignment) of some rows: the arrays themselves for all rows."""
    if len(rows) == len(xq):
        return xq, coarse
    return xq[rows], (None if coarse is None else (coarse[0][rows], coarse[1][rows]))


async def _call_one(call, s, xq, coarse, k, nprobe, flt, timeout):
    return await _ask(lambda: call(s, xq, k, nprobe, flt, coarse), s, timeout)


async def _ask(make, s, timeout, what: str = ""):
    """Shard s's answer to make() (an awaitable); a replica that died mid-call is asked once more
    (Serve sends it to another replica)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout if timeout else None
    for attempt in (0, 1):
        aw, left = None, None if deadline is None else max(deadline - loop.time(), 0.0)
        try:
            aw = make()  # a call may fail before it hands back an awaitable (a local shard's thread)
            return await asyncio.wait_for(as_coroutine(aw), left)
        except asyncio.TimeoutError:
            _cancel(aw)
            raise ShardFailure(f"{shard_name(s)}: {what}no answer within {timeout:g} s") from None
        except Exception as e:  # noqa: BLE001  (any failure of a shard is reported as its failure)
            if attempt == 0 and _replica_died(e) and (deadline is None or deadline > loop.time()):
                continue
            raise ShardFailure(f"{shard_name(s)}: {what}{one_line(e)}") from None


async def shard_fields(view, out: Outcome, fields: list[str] | None, call, timeout: float | None = None):
    """The stored fields of out's hits, each read by the shard that returned it: call(s, ids, names) ->
    awaitable {id: {"id", "fields"}}. None for a version without fields per shard (view.attach then
    reads its docs files). A shard that fails is recorded in out.failed, like one that failed to search:
    its hits are left out of the answer, which is then partial."""
    m = view.manifest
    if not m.docs.per_shard:
        return None
    names = list(m.docs.fields if fields is None else fields)
    if not names and m.docs.id_kind != "str":
        return {int(i): {"id": int(i), "fields": {}} for i in np.unique(out.I) if i >= 0}
    docs: dict = {}
    asked = np.empty(0, np.int64)
    while True:  # once a shard fails here, the merge without it brings in hits of others, asked in turn
        own = out.owners()
        want = (own >= 0) & ~np.isin(out.I, asked)
        asked = np.union1d(asked, out.I[want])
        jobs = {int(s): np.unique(out.I[want & (own == s)]) for s in np.unique(own[want])}
        if not jobs:
            return docs
        got = await asyncio.gather(*[_ask(lambda s=s, ids=ids: call(s, ids, names), s, timeout, "fields: ")
                                     for s, ids in jobs.items()], return_exceptions=True)
        for s, g in zip(jobs, got):
            if isinstance(g, BaseException):
                out.failed[s] = one_line(g, ShardFailure)
            else:
                docs.update(g)
        if any(isinstance(g, BaseException) for g in got):
            out.remerge(view.metric == "ip")


def _cancel(aw) -> None:
    cancel = getattr(aw, "cancel", None)
    try:
        if callable(cancel):
            cancel()
        elif type(aw).__name__ == "ObjectRef":
            import ray

            ray.cancel(aw)
    except Exception:  # noqa: BLE001 (best effort: the answer is already being ignored)
        pass


def _replica_died(e: BaseException) -> bool:
    try:
        import ray.exceptions as rx
    except ImportError:
        return False
    return isinstance(e, rx.RayActorError)

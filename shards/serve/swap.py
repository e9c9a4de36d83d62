"""The live version swap: which version the router app serves, and the switch to the next one.

One keeper (shards/serve/keeper.py, one replica) loads a version by deploying its app beside
the one being served and waiting until every replica is up; it then names it current. Each
router replica (--router-replicas; shards/serve/follow.py) follows the keeper and switches by
replacing one reference: a request holds the version it started with until it ends, so every
response names the version that answered it. The old app is deleted once no router replica
holds it any more.

In place: a version that keeps the served one's trained index, shard count, filterable
fields and encoder (a reindex that added delta segments) is loaded by the served app's
own shard replicas, beside the version they serve, from what is new in it (its deltas,
dead sets, docs files: shards/search/held.py). Each request names its version to the
shard, so the switch is the same one reference, and the app stays.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from ray import serve

from shards.config import ServeConfig
from shards.errors import SearchError, ShardexError
from shards.raytools import as_coroutine, one_line
from shards.resources import Resources, cluster_cpus, cluster_nodes, plan_resources
from shards.search.fanout import shard_name
from shards.search.router import IndexView
from shards.serve.versions import app_name, delete_app, deploy_version, version_app
from shards.storage.manifest import current_version
from shards.storage.store import Store

DRAIN_SECONDS = 60.0        # the longest an old version waits for its last requests before it is deleted
FOLLOW_GRACE_S = 30.0       # beyond that, for a router replica to see the swap (it asks every FOLLOW_S)


@dataclass
class Live:
    """A loaded version as the router holds it."""

    view: IndexView
    app: str
    shards: list
    encoder: object | None
    loaded_at: float = field(default_factory=time.time)
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # set while no request holds it

    def __post_init__(self):
        self.idle.set()

    @property
    def version(self) -> str:
        return self.view.version

    @contextmanager
    def held(self):
        """One request's hold on this version: it is not deleted before the request ends."""
        self.inflight += 1
        self.idle.clear()
        try:
            yield self
        finally:
            self.inflight -= 1
            if not self.inflight:
                self.idle.set()

    def call(self, s, xq, k, nprobe, flt, coarse, refine=None):
        """fan_out's call: shard s of this version, through its Serve handle."""
        return self.shards[s].search.remote(xq, k, nprobe, flt, coarse, self.version, refine)

    def fields(self, s, ids, names):
        """shard_fields' call: the stored fields of shard s's hits."""
        return self.shards[s].fields.remote(ids, names, self.version)


class Versions:
    """The version the router app serves: the keeper's side (shards/serve/keeper.py, one replica).
    It deploys and checks each version (`current`), and deletes a replaced app once no router
    replica holds it: a router acquire()s the app it switches to and release()s it when its last
    request there is done (or DRAIN_SECONDS after it was replaced, for a router that died)."""

    def __init__(self, cfg: ServeConfig, store: Store, metrics=None):
        self.cfg, self.store, self.metrics = cfg, store, metrics
        self.current: Live | None = None
        self.load_error: str | None = None
        self.failed_version: str | None = None
        self.lock = asyncio.Lock()
        self.holders: dict[str, int] = {}       # app -> router replicas' Live objects on it not released
        self.replaced: dict[str, float] = {}    # app no longer current -> when it stopped being
        self.stats = {"swaps": 0, "swaps_in_place": 0, "last_load": None}

    def state(self) -> dict:
        """What a router replica follows: the version served, its app, the last load error, the swaps."""
        cur = self.current
        return {"version": cur and cur.version, "app": cur and cur.app, "loaded_at": cur and cur.loaded_at,
                "load_error": self.load_error, **self.stats}

    def acquire(self) -> dict:
        """state(), with the current app held for the router asking until it releases it."""
        if self.current is not None:
            self.holders[self.current.app] = self.holders.get(self.current.app, 0) + 1
        return self.state()

    async def release(self, app: str) -> None:
        self.holders[app] = max(0, self.holders.get(app, 0) - 1)
        await self._collect()

    async def watch(self) -> None:
        """Load CURRENT, then follow it every poll_seconds (0: only the first load)."""
        while True:
            v = None
            try:
                v = await asyncio.to_thread(current_version, self.store)
                if v != self.failed_version:
                    await self.swap_to(v)
            except Exception as e:  # noqa: BLE001 - reported by /health and status(); the old version serves on
                self.load_error = one_line(e, ShardexError)
                self.failed_version = v
            await self._collect()
            while self.cfg.poll_seconds == 0 and self.current is not None:  # loaded: only /admin/reload swaps
                await asyncio.sleep(5.0)
                await self._collect()
            await asyncio.sleep(self.cfg.poll_seconds or 5.0)

    async def swap_to(self, version: str) -> bool:
        """Serve `version` (loading it beside the served one); False if it is served already."""
        async with self.lock:
            if self.current is not None and self.current.version == version:
                return False
            try:
                new = await self._load(version)
            except Exception as e:  # noqa: BLE001  (a version that fails to load is refused; the old one serves on)
                self.failed_version = version
                self.load_error = one_line(e, ShardexError)
                raise SearchError(self.load_error) from None
            old, self.current = self.current, new  # routers follow it: keeper.state()
            self.load_error, self.failed_version = None, None
            in_place = old is not None and old.app == new.app
            self.stats["swaps"] += old is not None
            self.stats["swaps_in_place"] += in_place
            if old is not None and not in_place:
                self.replaced[old.app] = time.monotonic()
            self.replaced.pop(new.app, None)
            if self.metrics is not None:
                self.metrics.swapped(new.version, old and old.version, in_place)
        return True

    async def _load(self, version: str) -> Live:
        t, old = time.perf_counter(), self.current
        view = await asyncio.to_thread(IndexView, self.store, version, self.cfg.filter_fields,
                                       old.view if old else None)
        if old is not None and view.fits_app_of(old.view):
            live = Live(view, old.app, old.shards, old.encoder)
            await self._ready(live, self.cfg.replicas, t, delete=False)
        else:
            live = await self._deploy(view)
            await self._ready(live, self.cfg.replicas, t, delete=True)
        return live

    async def _deploy(self, view: IndexView) -> Live:
        """A new app for view's version, beside the served one; its replicas load it as they start."""
        res, version = self._resources(view), view.version
        name = app_name(self.cfg.name, version)
        app = version_app(self.cfg, view, res, len(await asyncio.to_thread(cluster_nodes)))
        await asyncio.to_thread(deploy_version, app, name, self.cfg.load_timeout)
        return Live(view, name, *handles(name, view))

    async def _ready(self, live: Live, per_shard: int, t: float, delete: bool) -> None:
        """Ping each shard of live's version `per_shard` times at once (a replica loads the version if it
        does not hold it; concurrent pings spread over the replicas, and one a ping missed loads it
        on its first request); record the load in stats["last_load"]; raise naming the shards that failed."""
        hs = [(s, h) for s, h in enumerate(live.shards) for _ in range(per_shard)]
        pings = await asyncio.gather(*[as_coroutine(h.ping.remote(live.version)) for _, h in hs],
                                     return_exceptions=True)
        bad = sorted({f"{shard_name(s)}: {one_line(p)}" for (s, _), p in zip(hs, pings)
                      if isinstance(p, BaseException)})
        if bad:
            if delete:
                await asyncio.to_thread(delete_app, live.app)
            raise SearchError(f"{live.app}: " + "; ".join(bad))
        loads = {p["replica"]: p["load"] or {} for p in pings}
        self.stats["last_load"] = {"version": live.version, "in_place": not delete, "replicas": len(loads),
                                   "seconds": round(time.perf_counter() - t, 3),
                                   "bytes_read": sum(x.get("bytes_read") or 0 for x in loads.values()),
                                   "segments_reused": sum(x.get("segments_reused") or 0 for x in loads.values())}

    def _resources(self, view: IndexView) -> Resources:
        return plan_resources(*cluster_cpus(), view.nshards, self.cfg.replicas, self.cfg.encoder_replicas,
                              view.text, self.cfg.shard_cpus, self.cfg.threads)

    async def _collect(self) -> None:
        """Delete each replaced app no router holds (or replaced DRAIN_SECONDS + FOLLOW_GRACE_S ago)."""
        now = time.monotonic()
        for app, since in list(self.replaced.items()):
            if self.holders.get(app, 0) == 0 or now - since > DRAIN_SECONDS + FOLLOW_GRACE_S:
                del self.replaced[app]
                self.holders.pop(app, None)
                await asyncio.to_thread(delete_app, app)


def handles(app: str, view: IndexView) -> tuple[list, object | None]:
    """(shard handles, encoder handle or None) of version app `app`."""
    shards = [serve.get_deployment_handle(shard_name(s), app) for s in range(view.nshards)]
    return shards, serve.get_deployment_handle("encoder", app) if view.text else None

"""A router replica's side of the swap: it follows the keeper (shards/serve/keeper.py) and holds the
version each of its requests is answered from.

Every FOLLOW_S the replica asks the keeper for the version served; when it changed, it acquires the
new app, loads its IndexView (the coarse quantizer, the routing) beside the one it serves, and
switches one reference. A request holds the Live it started with (Live.held), and the replaced one
is released to the keeper when its last request ends, so the keeper deletes an app no replica uses.
"""
from __future__ import annotations

import asyncio

from shards.raytools import as_coroutine, one_line
from shards.search.router import IndexView
from shards.serve.swap import DRAIN_SECONDS, Live, handles
from shards.storage.store import Store

FOLLOW_S = 0.25             # how often a router replica asks the keeper which version is served


class Follower:
    """The Live version one router replica serves (`live`), and what the keeper last said."""

    def __init__(self, keeper, store: Store, filter_fields):
        self.keeper, self.store, self.filter_fields = keeper, store, filter_fields
        self.live: Live | None = None
        self.state: dict = {}
        self.error: str | None = None       # this replica's own failure to follow (the keeper unreachable)
        self.lock = asyncio.Lock()

    @property
    def load_error(self) -> str | None:
        return self.state.get("load_error") or self.error

    async def follow(self) -> None:
        while True:
            try:
                await self.refresh()
                self.error = None
            except Exception as e:  # noqa: BLE001 - reported by /health; the version held serves on
                self.error = one_line(e)
            await asyncio.sleep(FOLLOW_S)

    async def refresh(self) -> None:
        """Switch to the keeper's version if it is not the one served."""
        self.state = await as_coroutine(self.keeper.state.remote())
        if self.state["version"] is None or (self.live is not None and self.live.version == self.state["version"]):
            return
        async with self.lock:
            st = await as_coroutine(self.keeper.acquire.remote())
            old = self.live
            try:
                view = await asyncio.to_thread(IndexView, self.store, st["version"], self.filter_fields,
                                               old.view if old else None)
            except BaseException:
                await as_coroutine(self.keeper.release.remote(st["app"]))
                raise
            self.live, self.state = Live(view, st["app"], *handles(st["app"], view), loaded_at=st["loaded_at"]), st
        if old is not None:
            asyncio.get_running_loop().create_task(self._release(old))

    async def _release(self, old: Live) -> None:
        """Give a replaced version back once its last request here is done (or DRAIN_SECONDS passed)."""
        try:
            await asyncio.wait_for(old.idle.wait(), DRAIN_SECONDS)
        except asyncio.TimeoutError:
            pass
        await as_coroutine(self.keeper.release.remote(old.app))

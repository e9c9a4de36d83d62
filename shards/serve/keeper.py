"""The router app's version keeper: one replica that deploys, checks and deletes the version apps
(shards/serve/swap.py's Versions), so that any number of router replicas can serve beside it.

    <name>      router      --router-replicas replicas: HTTP, batching, coarse search, fan-out, merge
                versions    one replica, no CPU: CURRENT followed, version apps deployed and deleted

A router replica asks `state()` every FOLLOW_S and, when the version changed, `acquire()`s the new
app and `release()`s the old one once its last request there ended (shards/serve/follow.py).
"""
import asyncio

from ray import serve

from shards.config import ServeConfig
from shards.errors import SearchError, ShardexError
from shards.serve.metrics import Metrics
from shards.serve.swap import Versions
from shards.storage.manifest import current_version
from shards.storage.store import Store


# Router replicas ask it every FOLLOW_S: no access log line for each of those calls.
@serve.deployment(name="versions", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                  graceful_shutdown_timeout_s=5, logging_config={"enable_access_log": False})
class VersionKeeper:
    def __init__(self, settings: dict):
        cfg = ServeConfig(**{k: v for k, v in settings.items() if k != "token_sha256"})
        self.store = Store(cfg.index_root, cfg.s3_endpoint)
        self.versions = Versions(cfg, self.store, Metrics(cfg.name))
        self._watcher = asyncio.get_running_loop().create_task(self.versions.watch())

    async def state(self) -> dict:
        return self.versions.state()

    async def acquire(self) -> dict:
        return self.versions.acquire()

    async def release(self, app: str) -> None:
        await self.versions.release(app)

    async def reload(self) -> dict:
        """Read CURRENT now and swap to it: {"switched"} or {"error", "field"} (503 at the router)."""
        try:
            v = await asyncio.to_thread(current_version, self.store)
        except ShardexError as e:
            return {"error": f"current: {e}", "field": "current"}
        try:
            return {"switched": await self.versions.swap_to(v)}
        except SearchError as e:
            return {"error": str(e), "field": "version"}

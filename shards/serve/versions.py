"""The version apps: one Serve application per loaded version, its deployments, its name, deploy and delete.

    <name>--<version>      no HTTP route of its own:
                             shard-0 .. shard-{S-1}   one deployment per shard, --replicas each
                             encoder                  text indexes only: the index's own encoder
                             version                  the app's (empty) ingress

The router (shards/serve/http.py) deploys one beside the version it serves and swaps to it, or,
when the next version keeps the trained index and the shape, swaps in place: the app's shard
replicas load the next version beside the one they serve, from its new segments only
(shards/serve/swap.py); concurrent text queries are encoded as one batch (@serve.batch on the encoder).
"""
import asyncio
import threading
import time

import numpy as np
from ray import serve

from shards.config import ServeConfig
from shards.errors import SearchError
from shards.raytools import last_raised, wait_until
from shards.resources import Resources, replicas_per_node, shard_memory
from shards.search.fanout import shard_name
from shards.search.router import IndexView
from shards.storage.manifest import load_manifest
from shards.storage.store import Store

APP_SEP = "--"


def app_name(name: str, version: str) -> str:
    return f"{name}{APP_SEP}{version}"


@serve.deployment(max_ongoing_requests=32, graceful_shutdown_timeout_s=5, max_constructor_retry_count=2,
                  health_check_period_s=5)
class ShardDeployment:
    """One shard, from the version its app was deployed for on. A request names the version it
    searches; a version that shares segments with one held is loaded beside it from what is new
    (shards/search/held.py), so the router can swap in place. Searches run one at a time in a
    thread (faiss uses the threads); a load does not stop them."""

    def __init__(self, index_root: str, s3_endpoint: str | None, version: str, s: int, kinds: dict,
                 threads: int):
        from shards.search.held import HeldShard

        store = Store(index_root, s3_endpoint)
        self.s, self.version = s, first_version(store, version)
        self.held = HeldShard(store, s, kinds, threads)
        self.held.get(self.version)
        self.lock = threading.Lock()

    def _search(self, xq, k, nprobe, flt, coarse, version, refine):
        sr = self.held.get(version or self.version)
        with self.lock:
            return sr.search(xq, k, nprobe, flt, coarse, refine)

    async def search(self, xq: np.ndarray, k: int, nprobe: int | None, flt: list | None, coarse=None,
                     version: str | None = None, refine: int | None = None):
        return await asyncio.to_thread(self._search, xq, k, nprobe, flt, coarse, version, refine)

    async def fields(self, ids: np.ndarray, names: list[str], version: str | None = None) -> dict:
        """The stored fields of this shard's hits ids (its own fields files; no lock: no faiss call)."""
        return await asyncio.to_thread(self.held.get(version or self.version).lookup, ids, names)

    async def ping(self, version: str | None = None) -> dict:
        """This replica's shard of `version` (loaded if it is not held) and how its load went."""
        import ray

        v = version or self.version
        sr = await asyncio.to_thread(self.held.get, v)
        return {"shard": shard_name(self.s), "version": v, "ntotal": sr.ntotal(), "attribute_bytes": sr.attr_bytes,
                "load": self.held.loads.get(v), "replica": ray.get_runtime_context().get_actor_name()}


def first_version(store: Store, version: str) -> str:
    """The version a shard replica starts on: its app's, or CURRENT once that one is pruned (a replica
    Serve restarts after its app swapped in place to later versions and the first was let go)."""
    from shards.storage.manifest import current_version, vdir

    return version if store.exists(f"{vdir(version)}/manifest.json") else current_version(store)


def _texts(items: list) -> int:
    return sum(len(t) for t in items)


@serve.deployment(max_ongoing_requests=256, graceful_shutdown_timeout_s=5, max_constructor_retry_count=2)
class EncoderDeployment:
    """The version's own query encoder; concurrent requests' texts are encoded as one batch."""

    def __init__(self, index_root: str, s3_endpoint: str | None, version: str, threads: int, max_batch: int,
                 batch_wait_s: float):
        from shards.encoder import Encoder

        m = load_manifest(Store(index_root, s3_endpoint), version)
        self.encoder = Encoder.for_index(m.encoder, threads=threads)
        self.encode.set_max_batch_size(max_batch)
        self.encode.set_batch_wait_timeout_s(batch_wait_s)
        self.counts = {"requests": 0, "batches": 0, "texts": 0, "seconds": 0.0}

    @serve.batch(max_batch_size=1024, batch_wait_timeout_s=0.002, batch_size_fn=_texts)
    async def encode(self, batches: list[list[str]]) -> list[np.ndarray]:
        flat = [t for b in batches for t in b]
        self.counts["requests"] += len(batches)
        self.counts["batches"] += 1
        self.counts["texts"] += len(flat)
        t = time.perf_counter()
        x = await asyncio.to_thread(self.encoder.encode_queries, flat)
        self.counts["seconds"] += time.perf_counter() - t
        cuts = np.cumsum([len(b) for b in batches])[:-1]
        return np.split(x, cuts)

    async def ping(self) -> dict:
        return {"encoder": self.encoder.name, **self.counts}


@serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=2)
class VersionIngress:
    """The version app's ingress: it binds the shards and the encoder into one application."""

    def __init__(self, version: str, *parts):
        self.version = version

    async def ping(self) -> str:
        return self.version


def version_app(cfg: ServeConfig, view: IndexView, res: Resources, nodes: int):
    """The app of view's version: each shard's replicas ask for its memory (resources.shard_memory) and
    are spread over the `nodes` the cluster has (resources.replicas_per_node)."""
    v, S = view.version, view.nshards
    common = dict(index_root=cfg.index_root, s3_endpoint=cfg.s3_endpoint, version=v)
    per_node = replicas_per_node(cfg.replicas, nodes)
    spread = {"max_replicas_per_node": per_node} if per_node else {}
    shards = [ShardDeployment.options(name=shard_name(s), num_replicas=cfg.replicas, **spread,
                                      ray_actor_options={"num_cpus": res.shard_cpus, "memory": _memory(view, s)})
              .bind(s=s, kinds=view.kinds, threads=res.threads, **common) for s in range(S)]
    parts = list(shards)
    if view.text:
        parts.append(EncoderDeployment.options(name="encoder", num_replicas=cfg.encoder_replicas,
                                               ray_actor_options={"num_cpus": res.encoder_cpus})
                     .bind(threads=res.encoder_threads, max_batch=cfg.max_queries,
                           batch_wait_s=cfg.batch_wait_ms / 1000, **common))
    return VersionIngress.options(name="version").bind(v, *parts)


def _memory(view: IndexView, s: int) -> int:
    info = view.manifest.shards[s]
    return shard_memory(info.ram_bytes, info.live, len(view.kinds))


def deploy_version(target, name: str, timeout: float) -> None:
    """Deploy an app beside the others and wait until all its replicas run (blocking)."""
    from ray.serve.api import RunTarget

    # Shard and encoder calls are internal, one per request per shard: no access log for them.
    serve.run_many([RunTarget(target=target, name=name, route_prefix=None,
                              logging_config={"enable_access_log": False})], wait_for_applications_running=False)
    try:
        if not wait_until(lambda: _running(name), timeout):
            raise SearchError(f"{name}: not running after {timeout:g} s (not enough CPUs for two versions side "
                              "by side? see --shard-cpus)")
    except SearchError:
        delete_app(name)
        raise


def _running(name: str) -> bool:
    """Whether app `name` runs; a failed deploy raises, naming the cause."""
    st = serve.status().applications.get(name)
    if st is not None and st.status == "DEPLOY_FAILED":
        raise SearchError(f"{name}: {_deploy_message(st)}")
    return st is not None and st.status == "RUNNING"


def _deploy_message(st) -> str:
    msgs = [f"{d}: {o.message}" for d, o in st.deployments.items() if o.message and o.status != "HEALTHY"]
    text = "; ".join(msgs) or st.message or "deploy failed"
    # A replica's constructor error arrives as a traceback: keep the error it ends with, which names the cause.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return last_raised(text) or (lines[-1] if lines else text)


def delete_app(name: str) -> None:
    """Delete a Serve app and wait until it is gone; one already gone is no error."""
    try:
        serve.delete(name, _blocking=True)
    except Exception:  # noqa: BLE001 (already gone)
        pass

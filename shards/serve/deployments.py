"""`shardex serve`: the router and the shards of the CURRENT version as a Ray Serve app.

Applications on the Serve instance:

    <name>                 the router: a FastAPI ingress (POST /search, GET /health, GET /version,
                           GET /stats, POST /admin/reload, GET /openapi.json), one replica
    <name>--<version>      one per loaded version, no HTTP route of its own:
                             shard-0 .. shard-{S-1}   one deployment per shard, --replicas each
                             encoder                  text indexes only: the index's own encoder
                             version                  the app's (empty) ingress

The router loads a version by deploying its app beside the one being served, waiting
until every replica is up, and then replacing one reference: a request holds the
version it started with until it ends, so every response names the version that
answered it. The old app is deleted once its last request is done.

Requests are batched twice: concurrent /search calls are merged into one fan-out per
(k, nprobe, filter) (@serve.batch on the router), and concurrent text queries into
one encoder call (@serve.batch on the encoder).
"""
# No `from __future__ import annotations`: Serve pickles the deployment classes by value when they
# are decorated, so FastAPI must see real annotation objects, not names to look up later.
import asyncio
import base64
import datetime as _dt
import decimal
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve

from shards.serve.api import ErrorResponse, SearchRequest, SearchResponse
from shards.config import ServeConfig
from shards.errors import QueryError, SearchError, ShardexError
from shards.storage.manifest import current_version, load_manifest, summary
from shards.serve.resources import Resources, cluster_cpus, plan_resources  # noqa: F401  (Resources: re-exported)
from shards.search.router import IndexView, _one_line, fan_out, shard_name
from shards.storage.store import Store, resolve_endpoint

MAX_CONCURRENT_BATCHES = 4  # fan-outs the router keeps in flight at once
MAX_QUERIES = 4096          # the most --max-queries may be: queries in one request and in one server batch
ENCODE_TIMEOUT_S = 60.0     # text queries of one server batch may take this long to encode
DRAIN_SECONDS = 60.0        # the longest an old version waits for its last requests before it is deleted
APP_SEP = "--"


def app_name(name: str, version: str) -> str:
    return f"{name}{APP_SEP}{version}"


# ---- the version app: shards, encoder --------------------------------------------------------


@serve.deployment(max_ongoing_requests=32, graceful_shutdown_timeout_s=5, max_constructor_retry_count=2,
                  health_check_period_s=5)
class ShardDeployment:
    """One shard of one version. Searches run one at a time in a thread (faiss uses the threads)."""

    def __init__(self, index_root: str, s3_endpoint: str | None, version: str, s: int, kinds: dict,
                 threads: int):
        from shards.search.searcher import ShardSearcher

        store = Store(index_root, s3_endpoint)
        m = load_manifest(store, version)
        self.s, self.version = s, version
        self.searcher = ShardSearcher(store, version, m.shards[s], threads)
        self.attr_bytes = self.searcher.load_attributes(store, m, kinds) if kinds else 0
        self.lock = threading.Lock()

    def _search(self, *a):
        with self.lock:
            return self.searcher.search(*a)

    async def search(self, xq: np.ndarray, k: int, nprobe: int | None, flt: list | None, coarse=None):
        return await asyncio.to_thread(self._search, xq, k, nprobe, flt, coarse)

    async def ping(self) -> dict:
        import ray

        return {"shard": shard_name(self.s), "version": self.version, "ntotal": self.searcher.ntotal(),
                "attribute_bytes": self.attr_bytes, "replica": ray.get_runtime_context().get_actor_name()}


def _texts(items: list) -> int:
    return sum(len(t) for t in items)


@serve.deployment(max_ongoing_requests=256, graceful_shutdown_timeout_s=5, max_constructor_retry_count=2)
class EncoderDeployment:
    """The version's own query encoder; concurrent requests' texts are encoded as one batch."""

    def __init__(self, index_root: str, s3_endpoint: str | None, version: str, threads: int, max_batch: int,
                 batch_wait_s: float):
        from shards.encoder import Encoder  # the one import of the builder: one encoder definition

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


def version_app(cfg: ServeConfig, view: IndexView, res: Resources):
    v, S = view.version, view.nshards
    common = dict(index_root=cfg.index_root, s3_endpoint=cfg.s3_endpoint, version=v)
    shards = [ShardDeployment.options(name=shard_name(s), num_replicas=cfg.replicas,
                                      ray_actor_options={"num_cpus": res.shard_cpus})
              .bind(s=s, kinds=view.kinds, threads=res.threads, **common) for s in range(S)]
    parts = list(shards)
    if view.text:
        parts.append(EncoderDeployment.options(name="encoder", num_replicas=cfg.encoder_replicas,
                                               ray_actor_options={"num_cpus": res.encoder_cpus})
                     .bind(threads=res.encoder_threads, max_batch=cfg.max_queries,
                           batch_wait_s=cfg.batch_wait_ms / 1000, **common))
    return VersionIngress.options(name="version").bind(v, *parts)


def deploy_version(target, name: str, timeout: float) -> None:
    """Deploy an app beside the others and wait until all its replicas run (blocking)."""
    from ray.serve.api import RunTarget

    # Shard and encoder calls are internal, one per request per shard: no access log for them.
    serve.run_many([RunTarget(target=target, name=name, route_prefix=None,
                              logging_config={"enable_access_log": False})], wait_for_applications_running=False)
    t0 = time.time()
    while True:
        st = serve.status().applications.get(name)
        status = st.status if st else "NOT_STARTED"
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED" or time.time() - t0 > timeout:
            why = _deploy_message(st) if status == "DEPLOY_FAILED" else f"not running after {timeout:g} s " \
                "(not enough CPUs for two versions side by side? see --shard-cpus)"
            _delete(name)
            raise SearchError(f"{name}: {why}")
        time.sleep(0.2)


def _deploy_message(st) -> str:
    msgs = [f"{d}: {o.message}" for d, o in st.deployments.items() if o.message and o.status != "HEALTHY"]
    text = "; ".join(msgs) or st.message or "deploy failed"
    # A replica's constructor error arrives as a traceback: keep its last line, which names the cause.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else text


async def _await(x):
    return await x


def _delete(name: str) -> None:
    try:
        serve.delete(name, _blocking=True)
    except Exception:  # already gone
        pass


# ---- the router ------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, error: str, field: str | None = None, **extra):
        self.status, self.error, self.field, self.extra = status, error, field, extra


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (_dt.date, _dt.datetime, _dt.time)):
        return o.isoformat()
    if isinstance(o, decimal.Decimal):
        return float(o)
    if isinstance(o, (bytes, bytearray)):
        return base64.b64encode(o).decode()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


class Json(JSONResponse):
    """JSON of any stored field type (dates, decimals, bytes), never a 500 for a value."""

    def render(self, content) -> bytes:
        return json.dumps(content, default=_json_default, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode()


def _error(code: int, error: str, field: str | None = None, **extra) -> Json:
    return Json({"error": error, "field": field, **extra}, status_code=code,
                headers={"WWW-Authenticate": "Bearer"} if code == 401 else None)


api = FastAPI(title="shardex", version="1", description="Search a sharded faiss index: exact top-k over "
              "every shard a query needs, stored fields attached.")
bearer = HTTPBearer(auto_error=False, description="the token given to `shardex serve --token` (or $SHARDEX_TOKEN)")
ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
          422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    if first.get("type") == "json_invalid":
        return _error(400, f"body: malformed JSON ({first.get('ctx', {}).get('error', first['msg'])})", "body")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    name = ".".join(loc) or "body"
    msg = first["msg"].removeprefix("Value error, ")
    return _error(422, f"{name}: {msg}", name, errors=len(errs))


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return _error(exc.status, exc.error, exc.field, **exc.extra)


@dataclass
class Live:
    """A loaded version as the router holds it."""

    view: IndexView
    app: str
    shards: list
    encoder: object | None
    loaded_at: float = field(default_factory=time.time)
    inflight: int = 0

    @property
    def version(self) -> str:
        return self.view.version


@dataclass
class Job:
    live: Live
    xq: np.ndarray
    k: int
    nprobe: int | None
    flt: list | None

    def group(self):
        return (id(self.live), self.k, self.nprobe, json.dumps(self.flt, sort_keys=True))


def _job_size(jobs: list[Job]) -> int:
    return sum(len(j.xq) for j in jobs)


@serve.deployment(max_ongoing_requests=MAX_QUERIES * MAX_CONCURRENT_BATCHES, ray_actor_options={"num_cpus": 0.1},
                  graceful_shutdown_timeout_s=5)
@serve.ingress(api)
class RouterDeployment:
    def __init__(self, settings: dict):
        token_sha = settings.pop("token_sha256", None)
        self.cfg = ServeConfig(**settings)
        self.token_sha = token_sha
        self.store = Store(self.cfg.index_root, self.cfg.s3_endpoint)
        self.live: Live | None = None
        self.load_error: str | None = None
        self.failed_version: str | None = None
        self.swap_lock = asyncio.Lock()
        self.stats = {"requests": 0, "queries": 0, "fanouts": 0, "batches": 0, "partial": 0, "swaps": 0,
                      "encode_s": 0.0, "search_s": 0.0, "fields_s": 0.0}  # time inside each step, summed
        self._search_batch.set_max_batch_size(self.cfg.max_queries)
        self._search_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_ms / 1000)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    # -- auth ---------------------------------------------------------------------------

    def _auth(self, cred: HTTPAuthorizationCredentials | None, admin: bool = False) -> None:
        if self.token_sha is None:
            if admin:
                raise ApiError(403, "authorization: admin endpoints are off; start serve with --token "
                               "(or $SHARDEX_TOKEN) to use them", "authorization")
            return
        if cred is None or cred.scheme.lower() != "bearer":
            raise ApiError(401, "authorization: send 'Authorization: Bearer <token>'", "authorization")
        got = hashlib.sha256(cred.credentials.encode()).hexdigest()
        if not hmac.compare_digest(got, self.token_sha):
            raise ApiError(401, "authorization: wrong token", "authorization")

    def _serving(self) -> Live:
        if self.live is None:
            raise ApiError(503, f"version: none loaded yet ({self.load_error or 'loading'})", "version")
        return self.live

    # -- endpoints ----------------------------------------------------------------------

    @api.post("/search", response_model=SearchResponse, responses=ERRORS)
    async def search(self, req: SearchRequest, cred: HTTPAuthorizationCredentials | None = Security(bearer)):
        t0 = time.perf_counter()
        self._auth(cred)
        live = self._serving()
        live.inflight += 1
        try:
            return await self._search(live, req, t0)
        except QueryError as e:
            raise ApiError(422, str(e), e.field) from None
        finally:
            live.inflight -= 1

    async def _search(self, live: Live, req: SearchRequest, t0: float):
        if (req.queries is None) == (req.vectors is None):
            raise QueryError("queries", "give either queries (text) or vectors, not both and not neither")
        n = len(req.queries if req.queries is not None else req.vectors)
        what = "queries" if req.queries is not None else "vectors"
        if n > self.cfg.max_queries:
            raise ApiError(413, f"{what}: {n} in one request, at most {self.cfg.max_queries}; split the batch",
                           what)
        nprobe, flt = live.view.check(req.k, req.nprobe, req.fields, req.filter_spec())
        t = time.perf_counter()
        xq = await self._encode(live, req.queries) if req.queries is not None else live.view.vectors(req.vectors)
        t, self.stats["encode_s"] = time.perf_counter(), self.stats["encode_s"] + time.perf_counter() - t
        self.stats["requests"] += 1
        self.stats["queries"] += n
        out = await self._search_batch(Job(live, xq, req.k, nprobe, flt))
        t, self.stats["search_s"] = time.perf_counter(), self.stats["search_s"] + time.perf_counter() - t
        if isinstance(out, BaseException):
            raise out
        if out.failed:
            self.stats["partial"] += 1
            if self.cfg.require_all_shards:
                missing = [shard_name(s) for s in sorted(out.failed)]
                raise ApiError(503, "shards: " + "; ".join(out.failed[s] for s in sorted(out.failed)), "shards",
                               missing=missing, version=live.version)
        hits = await asyncio.to_thread(live.view.attach, out.D, out.I, req.fields)
        results = [[h.as_dict() for h in hs] for hs in hits]
        self.stats["fields_s"] += time.perf_counter() - t
        return Json({"version": live.version, "results": results, "shards": out.report(),
                     "took_ms": round((time.perf_counter() - t0) * 1000, 3)})

    async def _encode(self, live: Live, texts: list[str]) -> np.ndarray:
        if live.encoder is None:
            raise QueryError("queries", "this index was built from precomputed vectors; send \"vectors\"")
        try:
            x = await asyncio.wait_for(_await(live.encoder.encode.remote(texts)), ENCODE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ApiError(503, f"encoder: no answer within {ENCODE_TIMEOUT_S:g} s", "queries") from None
        except Exception as e:
            raise ApiError(503, f"encoder: {_one_line(e)}", "queries") from None
        return np.ascontiguousarray(x, dtype=np.float32)

    @serve.batch(max_batch_size=MAX_QUERIES, batch_wait_timeout_s=0.002, max_concurrent_batches=MAX_CONCURRENT_BATCHES,
                 batch_size_fn=_job_size)
    async def _search_batch(self, jobs: list[Job]) -> list:
        """Concurrent requests with the same version, k, nprobe and filter share one fan-out."""
        self.stats["batches"] += 1
        groups: dict = {}
        for i, j in enumerate(jobs):
            groups.setdefault(j.group(), []).append(i)
        results: list = [None] * len(jobs)

        async def one(idx: list[int]):
            j0 = jobs[idx[0]]
            xq = j0.xq if len(idx) == 1 else np.concatenate([jobs[i].xq for i in idx])
            self.stats["fanouts"] += 1
            try:
                out = await fan_out(j0.live.view, xq, j0.k, j0.nprobe, j0.flt, self._caller(j0.live),
                                    self.cfg.shard_timeout)
            except Exception as e:  # noqa: BLE001 - handed to each waiting request, which raises it
                for i in idx:
                    results[i] = e
                return
            a = 0
            for i in idx:
                b = a + len(jobs[i].xq)
                results[i] = out.slice(a, b)
                a = b

        await asyncio.gather(*[one(idx) for idx in groups.values()])
        return results

    @staticmethod
    def _caller(live: Live):
        def call(s, xq, k, nprobe, flt, coarse):
            return live.shards[s].search.remote(xq, k, nprobe, flt, coarse)
        return call

    @api.get("/health", responses={503: {"model": ErrorResponse}})
    async def health(self):
        """200 when every shard of the served version answers; 503 naming the missing ones."""
        live = self.live
        if live is None:
            return _error(503, f"version: none loaded yet ({self.load_error or 'loading'})", "version",
                          status="loading", missing=[])
        names = [shard_name(s) for s in range(live.view.nshards)] + (["encoder"] if live.encoder else [])
        handles = list(live.shards) + ([live.encoder] if live.encoder else [])
        pings = await asyncio.gather(*[asyncio.wait_for(_await(h.ping.remote()), self.cfg.shard_timeout)
                                       for h in handles], return_exceptions=True)
        missing = [n for n, p in zip(names, pings) if isinstance(p, BaseException)]
        body = {"status": "ok" if not missing else "degraded", "version": live.version,
                "shards": live.view.nshards, "missing": missing}
        if self.load_error:
            body["reload_error"] = self.load_error
        if missing:
            return _error(503, f"shards: {', '.join(missing)} not answering", "shards", **body)
        return Json(body)

    @api.get("/version", responses={401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def version(self, cred: HTTPAuthorizationCredentials | None = Security(bearer)):
        """The manifest summary of the version being served, and how it is served."""
        self._auth(cred)
        live = self._serving()
        return Json({**summary(live.view.manifest), "serving": {
            "app": live.app, "routing": live.view.mode, "shards": live.view.nshards,
            "replicas": self.cfg.replicas, "filter_fields": live.view.kinds, "text_queries": live.view.text,
            "loaded_at": live.loaded_at}})

    @api.get("/stats", responses={401: {"model": ErrorResponse}})
    async def stats(self, cred: HTTPAuthorizationCredentials | None = Security(bearer)):
        """Counters since start: requests, queries, server batches and fan-outs, partial answers, swaps,
        and the seconds requests spent encoding, searching (batch wait included) and reading fields."""
        self._auth(cred)
        return Json({**self.stats, "version": self.live.version if self.live else None})

    @api.post("/admin/reload", responses=ERRORS)
    async def reload(self, cred: HTTPAuthorizationCredentials | None = Security(bearer)):
        """Read CURRENT now; if it names another version, load it beside the served one and switch."""
        self._auth(cred, admin=True)
        try:
            v = await asyncio.to_thread(current_version, self.store)
        except ShardexError as e:
            raise ApiError(503, f"current: {e}", "current") from None
        prev = self.live.version if self.live else None
        try:
            switched = await self._swap_to(v)
        except ShardexError as e:
            raise ApiError(503, f"version: {e}; still serving {prev}", "version") from None
        return Json({"version": self.live.version, "previous": prev, "switched": switched})

    # -- versions -------------------------------------------------------------------------

    async def status(self) -> dict:
        """For `shardex serve`: which version is served, and the last load error."""
        return {"version": self.live.version if self.live else None, "error": self.load_error}

    async def _watch(self) -> None:
        """Load CURRENT, then follow it every poll_seconds (0: only the first load)."""
        while True:
            v = None
            try:
                v = await asyncio.to_thread(current_version, self.store)
                if v != self.failed_version:
                    await self._swap_to(v)
            except Exception as e:  # noqa: BLE001 - reported by /health and status(); the old version serves on
                self.load_error = _one_line(e) if not isinstance(e, ShardexError) else str(e)
                self.failed_version = v
            if self.cfg.poll_seconds == 0 and self.live is not None:
                return
            await asyncio.sleep(self.cfg.poll_seconds or 5.0)

    async def _swap_to(self, version: str) -> bool:
        async with self.swap_lock:
            if self.live is not None and self.live.version == version:
                return False
            try:
                new = await self._load(version)
            except Exception as e:
                self.failed_version = version
                self.load_error = str(e) if isinstance(e, ShardexError) else _one_line(e)
                raise SearchError(self.load_error) from None
            old, self.live = self.live, new  # the switch: one reference, read once by each request
            self.load_error, self.failed_version = None, None
            self.stats["swaps"] += old is not None
        if old is not None:
            asyncio.get_running_loop().create_task(self._release(old))
        return True

    async def _load(self, version: str) -> Live:
        view = await asyncio.to_thread(IndexView, self.store, version, self.cfg.filter_fields)
        res = self._resources(view)
        name = app_name(self.cfg.name, version)
        await asyncio.to_thread(deploy_version, version_app(self.cfg, view, res), name, self.cfg.load_timeout)
        shards = [serve.get_deployment_handle(shard_name(s), name) for s in range(view.nshards)]
        enc = serve.get_deployment_handle("encoder", name) if view.text else None
        live = Live(view, name, shards, enc)
        pings = await asyncio.gather(*[_await(h.ping.remote()) for h in shards], return_exceptions=True)
        bad = [f"{shard_name(s)}: {_one_line(p)}" for s, p in enumerate(pings) if isinstance(p, BaseException)]
        if bad:
            await asyncio.to_thread(_delete, name)
            raise SearchError(f"{name}: " + "; ".join(bad))
        return live

    def _resources(self, view: IndexView) -> Resources:
        return plan_resources(*cluster_cpus(), view.nshards, self.cfg.replicas, self.cfg.encoder_replicas,
                              view.text, self.cfg.shard_cpus, self.cfg.threads)

    async def _release(self, old: Live) -> None:
        """Delete a replaced version once its last request is done (or DRAIN_SECONDS passed)."""
        t0 = time.time()
        while old.inflight and time.time() - t0 < DRAIN_SECONDS:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(_delete, old.app)


# ---- start, wait, stop --------------------------------------------------------------------------


def settings(cfg: ServeConfig) -> dict:
    """What the router replica gets: the config, with the token as its sha256 only, and the S3
    endpoint of this process (AWS_ENDPOINT_URL), which Ray workers elsewhere may not have."""
    d = cfg.model_dump(exclude={"token"})
    if cfg.index_root.startswith("s3://"):
        d["s3_endpoint"] = resolve_endpoint(cfg.s3_endpoint)
    d["token_sha256"] = hashlib.sha256(cfg.token.get_secret_value().encode()).hexdigest() if cfg.token else None
    return d


def start(cfg: ServeConfig):
    """Start Serve's HTTP proxy on cfg.host:cfg.port (Ray must be initialised) and deploy the router."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(RouterDeployment.options(name="router").bind(settings(cfg)), name=cfg.name,
                     route_prefix=cfg.route_prefix)


def wait_ready(handle, timeout: float) -> str:
    """Block until the router serves a version; raise with the load error if it cannot."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = handle.status.remote().result()
        if st["version"]:
            return st["version"]
        if st["error"]:
            raise SearchError(st["error"])
        time.sleep(0.2)
    raise SearchError(f"no version loaded after {timeout:g} s")


def stop(cfg: ServeConfig) -> None:
    """Delete the router and every version app it started."""
    apps = [a for a in serve.status().applications if a == cfg.name or a.startswith(cfg.name + APP_SEP)]
    for a in apps:  # every delete asked for at once: a stop cut short (`ray job stop` waits 3 s) still deletes all
        serve.delete(a, _blocking=False)
    for a in apps:
        _delete(a)

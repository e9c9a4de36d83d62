"""The router's HTTP side: the FastAPI app, its JSON responses and errors, the bearer token, the endpoints.

    <name>      router: a FastAPI ingress (POST /search, GET /health, GET /version, GET /stats,
                POST /admin/reload, GET /openapi.json, GET /docs), --router-replicas replicas
                versions: the keeper of the version served (shards/serve/keeper.py), one replica

Each router replica answers each request with the version it holds (shards/serve/follow.py), batches
concurrent searches into shared fan-outs (shards/serve/batching.py) and reaches the
shards and the encoder of that version's app (shards/serve/versions.py).
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
import time

import numpy as np
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve

from shards.config import ServeConfig
from shards.errors import QueryError
from shards.raytools import as_coroutine, one_line
from shards.search.fanout import shard_fields, shard_name
from shards.serve.api import ErrorResponse, SearchRequest, SearchResponse
from shards.serve.batching import MAX_CONCURRENT_BATCHES, MAX_QUERIES, Job, group, job_size, search_groups
from shards.serve.follow import Follower
from shards.serve.metrics import Metrics
from shards.serve.swap import Live
from shards.storage.faissio import faiss
from shards.storage.manifest import summary
from shards.storage.store import Store

ENCODE_TIMEOUT_S = 60.0     # text queries of one server batch may take this long to encode


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


# docs_url, redoc_url off: FastAPI's pages load their scripts from a CDN; /docs below is offline.
api = FastAPI(title="shardex", version="1", description="Search a sharded faiss index: exact top-k over "
              "every shard a query needs, stored fields attached.", docs_url=None, redoc_url=None)
bearer = HTTPBearer(auto_error=False, description="the token given to `shardex serve --token` (or $SHARDEX_TOKEN)")
ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
          422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


# What each endpoint asks of the bearer token (checked by TokenFirst); the rest (/health, /docs) are open.
AUTH = {"/search": "token", "/version": "token", "/stats": "token", "/admin/reload": "admin"}
TOKEN = [Security(bearer)]   # on those endpoints: the scheme in /openapi.json; TokenFirst does the checking


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


def authorize(token_sha: str | None, cred: HTTPAuthorizationCredentials | None, admin: bool = False) -> None:
    """Raise ApiError unless the bearer token hashes to token_sha (no token set: open, admin endpoints off)."""
    if token_sha is None:
        if admin:
            raise ApiError(403, "authorization: admin endpoints are off; start serve with --token "
                           "(or $SHARDEX_TOKEN) to use them", "authorization")
        return
    if cred is None or cred.scheme.lower() != "bearer":
        raise ApiError(401, "authorization: send 'Authorization: Bearer <token>'", "authorization")
    got = hashlib.sha256(cred.credentials.encode()).hexdigest()
    if not hmac.compare_digest(got, token_sha):
        raise ApiError(401, "authorization: wrong token", "authorization")


def credentials(headers: list[tuple[bytes, bytes]]) -> HTTPAuthorizationCredentials | None:
    """The Authorization header of an ASGI scope's headers, as HTTPBearer reads it."""
    value = next((v.decode("latin-1") for k, v in headers if k == b"authorization"), "")
    scheme, _, token = value.strip().partition(" ")
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip()) if scheme and token else None


def route_path(scope: dict) -> str:
    """The path the app routes on: the request's, less the route prefix Serve mounts it under (root_path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


class TokenFirst:
    """ASGI middleware, run before FastAPI reads a body: the token of the endpoints in AUTH is checked
    first (no token and a bad body is a 401, never a 422 that tells a stranger about the API), and
    a POST body is JSON whatever its Content-Type says (`curl -d` sends form encoding)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            need = AUTH.get(route_path(scope))
            if need:
                router = serve.get_replica_context().servable_object
                try:
                    authorize(router.token_sha, credentials(scope["headers"]), admin=need == "admin")
                except ApiError as e:
                    return await _error(e.status, e.error, e.field)(scope, receive, send)
            if scope["method"] == "POST":
                scope = {**scope, "headers": [*(h for h in scope["headers"] if h[0] != b"content-type"),
                                              (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


api.add_middleware(TokenFirst)


@api.get("/docs", include_in_schema=False, response_class=HTMLResponse)
async def docs(request: Request):
    """The API's reference, rendered here from /openapi.json: no script, nothing fetched from elsewhere."""
    from shards.serve.docs import page

    return HTMLResponse(page(request.app.openapi()))


@serve.deployment(max_ongoing_requests=MAX_QUERIES * MAX_CONCURRENT_BATCHES, ray_actor_options={"num_cpus": 0.1},
                  graceful_shutdown_timeout_s=5)
@serve.ingress(api)
class RouterDeployment:
    def __init__(self, settings: dict, keeper):
        settings = dict(settings)
        self.token_sha = settings.pop("token_sha256", None)
        self.cfg = ServeConfig(**settings)
        self.store = Store(self.cfg.index_root, self.cfg.s3_endpoint)
        self.stats = {"requests": 0, "queries": 0, "fanouts": 0, "batches": 0, "partial": 0,
                      "encode_s": 0.0, "search_s": 0.0, "fields_s": 0.0}  # time inside each step, summed
        self.metrics = Metrics(self.cfg.name)
        self.keeper = keeper
        self.follower = Follower(keeper, self.store, self.cfg.filter_fields)
        faiss().omp_set_num_threads(max(1, int(self.cfg.router_cpus)))  # the coarse search: this replica's CPUs
        self._search_batch.set_max_batch_size(self.cfg.max_queries)
        self._search_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_ms / 1000)
        self._watcher = asyncio.get_running_loop().create_task(self.follower.follow())

    def _serving(self) -> Live:
        live = self.follower.live
        if live is None:
            raise ApiError(503, f"version: none loaded yet ({self.follower.load_error or 'loading'})", "version")
        return live

    # -- endpoints ----------------------------------------------------------------------

    @api.post("/search", response_model=SearchResponse, responses=ERRORS, dependencies=TOKEN)
    async def search(self, req: SearchRequest):
        """The top k of each query over every shard it needs, with the stored fields of the hits."""
        t0, code, body = time.perf_counter(), 500, None
        try:
            with self._serving().held() as live:
                try:
                    body = await self._search(live, req, t0)
                except QueryError as e:
                    raise ApiError(422, str(e), e.field) from None
            code = 200
            return Json(body)
        except ApiError as e:
            code = e.status
            raise
        finally:
            n = len(req.queries if req.queries is not None else req.vectors or [])
            self.metrics.search(code, n, time.perf_counter() - t0, body and body["shards"])

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
        out = await self._search_batch(Job(live, xq, req.k, nprobe, flt, live.view.refine(req.refine, req.k)))
        t, self.stats["search_s"] = time.perf_counter(), self.stats["search_s"] + time.perf_counter() - t
        if isinstance(out, BaseException):
            raise out
        # a shard that answered the search but not for its hits' fields is missing too
        docs = None if out.failed and self.cfg.require_all_shards else \
            await shard_fields(live.view, out, req.fields, live.fields, self.cfg.shard_timeout)
        if out.failed:
            self.stats["partial"] += 1
            if self.cfg.require_all_shards:
                missing = [shard_name(s) for s in sorted(out.failed)]
                raise ApiError(503, "shards: " + "; ".join(out.failed[s] for s in sorted(out.failed)), "shards",
                               missing=missing, version=live.version)
        hits = await asyncio.to_thread(live.view.attach, out.D, out.I, req.fields, docs)
        results = [[h.as_dict() for h in hs] for hs in hits]
        self.stats["fields_s"] += time.perf_counter() - t
        return {"version": live.version, "results": results, "shards": out.report(),
                "took_ms": round((time.perf_counter() - t0) * 1000, 3)}

    async def _encode(self, live: Live, texts: list[str]) -> np.ndarray:
        if live.encoder is None:
            raise QueryError("queries", "this index was built from precomputed vectors; send \"vectors\"")
        try:
            x = await asyncio.wait_for(as_coroutine(live.encoder.encode.remote(texts)), ENCODE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ApiError(503, f"encoder: no answer within {ENCODE_TIMEOUT_S:g} s", "queries") from None
        except Exception as e:  # noqa: BLE001  (the encoder's failure, whatever it is, is a 503 naming it)
            raise ApiError(503, f"encoder: {one_line(e)}", "queries") from None
        return np.ascontiguousarray(x, dtype=np.float32)

    @serve.batch(max_batch_size=MAX_QUERIES, batch_wait_timeout_s=0.002, max_concurrent_batches=MAX_CONCURRENT_BATCHES,
                 batch_size_fn=job_size)
    async def _search_batch(self, jobs: list[Job]) -> list:
        """Concurrent requests with the same version, k, nprobe and filter share one fan-out."""
        groups = group(jobs)
        self.stats["batches"] += 1
        self.stats["fanouts"] += len(groups)
        return await search_groups(jobs, groups, self.cfg.shard_timeout)

    @api.get("/health", responses={503: {"model": ErrorResponse}})
    async def health(self):
        """200 when every shard of the served version answers; 503 naming the missing ones."""
        live, load_error = self.follower.live, self.follower.load_error
        if live is None:
            return _error(503, f"version: none loaded yet ({load_error or 'loading'})", "version",
                          status="loading", missing=[])
        names = [shard_name(s) for s in range(live.view.nshards)] + (["encoder"] if live.encoder else [])
        handles = list(live.shards) + ([live.encoder] if live.encoder else [])
        pings = await asyncio.gather(*[asyncio.wait_for(as_coroutine(h.ping.remote()), self.cfg.shard_timeout)
                                       for h in handles], return_exceptions=True)
        missing = [n for n, p in zip(names, pings) if isinstance(p, BaseException)]
        body = {"status": "ok" if not missing else "degraded", "version": live.version,
                "shards": live.view.nshards, "missing": missing}
        if load_error:
            body["reload_error"] = load_error
        if missing:
            return _error(503, f"shards: {', '.join(missing)} not answering", "shards", **body)
        return Json(body)

    @api.get("/version", responses={401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
             dependencies=TOKEN)
    async def version(self):
        """The manifest summary of the version being served, and how it is served."""
        live = self._serving()
        return Json({**summary(live.view.manifest), "serving": {
            "app": live.app, "routing": live.view.mode, "shards": live.view.nshards,
            "replicas": self.cfg.replicas, "router_replicas": self.cfg.router_replicas,
            "filter_fields": live.view.kinds, "text_queries": live.view.text, "loaded_at": live.loaded_at}})

    @api.get("/stats", responses={401: {"model": ErrorResponse}}, dependencies=TOKEN)
    async def stats(self):
        """Counters since this router replica (`replica`) started: requests, queries, server batches and fan-outs,
        partial answers, the seconds requests spent encoding, searching (batch wait included) and
        reading fields; and the app's swaps (and those in place, by the served app's replicas) and
        how the last version loaded (last_load: in place or not, seconds, bytes its replicas read,
        segments they reused)."""
        st = self.follower.state
        return Json({**self.stats, "swaps": st.get("swaps", 0), "swaps_in_place": st.get("swaps_in_place", 0),
                     "last_load": st.get("last_load"), "version": self._version(),
                     "replica": serve.get_replica_context().replica_id.unique_id})

    @api.post("/admin/reload", responses=ERRORS, dependencies=TOKEN)
    async def reload(self):
        """Read CURRENT now; if it names another version, load it beside the served one and switch."""
        prev = self._version()
        r = await as_coroutine(self.keeper.reload.remote())
        await self.follower.refresh()   # this replica serves what it says before it answers; the others within FOLLOW_S
        if r.get("field") == "current":
            raise ApiError(503, r["error"], "current")
        if "error" in r:
            raise ApiError(503, f"version: {r['error']}; still serving {prev}", "version")
        return Json({"version": self._version(), "previous": prev, "switched": r["switched"]})

    async def status(self) -> dict:
        """For `shardex serve`: which version is served, and the last load error."""
        return {"version": self._version(), "error": self.follower.load_error}

    def _version(self) -> str | None:
        return self.follower.live.version if self.follower.live else None

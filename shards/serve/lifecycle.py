"""`shardex serve`'s process side: the router's settings, start it, wait until it serves, stop it and its versions."""
from __future__ import annotations

import hashlib

from ray import serve

from shards.config import ServeConfig
from shards.errors import SearchError
from shards.raytools import wait_until
from shards.serve.http import RouterDeployment
from shards.serve.keeper import VersionKeeper
from shards.serve.versions import APP_SEP, delete_app
from shards.storage.store import resolve_endpoint


def settings(cfg: ServeConfig) -> dict:
    """What the router replica gets: the config, with the token as its sha256 only, and the S3
    endpoint of this process (AWS_ENDPOINT_URL), which Ray workers elsewhere may not have."""
    d = cfg.model_dump(exclude={"token"})
    if cfg.index_root.startswith("s3://"):
        d["s3_endpoint"] = resolve_endpoint(cfg.s3_endpoint)
    d["token_sha256"] = hashlib.sha256(cfg.token.get_secret_value().encode()).hexdigest() if cfg.token else None
    return d


def router_app(cfg: ServeConfig):
    """The router application, bound to its settings (`shardex serve` and the Serve import path)."""
    st = settings(cfg)
    return RouterDeployment.options(name="router", num_replicas=cfg.router_replicas,
                                    ray_actor_options={"num_cpus": cfg.router_cpus}).bind(st, VersionKeeper.bind(st))


def start(cfg: ServeConfig):
    """Start Serve's HTTP proxy on cfg.host:cfg.port (Ray must be initialised) and deploy the router."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location=cfg.proxy_location)
    return serve.run(router_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix)


def wait_ready(handle, timeout: float) -> str:
    """Block until the router serves a version; raise with the load error if it cannot."""
    def served():
        st = handle.status.remote().result()
        if not st["version"] and st["error"]:
            raise SearchError(st["error"])
        return st["version"]

    version = wait_until(served, timeout)
    if version is None:
        raise SearchError(f"no version loaded after {timeout:g} s")
    return version


def stop(cfg: ServeConfig) -> None:
    """Delete the router and every version app it started."""
    apps = [a for a in serve.status().applications if a == cfg.name or a.startswith(cfg.name + APP_SEP)]
    for a in apps:  # every delete asked for at once: a stop cut short (`ray job stop` waits 3 s) still deletes all
        serve.delete(a, _blocking=False)
    for a in apps:
        delete_app(a)

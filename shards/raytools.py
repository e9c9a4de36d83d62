"""The little Ray glue every stage shares: connect, log, size, and unwrap task errors."""
from __future__ import annotations

import os
import sys
import time

import ray

_T0 = time.time()


def log(msg: str) -> None:
    """Progress on stderr (the summary goes to stdout); Ray job logs capture both."""
    print(f"[shardex {time.time() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def ensure_ray(address: str | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (or the job's), else start a local one."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    kw = {"address": address} if address else {"include_dashboard": False}
    ray.init(logging_level="warning", **kw)


def node_cpus() -> int:
    """CPUs of the largest alive node: the most threads one actor can have. At least 1: on a cluster
    whose head has num-cpus 0 and no worker up yet, a task asking for 0 CPUs would run on the head
    (and a thread count of 0 means nothing); asking for 1 waits for, or scales up, a worker."""
    return max(1, int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)))


def ray_get(refs):
    """ray.get, re-raising a task's own exception (a ShardexError keeps its one-line message)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise

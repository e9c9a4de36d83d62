"""The little Ray glue every stage shares: connect, log, size, wait, and unwrap and describe task errors.

Ray is imported where it is used: the router describes shard errors with one_line and stays light.
"""
from __future__ import annotations

import os
import re
import sys
import time

from shards.errors import ConfigError, TransientStorageError

_T0 = time.time()
# Every storage-touching Ray task: retried when its worker or node is lost (max_retries), and when
# storage kept failing for a passing reason through the client's own retries (retry_exceptions).
TASK_RETRIES = {"max_retries": 3, "retry_exceptions": [TransientStorageError]}


def log(msg: str) -> None:
    """Progress on stderr (the summary goes to stdout); Ray job logs capture both."""
    print(f"[shardex {time.time() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def ensure_ray(address: str | None = None) -> None:
    """Join the cluster at `address` or $RAY_ADDRESS (`--address`; a Ray job's own), else start a
    local one of this process's own, and log which. Never a plain ray.init(): it joins whatever
    cluster anyone last started on this machine with `ray start`, and dies with it."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        ray.init(address="local", include_dashboard=False, logging_level="warning")
        log(f"ray: started a local cluster of its own at {_gcs()} (join one with --address or $RAY_ADDRESS)")
        return
    try:
        ray.init(address=address, logging_level="warning")
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--address/$RAY_ADDRESS {address!r}: no Ray cluster joined there ({one_line(e)}); "
                          "give a running cluster's address (`ray status` prints it), or neither to start "
                          "a local one") from None
    log(f"ray: joined the cluster at {address}" + _gcs_of(address))


def _gcs() -> str | None:
    """The GCS address of the cluster this process is connected to (None through a Ray client)."""
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001  (a Ray client connection has no GCS address to show)
        return None


def _gcs_of(address: str) -> str:
    """' (GCS host:port)' when the address given was not already the GCS one (auto, ray://)."""
    gcs = _gcs()
    return "" if not gcs or gcs == address else f" (GCS {gcs})"


def node_cpus() -> int:
    """CPUs of the largest alive node: the most threads one actor can have. At least 1: on a cluster
    whose head has num-cpus 0 and no worker up yet, a task asking for 0 CPUs would run on the head
    (and a thread count of 0 means nothing); asking for 1 waits for, or scales up, a worker."""
    import ray

    return max(1, int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)))


def cluster_cpus() -> int:
    """CPUs of every alive node together (at least 1): how many one-CPU tasks can run at once."""
    import ray

    return max(1, int(sum(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])))


def ray_get(refs):
    """ray.get, re-raising a task's own exception (a ShardexError keeps its one-line message)."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


def one_line(e: BaseException, verbatim: type | tuple = ()) -> str:
    """An error in one line: the message itself of an error of a `verbatim` type (shardex's own errors
    are written to be read), else the type and first line of the error or, for the error of a Ray
    task or actor call, of the exception raised there (its `cause`)."""
    if isinstance(e, verbatim):
        return str(e)
    cause = getattr(e, "cause", None)
    e = cause if isinstance(cause, BaseException) else e
    if getattr(e, "_actor_init_failed", False) and (raised := last_raised(str(e))):
        return raised  # an actor's __init__ failed: Ray keeps only its text, whose last line is the error
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def last_raised(text: str) -> str | None:
    """The `module.Type: message` line a traceback ends with, as one_line writes it: shardex's own
    errors by their message alone."""
    for ln in reversed(text.strip().splitlines()):
        m = re.match(r"([\w.]+): (.+)$", ln.strip())
        if m and m.group(1).split(".")[-1].endswith(("Error", "Exception")):
            name, msg = m.groups()
            return msg if name.startswith("shards.errors.") else f"{name.split('.')[-1]}: {msg}"
    return None


def wait_until(ready, timeout: float, period: float = 0.2):
    """The first true value of ready(), asked every `period` seconds; None once `timeout` seconds
    have passed. ready() raises to stop waiting early (a failure that waiting cannot mend)."""
    t0 = time.monotonic()
    while not (got := ready()):
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(period)
    return got


async def as_coroutine(aw):
    """A coroutine of an awaitable (a Ray ObjectRef, a Serve DeploymentResponse), for wait_for and gather."""
    return await aw

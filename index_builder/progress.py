"""Progress a person can follow for hours: each long stage's units done of total, its rate and ETA,
logged at a steady pace and kept in INDEX_ROOT/_progress.json, which `shardex status` reads.

A build (or reindex) runs under `tracking(store, command)`; its Timer names the stages, and a stage
that waits on many Ray tasks does it through `gather(refs, what, unit)`. The record is the writer's
own (it holds the lease), rewritten at each stage's start and end and at each progress line, so a
killed build's record says where it was within one pace. SHARDEX_PROGRESS_S sets the pace.
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager

from index_builder.plan.capacity import duration
from shards.raytools import log, ray_get
from shards.storage.lease import LEASE, stale_reason
from shards.storage.store import Store

PROGRESS = "_progress.json"
PACE_S = 30.0  # seconds between a stage's progress lines


def pace() -> float:
    v = os.environ.get("SHARDEX_PROGRESS_S")
    try:
        return max(0.1, float(v)) if v else PACE_S
    except ValueError:
        from shards.errors import ConfigError

        raise ConfigError(f"SHARDEX_PROGRESS_S: {v!r} is not a number of seconds") from None


class Tracker:
    """The record of one running command: its stages done (seconds each), the stage now, its units."""

    def __init__(self, store: Store, command: str):
        self.store = store
        self.doc = {"command": command, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                    "updated": time.time(), "stage": None, "stages": {}, "units": None, "finished": None}

    def write(self, **kw) -> None:
        self.doc.update(kw, updated=time.time())
        try:
            self.store.write_text(PROGRESS, json.dumps(self.doc))
        except Exception as e:  # noqa: BLE001 - progress is for people: it never stops the build
            log(f"progress: could not write {self.store.uri(PROGRESS)} ({type(e).__name__}); going on")


_current: Tracker | None = None


@contextmanager
def tracking(store: Store, command: str):
    """The progress record of `command` on store's root for the block (nested: the outer one's)."""
    global _current
    if _current is not None:
        yield _current
        return
    _current = t = Tracker(store, command)
    t.write()
    try:
        yield t
        t.write(stage=None, units=None, finished=time.time(), outcome="done")
    except BaseException as e:
        t.write(finished=time.time(), outcome=f"failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                if str(e) else f"failed ({type(e).__name__})")
        raise
    finally:
        _current = None


def stage_started(name: str) -> None:
    if _current is not None:
        _current.write(stage=name, units=None, stage_started=time.time())


def stage_ended(name: str, secs: float) -> None:
    if _current is not None:
        _current.doc["stages"][name] = secs
        _current.write(stage=None, units=None)


class Progress:
    """One stage's units: add() as they finish; a line at the pace, and one at the end."""

    def __init__(self, what: str, total: int, unit: str, items: str | None = None, expect: float | None = None):
        self.what, self.total, self.unit, self.items_name, self.expect = what, total, unit, items, expect
        self.done, self.items, self.t0 = 0, 0, time.time()
        self.last, self.pace = self.t0, pace()

    def add(self, n: int = 1, items: int = 0) -> None:
        self.done += n
        self.items += items
        now = time.time()
        one_done = self.total == 1 and self.done  # one task: its stage's own line says when it ended
        if not one_done and (self.done >= self.total or now - self.last >= self.pace):
            self.last = now
            log(self.line(now))
            if _current is not None:
                _current.write(units=self.state(now))

    def tick(self) -> None:
        """No unit finished within a pace: say so, with the time it has been running."""
        if time.time() - self.last >= self.pace:
            self.add(0)

    def state(self, now: float) -> dict:
        el = max(now - self.t0, 1e-9)
        rate = self.done / el
        eta = (self.total - self.done) / rate if rate > 0 else None
        return {"what": self.what, "done": self.done, "total": self.total, "unit": self.unit,
                "items": self.items, "items_unit": self.items_name, "elapsed_s": round(el, 3),
                "rate": rate, "eta_s": None if eta is None else round(eta, 1), "expect_s": self.expect}

    def line(self, now: float | None = None) -> str:
        return describe(self.state(now or time.time()))


def describe(u: dict) -> str:
    """'add: 12/50 units (24%), 3.2 units/s, ETA 12 s'; at the end, the time it took."""
    if u["total"] == 1 and not u["done"]:  # one task (train, baseline): no units to count, only its time
        out, ex = f"{u['what']}: running, {duration(u['elapsed_s'])} in", u.get("expect_s")
        if not ex:
            return out
        left = ex - u["elapsed_s"]
        return out + (f", {duration(ex)} by the plan's rates, ETA {duration(left)}" if left > 0 else
                      f", past the {duration(ex)} the plan's rates give")
    pct = f" ({u['done'] / u['total']:.0%})" if u["total"] else ""
    out = f"{u['what']}: {u['done']:,}/{u['total']:,} {u['unit']}{pct}"
    if u.get("items"):
        out += f", {u['items']:,} {u['items_unit']} ({u['items'] / max(u['elapsed_s'], 1e-3):,.0f}/s)"
    elif u["rate"]:
        r = u["rate"]
        out += f", {r:,.2f} {u['unit']}/s" if r < 10 else f", {r:,.0f} {u['unit']}/s"
    if u["done"] >= u["total"]:
        return out + f", {duration(u['elapsed_s'])}"
    return out + (f", ETA {duration(u['eta_s'])}" if u["eta_s"] is not None else f", {duration(u['elapsed_s'])} in")


def gather(refs: list, what: str, unit: str, count=None, expect: float | None = None) -> list:
    """ray_get(refs), in order, logging progress as they finish; a failed one raises at once.
    count(result) -> (units, items) of one result, else (1, 0). expect: the seconds one task should
    take by the plan's rates, shown while it runs."""
    import ray

    if not refs:
        return []
    p, index = Progress(what, len(refs), unit, expect=expect), {r: i for i, r in enumerate(refs)}
    out, pending = [None] * len(refs), list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=p.pace)
        if not ready:
            p.tick()
            continue
        for r in ready:
            out[index[r]] = v = ray_get(r)
            n, items = count(v) if count else (1, 0)
            p.add(n, items)
    return out


# ---------------------------------------------------------------- shardex status

def status(store: Store) -> dict:
    """What `shardex status` reports: the writer's lease (and whether it is alive), its progress record."""
    from shards.storage.lease import _parse

    now, out = time.time(), {"index_root": store.uri(), "lease": None, "progress": None, "state": "idle"}
    if store.exists(PROGRESS):
        out["progress"] = json.loads(store.read_text(PROGRESS))
    if store.exists(LEASE):
        out["lease"] = d = _parse(store.read_bytes(LEASE))
        out["stale"] = stale_reason(d, now, _stale_s())
    p = out["progress"]
    if out["lease"] and not out.get("stale"):
        out["state"] = "running"
    elif p and not p.get("finished"):
        out["state"] = "stopped"  # killed, or its machine lost: no heartbeat, no end
    elif p and p.get("outcome", "").startswith("failed"):
        out["state"] = "failed"
    return out


def _stale_s() -> float:
    from shards.storage import lease

    return lease._env_seconds("SHARDEX_LEASE_STALE_S", lease.STALE_S)


def status_lines(st: dict) -> list[str]:
    from shards.storage.lease import describe as holder

    now, p, out = time.time(), st["progress"], []
    if st["state"] == "running":
        out.append(f"{st['index_root']}: running: {holder(st['lease'], now)}")
    elif st["state"] == "stopped":
        why = f" ({st['stale']})" if st.get("stale") else ""
        out.append(f"{st['index_root']}: stopped: {p['command']} by pid {p['pid']}@{p['host']} ended without "
                   f"finishing{why}; run the same command again to resume (finished work is kept)")
    elif st["state"] == "failed":
        out.append(f"{st['index_root']}: {p['command']} {p['outcome']}; run it again once that is fixed "
                   "(finished work is kept)")
    else:
        out.append(f"{st['index_root']}: no build running")
    if p is None:
        return out + ["no progress record (no build has run here since progress was recorded)"]
    if p.get("stage"):
        u = p.get("units")
        run = duration(now - p.get("stage_started", p["updated"]))
        out.append(f"stage    {describe(u) if u else p['stage'] + ': running'} ({run} in this stage, "
                   f"recorded {duration(now - p['updated'])} ago)")
    done = ", ".join(f"{k} {duration(v)}" for k, v in p["stages"].items())
    out.append(f"done     {done or 'nothing yet'}")
    if p.get("finished"):
        out.append(f"ended    {p.get('outcome', 'done').split(' (')[0]}, {duration(now - p['finished'])} ago, "
                   f"after {duration(p['finished'] - p['started'])}")
    return out

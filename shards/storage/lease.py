"""The writer lease: one build, reindex, rollback or prune at a time per index root.

The lease is one object, INDEX_ROOT/_lease.json: who holds it (user@host, pid, command), a random
token, and when it was taken and last renewed. It is written only by compare-and-swap: on S3 a
conditional PUT (If-None-Match: * to create, If-Match: <etag> to renew or take over), on local disk
under an flock of the root folder. A daemon thread renews the heartbeat; a lease whose heartbeat is
older than the stale timeout, or whose pid on this host is gone, may be taken over.

`hold(store, command)` is re-entrant in one process: a reindex's build and prune run under the
reindex's lease. SHARDEX_LEASE_HEARTBEAT_S and SHARDEX_LEASE_STALE_S change the timings.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

from shards.errors import BusyError, ConfigError, storage_message
from shards.raytools import log
from shards.storage.store import Store

LEASE = "_lease.json"
HEARTBEAT_S = 10.0   # how often a holder renews its heartbeat
STALE_S = 60.0       # a heartbeat older than this is a dead writer's: its lease may be taken over
TRIES = 3            # attempts to take the lease while others race for it

_held: dict[str, Lease] = {}   # this process's leases by root: a nested hold() re-enters
_held_lock = threading.Lock()


def _env_seconds(name: str, default: float) -> float:
    v = os.environ.get(name)
    try:
        s = float(v) if v else default
    except ValueError:
        raise ConfigError(f"{name}: {v!r} is not a number of seconds") from None
    if s <= 0:
        raise ConfigError(f"{name}: must be positive, got {v}")
    return s


# ---------------------------------------------------------------- the slot: read and compare-and-swap

class _LocalSlot:
    """The lease file on local disk; tag = sha256 of its bytes. Writes compare under an flock of
    the root folder, and go through a temporary file, so a reader never sees half a lease."""

    def __init__(self, store: Store):
        self.dir, self.path = store.path(), store.path(LEASE)

    def read(self) -> tuple[bytes | None, str | None]:
        try:
            with open(self.path, "rb") as f:
                b = f.read()
        except FileNotFoundError:
            return None, None
        return b, hashlib.sha256(b).hexdigest()

    @contextmanager
    def _locked(self):
        import fcntl

        fd = os.open(self.dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # and with it the lock

    def put(self, data: bytes, tag: str | None) -> str | None:
        """Write data if the lease is still `tag` (None: if there is none); its new tag, else None."""
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            with self._locked():
                if self.read()[1] != tag:
                    return None
                if tag is None:
                    os.link(tmp, self.path)  # exclusive even where flock is not shared (NFS)
                else:
                    os.replace(tmp, self.path)
        except FileExistsError:
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return hashlib.sha256(data).hexdigest()

    def delete(self, tag: str) -> bool:
        with self._locked():
            if self.read()[1] != tag:
                return False
            os.unlink(self.path)
            return True


class _S3Slot:
    """The lease object on S3; tag = its ETag. Conditional PUTs need an endpoint that supports them
    (AWS S3, MinIO, moto)."""

    def __init__(self, store: Store):
        self.fs, self.path = store.fs, store.path(LEASE)
        self.bucket, self.key = self.path.split("/", 1)

    def _call(self, method: str, **kw):
        from fsspec.asyn import sync

        return sync(self.fs.loop, self.fs._call_s3, method, Bucket=self.bucket, Key=self.key, **kw)

    def read(self) -> tuple[bytes | None, str | None]:
        from fsspec.asyn import sync

        async def get():
            r = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            return await r["Body"].read(), r["ETag"]

        try:
            return sync(self.fs.loop, get)  # body and ETag of one GET: they match
        except FileNotFoundError:
            return None, None

    def put(self, data: bytes, tag: str | None) -> str | None:
        cond = {"IfMatch": tag} if tag else {"IfNoneMatch": "*"}
        try:
            r = self._call("put_object", Body=data, **cond)
        except Exception as e:
            if _precondition_failed(e):
                return None
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return r["ETag"]

    def delete(self, tag: str) -> bool:
        if self.read()[1] != tag:
            return False
        self._call("delete_object")  # our own lease, fresh: nobody may take it over now
        self.fs.invalidate_cache(self.path)
        return True


def _precondition_failed(e: BaseException) -> bool:
    """412 (the object is not as expected), 409 (a concurrent conditional write won), or s3fs's
    translation of them."""
    if isinstance(e, FileExistsError):
        return True
    for x in (e, e.__cause__, e.__context__):
        code = getattr(x, "response", {}).get("Error", {}).get("Code") if x is not None else None
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            return True
    return "PreconditionFailed" in str(e) or "ConditionalRequestConflict" in str(e)


def _slot(store: Store):
    return _LocalSlot(store) if store.local else _S3Slot(store)


# ---------------------------------------------------------------- what a lease says

def _me(command: str, token: str, now: float) -> dict:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname(), "pid": os.getpid(), "command": command,
            "token": token, "started": now, "heartbeat": now}


def _parse(b: bytes) -> dict:
    """The lease's fields, or {} when it is unreadable (nobody can be holding it)."""
    try:
        d = json.loads(b)
    except ValueError:
        return {}
    ok = (isinstance(d, dict) and isinstance(d.get("token"), str) and isinstance(d.get("pid"), int)
          and all(isinstance(d.get(k), (int, float)) for k in ("started", "heartbeat")))
    return d if ok else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def stale_reason(d: dict, now: float, stale_s: float) -> str | None:
    """Why the lease d may be taken over, or None while its holder is alive."""
    if not d:
        return "it is unreadable"
    if d["host"] == socket.gethostname() and not _alive(d["pid"]):
        return f"pid {d.get('pid')} is gone from this host"
    age = now - d["heartbeat"]
    if age > stale_s:
        return f"no heartbeat for {age:.0f} s (stale after {stale_s:g} s)"
    return None


def describe(d: dict, now: float) -> str:
    """'shardex build by alice@host pid 1234 since 12:01:02 (heartbeat 3 s ago)'."""
    if not d:
        return "an unreadable lease"
    t = time.localtime(d["started"])
    fmt = "%H:%M:%S" if time.strftime("%Y%m%d", t) == time.strftime("%Y%m%d") else "%Y-%m-%d %H:%M:%S"
    return (f"{d.get('command', '?')} by {d.get('user', '?')}@{d.get('host', '?')} pid {d['pid']} "
            f"since {time.strftime(fmt, t)} (heartbeat {max(0.0, now - d['heartbeat']):.0f} s ago)")


# ---------------------------------------------------------------- the lease

class Lease:
    """One writer's lease on one index root: acquire(), a heartbeat thread, check(), release()."""

    def __init__(self, store: Store, command: str, heartbeat_s: float | None = None, stale_s: float | None = None):
        self.store, self.command = store, command
        self.every = heartbeat_s or _env_seconds("SHARDEX_LEASE_HEARTBEAT_S", HEARTBEAT_S)
        self.stale_s = stale_s or _env_seconds("SHARDEX_LEASE_STALE_S", STALE_S)
        if self.stale_s <= self.every:
            raise ConfigError(f"SHARDEX_LEASE_STALE_S: {self.stale_s:g} s must exceed the heartbeat "
                              f"({self.every:g} s), or a live writer's lease looks stale")
        self.slot = _slot(store)
        self.token = uuid.uuid4().hex
        self.doc: dict = {}
        self.tag: str | None = None
        self.lost: str | None = None   # set by the heartbeat when another writer has the lease now
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def where(self) -> str:
        return self.store.uri(LEASE)

    def acquire(self) -> Lease:
        for _ in range(TRIES):
            b, tag = self.slot.read()
            now = time.time()
            old = _parse(b) if b is not None else None
            if old and old["token"] == self.token:  # our put landed, its answer was lost and the retry refused
                return self._held(old, tag, None, None, now)
            why = stale_reason(old, now, self.stale_s) if old is not None else None
            if old is not None and why is None:
                raise BusyError(f"{self.store.uri()}: another writer holds the lease: {describe(old, now)}; "
                                f"wait for it, or remove {self.where} if that process is gone")
            doc = _me(self.command, self.token, now)
            new = self.slot.put(json.dumps(doc).encode(), tag)
            if new is not None:
                return self._held(doc, new, old, why, now)
            # another writer wrote it between our read and our put: look again
        raise BusyError(f"{self.store.uri()}: other writers race for the lease {self.where}; "
                        "wait for them to finish and run again")

    def _held(self, doc: dict, tag: str, old: dict | None, why: str | None, now: float) -> Lease:
        self.doc, self.tag = doc, tag
        if old is not None:
            log(f"lease: took over {self.where} from {describe(old, now)}: {why}")
        self._thread = threading.Thread(target=self._beat, name="shardex-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                if not self._renew():
                    return
            except Exception as e:  # noqa: BLE001 - a storage hiccup: the lease holds until stale, try again
                log(f"lease: heartbeat of {self.where} failed ({storage_message(e)}); retrying")

    def _renew(self) -> bool:
        doc = dict(self.doc, heartbeat=time.time())
        new = self.slot.put(json.dumps(doc).encode(), self.tag)
        if new is None:
            b, tag = self.slot.read()
            d = _parse(b) if b is not None else {}
            if d.get("token") != self.token:
                self.lost = describe(d, time.time()) if b is not None else "nobody (it was removed)"
                log(f"lease: lost {self.where}: it is held by {self.lost} now")
                return False
            self.tag = tag  # ours still (a 409 on a busy endpoint): renew next beat
            return True
        self.doc, self.tag = doc, new
        return True

    def check(self) -> None:
        """Raise BusyError unless this writer still holds the lease: call before publishing."""
        b, _ = self.slot.read()
        d = _parse(b) if b is not None else {}
        if self.lost or d.get("token") != self.token:
            who = self.lost or (describe(d, time.time()) if b is not None else "nobody (it was removed)")
            raise BusyError(f"{self.store.uri()}: this {self.command} lost the lease {self.where} to {who}; "
                            "nothing was published; run again when that writer is done")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost or self.tag is None:
            return
        if not self.slot.delete(self.tag):
            b, tag = self.slot.read()
            if b is not None and _parse(b).get("token") == self.token:
                self.slot.delete(tag)


def _key(store: Store) -> str:
    return os.path.realpath(store.path()) if store.local else store.uri()


@contextmanager
def hold(store: Store, command: str, *, make_root: bool = True):
    """The lease on store's root for the block (re-entered if this process holds it); released on
    exit, exceptions included. make_root=False: the root must exist already (rollback, prune)."""
    key = _key(store)
    with _held_lock:
        mine = _held.get(key)
    if mine is not None:
        yield mine
        return
    made = False
    if store.local and not os.path.isdir(store.path()):
        if make_root and not os.path.exists(store.path()):
            os.makedirs(store.path(), exist_ok=True)
            made = True
        else:
            from shards.storage.manifest import check_root

            check_root(store)  # a file, or (rollback, prune) a root that does not exist: say which
    lease = Lease(store, command).acquire()
    with _held_lock:
        _held[key] = lease
    try:
        yield lease
    finally:
        with _held_lock:
            _held.pop(key, None)
        try:
            lease.release()
        except Exception as e:  # noqa: BLE001 - never hide the block's own error; the next writer takes it over
            log(f"lease: could not remove {lease.where} ({storage_message(e)}); the next writer takes it over")
        if made:
            try:
                os.rmdir(store.path())  # a build that failed before writing anything leaves no root behind
            except OSError:
                pass


def assert_held(store: Store) -> None:
    """Before publishing: raise BusyError if this process's lease on store's root was taken over."""
    with _held_lock:
        lease = _held.get(_key(store))
    if lease is not None:
        lease.check()

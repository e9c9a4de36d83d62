"""The writer lease (shards/storage/lease.py): acquire, refuse, release, heartbeat, stale and dead-pid
takeover, on a local folder and on moto S3; the CLI's one-line refusal; and two real `shardex build`
processes racing for one index root, plus a SIGKILLed build's lease taken over by the next build."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from index_builder.cli import main
from shards.errors import BusyError, ConfigError, StorageError
from shards.storage.lease import LEASE, Lease, _slot, hold
from shards.storage.manifest import current_version, list_versions, load_manifest, verify
from shards.storage.store import Store

from helpers import build, wait_until, write_vector_corpus

SHARDEX = str(Path(sys.executable).with_name("shardex"))
PREFIX = "shardex: error: "


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request, tmp_path):
    if request.param == "s3":
        request.getfixturevalue("s3")
        return Store(f"s3://indexes/lease-{request.node.name.split('[')[0]}-{time.time_ns()}")
    os.makedirs(tmp_path / "root")
    return Store(str(tmp_path / "root"))


def lease_doc(store: Store) -> dict:
    return json.loads(store.read_text(LEASE))


def foreign(store: Store, **kw) -> dict:
    """A lease written by some other writer, as it would have written it: by compare-and-swap, so
    a heartbeat of ours racing with it either lands before it or sees it (a plain write could land
    between the heartbeat's compare and its swap, and be overwritten)."""
    now = time.time()
    d = {"user": "alice", "host": "elsewhere", "pid": 4242, "command": "shardex build", "token": "f" * 32,
         "started": now - 5, "heartbeat": now, **kw}
    slot = _slot(store)
    for _ in range(100):
        if slot.put(json.dumps(d).encode(), slot.read()[1]) is not None:
            return d
    raise AssertionError(f"could not write a foreign lease to {store.uri(LEASE)}")


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: the pid names no process now
    return p.pid


# ---------------------------------------------------------------- the lease itself

def test_acquire_refuse_release(store):
    a = Lease(store, "shardex build").acquire()
    d = lease_doc(store)
    assert d["pid"] == os.getpid() and d["host"] == socket.gethostname() and d["command"] == "shardex build"
    assert d["token"] == a.token
    with pytest.raises(BusyError) as e:
        Lease(store, "shardex reindex").acquire()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{store.uri()}: another writer holds the lease: shardex build by ")
    assert f"@{socket.gethostname()} pid {os.getpid()} since " in msg and store.uri(LEASE) in msg
    a.check()
    a.release()
    assert not store.exists(LEASE) and not a._thread.is_alive()
    b = Lease(store, "shardex prune").acquire()  # free again
    assert lease_doc(store)["command"] == "shardex prune"
    b.release()


def test_fresh_lease_of_another_host_is_refused_stale_one_taken_over(store, capfd):
    foreign(store)
    with pytest.raises(BusyError, match="shardex build by alice@elsewhere pid 4242"):
        Lease(store, "shardex build", stale_s=60).acquire()
    assert lease_doc(store)["token"] == "f" * 32  # untouched by the refused writer

    foreign(store, heartbeat=time.time() - 600)
    a = Lease(store, "shardex build", stale_s=60).acquire()
    assert lease_doc(store)["token"] == a.token
    err = capfd.readouterr().err
    assert "took over" in err and "alice@elsewhere pid 4242" in err and "no heartbeat for" in err
    a.release()


def test_dead_pid_on_this_host_is_taken_over_at_once(store, capfd):
    pid = dead_pid()
    foreign(store, host=socket.gethostname(), pid=pid)  # heartbeat fresh: only the pid tells
    a = Lease(store, "shardex build", stale_s=3600).acquire()
    assert lease_doc(store)["token"] == a.token
    assert f"pid {pid} is gone from this host" in capfd.readouterr().err
    a.release()


def test_unreadable_lease_is_taken_over(store):
    store.write_text(LEASE, "{not json")
    a = Lease(store, "shardex build").acquire()
    assert lease_doc(store)["token"] == a.token
    a.release()


def test_heartbeat_renews_and_notices_a_takeover(store, capfd):
    a = Lease(store, "shardex build", heartbeat_s=0.05, stale_s=30).acquire()
    first = lease_doc(store)["heartbeat"]
    wait_until(lambda: lease_doc(store)["heartbeat"] > first, 30, 0.05, what="a renewed heartbeat")
    assert lease_doc(store)["token"] == a.token

    foreign(store)  # another writer took it over (it judged ours stale)
    wait_until(lambda: a.lost, 30, 0.05, what="the holder to notice it lost the lease")
    wait_until(lambda: not a._thread.is_alive(), 30, 0.05, what="the heartbeat thread to stop")
    with pytest.raises(BusyError, match="lost the lease .* alice@elsewhere pid 4242.*nothing was published"):
        a.check()
    a.release()
    assert lease_doc(store)["token"] == "f" * 32  # the new holder's lease stays
    assert "lease: lost" in capfd.readouterr().err


def test_hold_is_reentrant_and_released_on_error(store):
    with pytest.raises(RuntimeError, match="boom"):
        with hold(store, "shardex reindex") as a:
            with hold(Store(store.root), "shardex build") as b:  # the reindex's own build
                assert b is a
            assert store.exists(LEASE)  # the inner exit does not release
            raise RuntimeError("boom")
    assert not store.exists(LEASE) and not a._thread.is_alive()


def test_hold_roots(tmp_path):
    root = tmp_path / "new"
    with hold(Store(str(root)), "shardex build"):
        assert (root / LEASE).exists()
    assert not root.exists()  # nothing was written: no empty root left behind
    with pytest.raises(StorageError, match="no such index root"):
        with hold(Store(str(root)), "shardex prune", make_root=False):
            pass


def test_bad_timings_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDEX_LEASE_STALE_S", "soon")
    with pytest.raises(ConfigError, match="SHARDEX_LEASE_STALE_S"):
        Lease(Store(str(tmp_path)), "shardex build")
    monkeypatch.setenv("SHARDEX_LEASE_STALE_S", "5")
    monkeypatch.setenv("SHARDEX_LEASE_HEARTBEAT_S", "10")
    with pytest.raises(ConfigError, match="must exceed the heartbeat"):
        Lease(Store(str(tmp_path)), "shardex build")


def test_cli_refuses_rollback_and_prune_in_one_line(tmp_path, capsys):
    root = str(tmp_path)
    foreign(Store(root))
    for args in (["rollback", root, "v1"], ["prune", root, "--keep", "1"]):
        capsys.readouterr()
        assert main(args) == 1
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith(PREFIX + f"{root}: another writer holds the lease: "), err
        assert "shardex build by alice@elsewhere pid 4242" in err[0] and f"remove {root}/{LEASE}" in err[0]
    assert main(["prune", root, "--keep", "1", "--dry-run", "--json"]) == 0  # a dry run only reads
    out = json.loads(capsys.readouterr().out)
    assert LEASE not in json.dumps(out)


# ---------------------------------------------------------------- real builds

def build_args(src: Path, root: Path) -> list[str]:
    return [SHARDEX, "build", str(src), str(root), "--vector-column", "vector", "--factory", "IVF16,Flat",
            "--shards", "2"]


def cli_env(ray_session, **kw) -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
            "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, **kw}


def holder_pid(root: Path, pids: set[int]) -> int | None:
    try:
        pid = json.loads((root / LEASE).read_text())["pid"]
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid in pids else None


def test_two_concurrent_builds_one_wins(ray_session, tmp_path):
    src, root = tmp_path / "corpus", tmp_path / "index"
    ids, x = write_vector_corpus(str(src), n=2000, d=16, seed=3)
    procs = [subprocess.Popen(build_args(src, root), env=cli_env(ray_session), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    by_pid = {p.pid: p for p in procs}
    try:
        pid = wait_until(lambda: holder_pid(root, set(by_pid)), 120, 0.02, what="one build to take the lease")
        holder = by_pid[pid]
        other = next(p for p in procs if p is not holder)
        # Freeze the holder (its heartbeat too, but the lease stays fresh for 60 s): the other build
        # meets the lease whenever it gets there, so exactly one must win however the two are scheduled.
        os.kill(pid, signal.SIGSTOP)
        try:
            _, err = other.communicate(timeout=120)
        finally:
            os.kill(pid, signal.SIGCONT)
        out, herr = holder.communicate(timeout=240)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert holder.returncode == 0, herr[-3000:]
    assert other.returncode == 1, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith(PREFIX)]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "another writer holds the lease: shardex build by " in errors[0] and f"pid {pid} since" in errors[0]

    store = Store(str(root))
    vs = list_versions(store)
    assert [v["current"] for v in vs] == [True] and vs[0]["documents"] == len(ids)
    m = load_manifest(store, current_version(store))
    verify(store, m)  # every file the manifest names, sizes and sha256
    assert m.ntotal == len(ids) and not store.exists(LEASE)


def test_killed_builds_lease_is_taken_over_by_the_next(ray_session, tmp_path, capfd):
    src, root = tmp_path / "corpus", tmp_path / "index"
    ids, _ = write_vector_corpus(str(src), n=2000, d=16, seed=4)
    p = subprocess.Popen(build_args(src, root), env=cli_env(ray_session, SHARDEX_CRASH_AT="CURRENT"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, perr = p.communicate(timeout=240)  # killed by itself just before it moves CURRENT
    assert p.returncode == -9, perr[-3000:]
    left = json.loads((root / LEASE).read_text())
    assert left["pid"] == p.pid and not (root / "CURRENT").exists()

    capfd.readouterr()
    s = build(ray_session, source=str(src), index_root=str(root), vector_column="vector", factory="IVF16,Flat",
              shards=2)
    err = capfd.readouterr().err
    assert "lease: took over" in err and f"pid {p.pid} is gone from this host" in err
    assert current_version(Store(str(root))) == s.version and s.documents == len(ids)
    assert not (root / LEASE).exists()

"""A real `ray start --head` for tests, and what they need around it.

The head gets its own ports and --temp-dir, and its own process group: teardown kills
exactly that cluster's processes (never `ray stop`, which stops every Ray on the machine).
conftest.py starts one per test session (the `ray_head` fixture), shared by every test that
submits jobs.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from helpers import free_port, wait_until

BIN = Path(sys.executable).parent          # the venv's bin, not resolved: `ray` and `python` live here
RAY = BIN / "ray"
PACKAGES = ("index_builder", "shards", "jobs")
NEVER = (".venv/", "venv/", "data/", ".git/", "tests/", "bench/", "cluster/", "__pycache__/", ".pytest_cache/")


def free_range(n: int) -> int:
    """The first port of n consecutive free ones, below the kernel's ephemeral range
    and above Ray's default worker ports (10002-19999) that other local clusters use."""
    for _ in range(50):
        base = random.randrange(20000, 32000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # An activated venv: the job's `python` is the cluster's, which has shardex's dependencies.
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["RAY_AUTH_MODE"] = "disabled"
    e.update(extra)
    return e


def procs() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, cmdline), from /proc (psutil is not a dependency)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) ": state ppid pgrp ...
        if fields[0] == "Z":
            continue                                    # a zombie is already dead
        out[int(d.name)] = (int(fields[1]), int(fields[2]), cmd)
    return out


def cluster_pids(pgid: int, temp_dir: str) -> set[int]:
    """Every process of this head: its process group (ray start's session), anything naming
    its temp dir, and their descendants (a job's driver runs in a session of its own)."""
    ps = procs()
    mine = {pid for pid, (_, g, cmd) in ps.items() if g == pgid or f"{temp_dir}/" in cmd or f"{temp_dir} " in cmd}
    grew = True
    while grew:
        kids = {pid for pid, (pp, _, _) in ps.items() if pp in mine} - mine
        mine |= kids
        grew = bool(kids)
    me, pid = set(), os.getpid()
    while pid > 1:                                      # never ourselves or an ancestor
        me.add(pid)
        pid = ps.get(pid, (0,))[0]
    return mine - me - {1}


def stop_cluster(pgid: int, temp_dir: str) -> None:
    """A `ray stop` for this head only: SIGTERM its processes, SIGKILL what is left after 5 s."""
    ps = procs()
    left = {pid: ps[pid][2] for pid in cluster_pids(pgid, temp_dir) if pid in ps}
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        for pid in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + wait
        while left and time.time() < deadline:
            time.sleep(0.2)
            now = procs()                              # same pid and cmdline: still ours, still alive
            left = {pid: cmd for pid, cmd in left.items() if pid in now and now[pid][2] == cmd}
        if not left:
            return


@contextmanager
def start_head(num_cpus: int = 2):
    """A real `ray start --head`; yields its dashboard (job API) address and temp dir."""
    # Short: Ray puts unix sockets under it (session_<date>_<pid>/sockets/plasma_store, 107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="shx", dir="/tmp")
    dash = free_port()
    workers = free_range(64)
    ports = {
        "--port": free_port(),
        "--dashboard-port": dash,
        "--ray-client-server-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--min-worker-port": workers,
        "--max-worker-port": workers + 63,
    }
    cmd = [str(RAY), "start", "--head", "--num-cpus", str(num_cpus), "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--disable-usage-stats", "--temp-dir", temp_dir,
           *(str(x) for kv in ports.items() for x in kv)]
    # A session of its own: every daemon it leaves behind is in this process group.
    start = subprocess.Popen(cmd, cwd=temp_dir, env=env(), start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pgid = start.pid
    try:
        out, _ = start.communicate(timeout=180)
        assert start.returncode == 0, f"ray start failed:\n{out[-5000:]}"
        address = f"http://127.0.0.1:{dash}"
        wait_until(lambda: _answers(f"{address}/api/version"), 60, 0.5, what=f"the dashboard at {address} to answer")
        yield {"address": address, "temp_dir": temp_dir, "gcs": f"127.0.0.1:{ports['--port']}"}
    finally:
        if start.poll() is None:
            start.kill()
        stop_cluster(pgid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def uploaded_dirs(temp_dir: str) -> list[Path]:
    """The working dirs the cluster unpacked from uploads (runtime_resources/working_dir_files/_ray_pkg_*)."""
    found = Path(temp_dir).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
    return sorted({d.resolve() for d in found if d.is_dir()})   # session_latest links to the session


def write_config(path: Path, **keys) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(keys))
    return path


def wait_job(client, job_id: str, timeout: float = 300) -> str:
    """Poll a submitted job until it ends; its final status as a string (SUCCEEDED, FAILED, STOPPED)."""
    from ray.job_submission import JobStatus

    def ended():
        st = client.get_job_status(job_id)
        return str(st.value) if st in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) else None

    try:
        return wait_until(ended, timeout, 0.5,
                          what=lambda: f"job {job_id} to end (still {client.get_job_status(job_id)})")
    except AssertionError as e:
        client.stop_job(job_id)
        raise AssertionError(f"{e}:\n{client.get_job_logs(job_id)[-4000:]}") from None

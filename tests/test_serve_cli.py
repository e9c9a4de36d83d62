"""`python -m jobs.serve --config serve.yaml` (the same code as `shardex serve`) as a real process:
it starts its own local Ray, serves, answers over HTTP, and stops cleanly on SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
import requests

from helpers import build, free_port, wait_until, write_vector_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_jobs_serve_runs_answers_and_stops(ray_session, tmp_path):
    src, root = str(tmp_path / "corpus"), str(tmp_path / "index")
    _, x = write_vector_corpus(src, n=2000, d=16)
    s = build(ray_session, source=src, index_root=root, vector_column="vector", fields=["title"], shards=2)
    port = free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"index_root: {root}\nport: 1\nreplicas: 1\nshard_timeout: 3\npoll_seconds: 0\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # its own local Ray
    env["SHARDEX_TOKEN"] = "token-from-env"
    p = subprocess.Popen([sys.executable, "-m", "jobs.serve", "--config", str(cfg), "--port", str(port)],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        line = _wait_for_line(p, "serving ", 180)
        assert s.version in line and f"http://127.0.0.1:{port}" in line
        base = f"http://127.0.0.1:{port}"
        assert requests.get(base + "/health", timeout=30).status_code == 200
        r = requests.post(base + "/search", json={"vectors": x[:2].tolist(), "k": 3}, timeout=30)
        assert r.status_code == 401                                        # the token came from the environment
        r = requests.post(base + "/search", json={"vectors": x[:2].tolist(), "k": 3}, timeout=30,
                          headers={"Authorization": "Bearer token-from-env"})
        assert r.status_code == 200 and r.json()["results"][0][0]["fields"]["title"] == "doc 1"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=90) == 0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_serve_refuses_a_root_without_a_version_before_starting_ray(tmp_path):
    """Ray puts a started cluster's session under RAY_TMPDIR/ray: none may appear."""
    root, ray_tmp = tmp_path / "index", tmp_path / "ray-tmp"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # a Ray would be a local one
    r = subprocess.run([sys.executable, "-m", "index_builder.cli", "serve", str(root)], cwd=ROOT,
                       env={**env, "RAY_TMPDIR": str(ray_tmp)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no published version" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not ray_tmp.exists(), sorted(p.name for p in ray_tmp.rglob("*"))[:10]


def _wait_for_line(p, prefix: str, timeout: float) -> str:
    """The first line of p's output that starts with prefix. A thread reads the output (and reads on,
    so the pipe never fills): a blocking readline in the test would outlast any timeout."""
    seen = []

    def read():
        for line in iter(p.stdout.readline, ""):
            seen.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def found():
        alive = reader.is_alive()                      # first: once it has ended, `seen` is all there is
        hit = next((line for line in list(seen) if line.startswith(prefix)), None)
        assert hit or alive, f"it ended with no {prefix!r} line; output:\n{''.join(seen[-40:])}"
        return hit

    return wait_until(found, timeout, what=lambda: f"a {prefix!r} line; output:\n{''.join(seen[-40:])}")

"""Which Ray cluster a command uses: its own local one unless asked (--address, $RAY_ADDRESS), and it says so.

Another user's `ray start --head` on the same machine is what a plain ray.init() would find (in
$RAY_TMPDIR/ray/ray_current_cluster) and join, dying with it. The test starts such a head in a
$RAY_TMPDIR of its own, so only the commands run with that $RAY_TMPDIR can see it.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager

import numpy as np
import pytest

from helpers import build, free_port, write_vector_corpus
from rayhead import RAY, env, free_range, stop_cluster

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_COMMANDS = ("build", "encode", "reindex", "search", "serve", "demo")   # eval searches in its own process


@contextmanager
def discoverable_head(tmpdir: str):
    """`ray start --head` as a user would run it: no --temp-dir, so it records itself where a plain
    ray.init() looks ($RAY_TMPDIR/ray); its own ports; stopped by its process group and temp dir only."""
    workers = free_range(32)
    ports = {"--port": free_port(), "--ray-client-server-port": free_port(), "--node-manager-port": free_port(),
             "--object-manager-port": free_port(), "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--metrics-export-port": free_port(), "--min-worker-port": workers, "--max-worker-port": workers + 31}
    cmd = [str(RAY), "start", "--head", "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats",
           *(str(x) for kv in ports.items() for x in kv)]
    p = subprocess.Popen(cmd, cwd=tmpdir, env=env(RAY_TMPDIR=tmpdir), start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, f"ray start failed:\n{out[-5000:]}"
        assert os.path.exists(os.path.join(tmpdir, "ray", "ray_current_cluster")), "not discoverable"
        yield f"127.0.0.1:{ports['--port']}"
    finally:
        stop_cluster(p.pid, os.path.join(tmpdir, "ray"))
        shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.fixture(scope="module")
def index(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("addr")
    src, root = str(tmp / "corpus"), str(tmp / "index")
    _, x = write_vector_corpus(src, n=600, d=8)
    build(ray_session, source=src, index_root=root, vector_column="vector", factory="Flat", shards=2)
    np.save(tmp / "q.npy", x[:2])
    return root, str(tmp / "q.npy")


def search(root: str, q: str, tmpdir: str, *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "index_builder.cli", "search", root, "--vectors", q, "-k", "3",
                        "--json", *extra], cwd=ROOT, env=env(RAY_TMPDIR=tmpdir), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def ray_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "] ray: " in ln]


def test_a_command_starts_its_own_cluster_unless_asked_to_join_one(index):
    root, q = index
    tmpdir = tempfile.mkdtemp(prefix="shxa", dir="/tmp")     # short: Ray's socket paths live under it
    with discoverable_head(tmpdir) as head:
        own = ray_lines(search(root, q, tmpdir).stderr)
        assert len(own) == 1 and "started a local cluster of its own" in own[0], own
        port = re.search(r"at \S+:(\d+)", own[0]).group(1)   # the host is the node's IP, not 127.0.0.1
        assert port != head.rsplit(":", 1)[1]              # not the head a plain ray.init() joins

        joined = ray_lines(search(root, q, tmpdir, "--address", head).stderr)
        assert joined == [joined[0]] and f"joined the cluster at {head}" in joined[0], joined

        r = subprocess.run([sys.executable, "-m", "index_builder.cli", "search", root, "--vectors", q, "--json"],
                           cwd=ROOT, env=env(RAY_TMPDIR=tmpdir, RAY_ADDRESS=head), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0 and f"joined the cluster at {head}" in r.stderr, r.stderr[-4000:]
        assert len(r.stdout.strip().splitlines()) == 1     # --json: one line, the log lines on stderr


def test_every_command_that_uses_ray_takes_address():
    from index_builder.cli import parser

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for cmd in RAY_COMMANDS:
        opt = next((a for a in sub[cmd]._actions if "--address" in a.option_strings), None)
        assert opt is not None and "RAY_ADDRESS" in opt.help, cmd

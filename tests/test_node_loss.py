"""Node loss, for real: a 3-node ray.cluster_utils.Cluster (a head without CPUs, two 1-CPU workers), a
real `shardex build` joined to it, and the worker holding a stage's task removed while the task runs
(mid-train, mid-add, mid-merge). Each build completes with every id once, and with shards byte for
byte those of a build that lost nothing.

The task is held at its commit write by shards/storage/store.py's SHARDEX_PAUSE_DIR hook: it records
its node and waits while DIR/hold exists, so the node is removed with the task's work done but not
committed; the marker of the same path from another node proves the task was redone there.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shards.storage.faissio import index_ids, read_index
from shards.storage.manifest import current_version, load_manifest, vdir
from shards.storage.store import Store

from helpers import wait_until, write_vector_corpus

pytestmark = pytest.mark.slow

SHARDEX = str(Path(sys.executable).with_name("shardex"))
N = 4000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    pause = tmp_path_factory.mktemp("pause")
    saved = os.environ.get("SHARDEX_PAUSE_DIR")
    os.environ["SHARDEX_PAUSE_DIR"] = str(pause)  # the nodes' raylets, and so their workers, inherit it
    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c, pause
    finally:
        c.shutdown()
        if saved is None:
            os.environ.pop("SHARDEX_PAUSE_DIR", None)
        else:
            os.environ["SHARDEX_PAUSE_DIR"] = saved


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    src = tmp_path_factory.mktemp("nodeloss") / "corpus"
    ids, _ = write_vector_corpus(str(src), n=N, d=16, files=4, seed=2)
    return str(src), ids


def shardex_build(c, src: str, root: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SHARDEX_PAUSE_DIR")}
    return subprocess.Popen([SHARDEX, "build", src, str(root), "--address", c.address, "--vector-column", "vector",
                             "--factory", "IVF32,Flat", "--shards", "2", "--part-rows", "500", "--add-rows", "500"],
                            env={**env, "RAY_AUTH_MODE": "disabled"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"the build did not end within {timeout:g} s:\n{err[-3000:]}") from None


def markers(pause: Path) -> list[tuple[str, str, int]]:
    """(node id, path, pid) of every task held so far, oldest first."""
    files = sorted(glob.glob(str(pause / "paused-*")), key=os.path.getmtime)
    return [(os.path.basename(f).split("-")[1], Path(f).read_text(), int(os.path.basename(f).split("-")[2]))
            for f in files]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def published(root: Path) -> tuple[list[str], np.ndarray]:
    store = Store(str(root))
    m = load_manifest(store, current_version(store))
    ids = np.concatenate([index_ids(read_index(store, f"{vdir(m.version)}/{s.file}")) for s in m.shards])
    return [s.sha256 for s in m.shards], ids


@pytest.fixture(scope="module")
def reference(cluster, corpus, tmp_path_factory):
    c, _ = cluster
    root = tmp_path_factory.mktemp("ref") / "index"
    p = shardex_build(c, corpus[0], root)
    out, err = finish(p, 240)
    assert p.returncode == 0, err[-3000:]
    return published(root)


@pytest.mark.parametrize("stage, at", [("train", "work/*/trained.index.json"), ("add", "work/*/add/*/done.json"),
                                       ("merge", "work/*/shards/shard-*.index.json")])
def test_a_worker_removed_mid_stage_loses_nothing(cluster, corpus, reference, tmp_path, stage, at):
    c, pause = cluster
    for f in glob.glob(str(pause / "*")):
        os.remove(f)
    (pause / "at").write_text(at)
    (pause / "hold").write_text("")
    p = shardex_build(c, corpus[0], tmp_path / "index")
    try:
        first = wait_until(lambda: markers(pause), 180, 0.05, what=f"a {stage} task held at {at}")[0]
        node = next(n for n in c.worker_nodes if n.node_id == first[0])
        c.remove_node(node, allow_graceful=False)
        # the held task's worker dies with its node: only then may the others go on
        wait_until(lambda: gone(first[2]), 60, 0.05, what=f"the worker of the held task (pid {first[2]}) to die")
    finally:
        os.remove(pause / "hold")
    out, err = finish(p, 240)
    assert p.returncode == 0, err[-3000:]
    c.add_node(num_cpus=1)  # two workers again for the next stage's run
    redone = [m for m in markers(pause) if m[1] == first[1] and m[0] != first[0]]
    assert redone, f"{first[1]} was not redone on another node: {markers(pause)}"
    shas, ids = published(tmp_path / "index")
    assert np.array_equal(np.sort(ids), np.sort(corpus[1]))  # every id exactly once
    assert shas == reference[0]  # the same shards as the build that lost no node

"""The fault suite, counted: real `shardex build` processes meeting storage faults and lost nodes, each
judged against the same build without the fault.

- S3 faults: moto's server behind tests/faultproxy.py (a TCP proxy on 127.0.0.1 refusing, cutting
  mid-stream or answering 503 SlowDown to a share of the connections), at two corpus sizes.
- Node loss: a 3-node ray.cluster_utils.Cluster (head without CPUs, two 1-CPU workers), the worker
  holding a train, add or merge task removed while it runs (tests/test_node_loss.py's hook).
- A SIGKILLed driver (SHARDEX_CRASH_AT at the manifest write), then the same command again.

Each row: completed, ids lost and ids duplicated (must be 0 and 0), shards identical to the
fault-free build's, and the seconds against it. Prints the table, writes bench/results/faults.json.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/faults/run.py
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent.parent / "tests"
sys.path.insert(0, str(TESTS))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
    os.environ.setdefault(k, "testing")

import numpy as np  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402  (tests/ is on sys.path now)

from helpers import wait_until, write_vector_corpus  # noqa: E402

RESULTS = HERE.parent / "results"
SHARDEX = str(Path(sys.executable).with_name("shardex"))
OPTS = ["--vector-column", "vector", "--factory", "IVF32,Flat", "--shards", "2", "--part-rows", "500",
        "--add-rows", "500"]
S3_FAULTS = [("none", 0, 0, 0), ("20% refused, 5% cut", 0.2, 0.05, 0), ("50% refused, 20% cut, 5% 503", 0.5, 0.2, 0.05)]


def shardex(args: list[str], env: dict | None = None, timeout: int = 900) -> tuple[int, float, str]:
    t = time.perf_counter()
    e = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SHARDEX_PAUSE_DIR")}
    p = subprocess.run([SHARDEX, *args], capture_output=True, text=True, timeout=timeout, env={**e, **(env or {})})
    return p.returncode, time.perf_counter() - t, p.stderr


def published(root: str, endpoint: str | None = None) -> tuple[list[str], np.ndarray]:
    from shards.storage.faissio import index_ids, read_index
    from shards.storage.manifest import current_version, load_manifest, vdir
    from shards.storage.store import Store

    store = Store(root, endpoint)
    m = load_manifest(store, current_version(store))
    return [s.sha256 for s in m.shards], np.concatenate(
        [index_ids(read_index(store, f"{vdir(m.version)}/{s.file}")) for s in m.shards])


def judged(kind: str, fault: str, n: int, rc: int, secs: float, err: str, got, ref, ref_s: float, ids) -> dict:
    row = {"kind": kind, "fault": fault, "vectors": n, "completed": rc == 0, "seconds": round(secs, 1),
           "vs_no_fault": round(secs / ref_s, 2) if ref_s else None}
    if rc == 0:
        shas, have = got
        u, c = np.unique(have, return_counts=True)
        row.update(ids_lost=int(len(np.setdiff1d(ids, u))), ids_duplicated=int((c > 1).sum()),
                   identical=shas == ref[0])
    else:
        row.update(error=err.strip().splitlines()[-1:])
    print(f"{kind:6} {fault:34} {n:>7,} {'ok' if rc == 0 else 'FAILED':6} {row['seconds']:7.1f} s  "
          f"x{row['vs_no_fault'] or 1:.2f}  lost {row.get('ids_lost')} dup {row.get('ids_duplicated')} "
          f"identical {row.get('identical')}", flush=True)
    return row


def s3_suite(base: Path, sizes: list[int]) -> list[dict]:
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    url = "http://{}:{}".format(*server.get_host_and_port())
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": url}, key="testing", secret="testing")
    fs.mkdir("corpus")
    fs.mkdir("indexes")
    proxy, rows = FaultProxy(urlparse(url).port, seed=11).start(), []
    for n in sizes:
        src = base / f"s3-{n}"
        ids, _ = write_vector_corpus(str(src), n=n, d=32, files=max(2, n // 1000), seed=n)
        for f in sorted(os.listdir(src)):
            fs.put_file(str(src / f), f"corpus/c{n}/{f}")
        ref, ref_s = None, None
        for i, (name, refuse, cut, slow) in enumerate(S3_FAULTS):
            proxy.set(refuse, cut, slow)
            before = dict(proxy.counts)
            rc, secs, err = shardex(["build", f"s3://corpus/c{n}", f"s3://indexes/c{n}-{i}", *OPTS,
                                     "--s3-endpoint", proxy.url])
            proxy.set()
            got = published(f"s3://indexes/c{n}-{i}", url) if rc == 0 else None
            if i == 0:
                ref, ref_s = got, secs
            row = judged("s3", name, n, rc, secs, err, got, ref, ref_s, ids)
            row["connections"] = {k: proxy.counts[k] - before.get(k, 0) for k in proxy.counts}
            rows.append(row)
    proxy.stop()
    server.stop()
    return rows


def node_suite(base: Path, n: int) -> list[dict]:
    import test_node_loss as t
    from ray.cluster_utils import Cluster

    pause = base / "pause"
    pause.mkdir()
    os.environ["SHARDEX_PAUSE_DIR"] = str(pause)
    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    src = base / "nodes"
    ids, _ = write_vector_corpus(str(src), n=n, d=16, files=4, seed=2)
    rows = []
    try:
        t0 = time.perf_counter()
        p = t.shardex_build(c, str(src), base / "ref")
        out, err = t.finish(p, 600)
        ref_s, ref = time.perf_counter() - t0, t.published(base / "ref")
        rows.append(judged("node", "none", n, p.returncode, ref_s, err, ref, ref, ref_s, ids))
        for stage, at in [("train", "work/*/trained.index.json"), ("add", "work/*/add/*/done.json"),
                          ("merge", "work/*/shards/shard-*.index.json")]:
            for f in pause.glob("*"):
                f.unlink()
            (pause / "at").write_text(at)
            (pause / "hold").write_text("")
            t0 = time.perf_counter()
            p = t.shardex_build(c, str(src), base / f"nodes-{stage}")
            first = wait_until(lambda: t.markers(pause), 300, 0.05, what=f"a {stage} task")[0]
            c.remove_node(next(x for x in c.worker_nodes if x.node_id == first[0]), allow_graceful=False)
            wait_until(lambda pid=first[2]: t.gone(pid), 60, 0.05, what="the held worker to die")
            (pause / "hold").unlink()
            out, err = t.finish(p, 600)
            secs = time.perf_counter() - t0
            got = t.published(base / f"nodes-{stage}") if p.returncode == 0 else None
            rows.append(judged("node", f"worker removed mid-{stage}", n, p.returncode, secs, err, got, ref, ref_s, ids))
            c.add_node(num_cpus=1)
    finally:
        c.shutdown()
        os.environ.pop("SHARDEX_PAUSE_DIR", None)
    return rows


def driver_suite(base: Path, n: int) -> list[dict]:
    src = base / "driver"
    ids, _ = write_vector_corpus(str(src), n=n, d=16, files=4, seed=3)
    rc, ref_s, err = shardex(["build", str(src), str(base / "driver-ref"), *OPTS])
    ref = published(str(base / "driver-ref"))
    rows = [judged("driver", "none", n, rc, ref_s, err, ref, ref, ref_s, ids)]
    root = str(base / "driver-kill")
    rc1, s1, _ = shardex(["build", str(src), root, *OPTS], env={"SHARDEX_CRASH_AT": "versions/*/manifest.json"})
    assert rc1 == -9, f"the driver was not killed (rc {rc1})"
    rc, s2, err = shardex(["build", str(src), root, *OPTS])
    got = published(root) if rc == 0 else None
    rows.append(judged("driver", "SIGKILLed at publish, run again", n, rc, s1 + s2, err, got, ref, ref_s, ids))
    return rows


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="shardex-faults-"))
    try:
        rows = s3_suite(base, [2000, 8000]) + node_suite(base, 8000) + driver_suite(base, 8000)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    faulty = [r for r in rows if r["fault"] != "none"]
    total = {"faults": len(faulty), "completed": sum(r["completed"] for r in faulty),
             "ids_lost": sum(r.get("ids_lost") or 0 for r in faulty),
             "ids_duplicated": sum(r.get("ids_duplicated") or 0 for r in faulty),
             "identical_to_no_fault": sum(bool(r.get("identical")) for r in faulty)}
    print(json.dumps(total))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps({"machine": "2 cores, 24 GiB, no GPU", "total": total,
                                                     "runs": rows}, indent=1))


if __name__ == "__main__":
    main()

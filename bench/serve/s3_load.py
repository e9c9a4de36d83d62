"""Loading an in-RAM shard from S3: through the node cache (shards/storage/cache.py: ranged GETs written to
disk as they arrive, hashed once per cached copy, then read_index from the copy) against the path it
replaced (one whole-object GET, hashed in memory, deserialized from those bytes: the index and its bytes
in RAM at once). Peak RSS and seconds of each load, each in a fresh process; then a second load from
the cache, as a replica restarting on the node does.

S3 is moto's server in a process of its own on 127.0.0.1 (so its copy of the object is not in the RSS
measured). The shard: an IVF1024,Flat index of n x d clustered vectors. Writes
bench/results/serve_s3_load.json.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/serve/s3_load.py [--n 1000000] [--d 64]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import HERE, loadavg, machine, save

ROOT = os.path.join(HERE, "..", "..")
LOAD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from shards.storage.store import Store
from shards.storage.manifest import FileInfo
from shards.storage import integrity
from shards.storage.faissio import from_bytes, read_verified
how, uri, endpoint, info = sys.argv[2], sys.argv[3], sys.argv[4], FileInfo(**json.loads(sys.argv[5]))
store = Store(uri, endpoint)
t = time.perf_counter()
if how == "whole":   # the replaced path: one GET, hashed in RAM, deserialized from the bytes
    data = integrity.check_bytes(store.uri("v/shard.index"), store.read_bytes("v/shard.index"), info.sha256, info.bytes)
    index = from_bytes(data)
    del data
else:
    index = read_verified(store, "v", info, cache_dir=sys.argv[6])
s = time.perf_counter() - t
hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))  # this image's peak
print(json.dumps({"seconds": round(s, 3), "peak_rss_mb": round(hwm / 1024),
                  "ntotal": index.ntotal, "hashed_files": integrity.HASHED["files"]}))
"""


def moto(port: int) -> subprocess.Popen:
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    p = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    time.sleep(3)
    return p


def load(how: str, uri: str, endpoint: str, info: dict, cache: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, ROOT, how, uri, endpoint, json.dumps(info), cache],
                         capture_output=True, text=True, check=True, env={**os.environ, "AWS_ACCESS_KEY_ID": "x",
                                                                          "AWS_SECRET_ACCESS_KEY": "x"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--port", type=int, default=5123)
    a = ap.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x")
    sys.path.insert(0, ROOT)
    import faiss
    from faiss.contrib.datasets import SyntheticDataset

    from shards.storage.faissio import to_bytes
    from shards.storage.store import Store

    x = SyntheticDataset(a.d, 20_000, a.n, 0, seed=3)
    index = faiss.index_factory(a.d, "IVF1024,Flat")
    index.train(x.get_train())
    index.add(x.get_database())
    data = to_bytes(index)
    del index
    endpoint = f"http://127.0.0.1:{a.port}"
    server = moto(a.port)
    try:
        store = Store("s3://bench/s3load", endpoint)
        store.fs.mkdir("bench")
        w = store.write_bytes("v/shard.index", data)
        info = {"file": "shard.index", "sha256": w.sha256, "bytes": w.bytes, "ntotal": a.n}
        del data
        res = {"machine": machine(), "n": a.n, "d": a.d, "index_mb": round(w.bytes / 2**20),
               "loadavg_before": loadavg()}
        with tempfile.TemporaryDirectory() as cache:
            res["whole_get"] = load("whole", store.uri(), endpoint, info, cache)
            res["cache_first"] = load("cache", store.uri(), endpoint, info, cache)
            res["cache_again"] = load("cache", store.uri(), endpoint, info, cache)
        res["loadavg_after"] = loadavg()
        res["peak_ratio_cache_to_whole"] = round(res["cache_first"]["peak_rss_mb"] / res["whole_get"]["peak_rss_mb"], 3)
        print(json.dumps(res, indent=1))
        save("serve_s3_load", res)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()

"""RAM during a merge: one serving shard of 1M x 128 IVF4096,Flat vectors (about 0.5 GiB), merged in
RAM and on disk (--merge-ram-budget 0), by two whole `shardex build` runs. The merge task records
the peak anonymous memory of its process (what it holds) and the peak file-backed resident pages
(mmapped parts and .ivfdata: page cache the kernel can drop) in the shard's commit record; this
prints them with the merge time, and checks that both shards answer alike.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/build/ondisk_merge.py
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT, loadavg, machine, run_cli, save, shardex_search, synthetic

FACTORY = "IVF4096,Flat"


def build(path: str, root: str, budget: str) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    wall, out, _ = run_cli(["build", f"{path}/corpus", root, "--vector-column", "vector", "--factory", FACTORY,
                            "--metric", "l2", "--merge-ram-budget", budget, "--json"],
                           env={"RAY_AUTH_MODE": "disabled"})
    rec = json.load(open(glob.glob(f"{root}/work/*/shards/shard-0.index.json")[0]))
    keep = ("ondisk", "seconds", "bytes", "ivfdata_bytes",
            "rss_anon_start_mib", "rss_anon_peak_mib", "rss_file_peak_mib")
    return {"budget": budget, "wall": round(wall, 2), "merge_stage": json.loads(out)["seconds"]["merge"],
            **{k: rec.get(k) for k in keep}}


def main() -> None:
    path = synthetic(1_000_000)
    load = [loadavg()]
    runs = [build(path, f"{OUT}/ondisk-{b}", b) for b in ("64G", "0")]
    load.append(loadavg())
    xq = np.load(f"{path}/queries.npy")[:200]
    (s1, _), (s2, _) = shardex_search(f"{OUT}/ondisk-64G"), shardex_search(f"{OUT}/ondisk-0")
    same = bool(np.array_equal(s1(xq, 10, 16)[1], s2(xq, 10, 16)[1]))
    res = {"factory": FACTORY, "vectors": 1_000_000, "runs": runs, "same_results_at_nprobe_16": same,
           "machine": machine(), "loadavg": load}
    print(save("build_ondisk_merge", res))
    for r in runs:
        print(r)
    print("same results:", same)


if __name__ == "__main__":
    main()

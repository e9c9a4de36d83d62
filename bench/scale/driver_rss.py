"""The driver's peak memory as N grows (issue 17): `shardex build --address` against a running Ray
head (`ray start --head` of its own, stopped at the end even on failure), at 2M and 20M tiny
vectors (d=8, many parts), the driver's RSS read every 50 ms from /proc (that one process,
children excluded; the kernel's own peak, VmHWM, beside it). The tasks run in the head's workers,
so what grows here is what the driver itself holds per document.
Target: the 20M run's peak within 1.25x of the 2M run's (today 310 -> 1,172 MiB, 3.78x).

    flock /tmp/shardex-bench.lock .venv/bin/python bench/scale/driver_rss.py           # 2M and 20M
    flock /tmp/shardex-bench.lock .venv/bin/python bench/scale/driver_rss.py --quick   # 200k and 1M
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT, clustered, loadavg, machine, ray_head, run_build, save, stage_at

TARGET = 1.25
TIMELINE_EVERY = 0.5     # seconds between the RSS points kept in the JSON (all are used for the peak)


def per_stage(rss: list, stages: list) -> dict:
    """The peak RSS (MiB) sampled during each stage."""
    out: dict[str, float] = {}
    for t, kib in rss:
        st = stage_at(stages, t)
        out[st] = max(out.get(st, 0), round(kib / 1024, 1))
    return out


def thin(rss: list) -> list:
    """One (t, MiB) point per TIMELINE_EVERY s, each the max of its window: the plot's line."""
    out: dict[int, float] = {}
    for t, kib in rss:
        w = int(t / TIMELINE_EVERY)
        out[w] = max(out.get(w, 0), kib / 1024)
    return [(round(w * TIMELINE_EVERY, 2), round(m, 1)) for w, m in sorted(out.items())]


def run(n: int, a, gcs: str) -> dict:
    files = max(1, n // a.file_rows)
    src = clustered(n, a.dim, files)
    root = f"{OUT}/rss-{n}"
    shutil.rmtree(root, ignore_errors=True)
    before = loadavg()
    b = run_build(src, root, ["--address", gcs, "--factory", a.factory, "--shards", str(a.shards), "--metric", "l2",
                              "--part-rows", str(a.part_rows)], rss_every=a.every)
    r, stages = b["rss"], b["stages"]
    peak_t = max(r["samples"], key=lambda x: x[1])[0] if r["samples"] else 0
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    return {"vectors": n, "files": files, "part_rows": a.part_rows, "wall": b["wall"],
            "seconds": b["summary"]["seconds"], "peak_mib": r["peak_mib"], "hwm_mib": r["hwm_mib"],
            "samples": len(r["samples"]), "peak_at_s": peak_t, "peak_stage": stage_at(stages, peak_t),
            "per_stage_mib": per_stage(r["samples"], stages),
            "stages": stages, "timeline_mib": thin(r["samples"]), "loadavg": [before, loadavg()], "cmd": b["cmd"]}


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in res["runs"]:
        t, m = zip(*r["timeline_mib"]) if r["timeline_mib"] else ((), ())
        ax.plot(t, m, label=f"{r['vectors']:,} vectors (peak {r['hwm_mib']:,.0f} MiB)")
    ax.set_xlabel("seconds into `shardex build`")
    ax.set_ylabel("driver RSS, MiB")
    ax.set_title(f"driver memory against a running head: d={res['d']}, {res['factory']}, {res['shards']} shards",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2000000,20000000")
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--factory", default="IVF256,PQ4")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--part-rows", type=int, default=100_000)
    ap.add_argument("--file-rows", type=int, default=1_000_000, help="rows per Parquet file of the corpus")
    ap.add_argument("--every", type=float, default=0.05, help="seconds between RSS reads")
    ap.add_argument("--keep", action="store_true", help="keep each index root under bench/out/scale/")
    ap.add_argument("--quick", action="store_true", help="200k and 1M, parts of 20k; results under "
                    "bench/out/scale/, not bench/results/")
    a = ap.parse_args()
    if a.quick:
        a.sizes, a.part_rows, a.file_rows = "200000,1000000", 20_000, 200_000
    res = {"machine": machine(), "d": a.dim, "factory": a.factory, "shards": a.shards, "runs": []}
    with ray_head() as head:
        for n in (int(x) for x in a.sizes.split(",")):
            res["runs"].append(run(n, a, head["gcs"]))
            r = res["runs"][-1]
            print(f"{n:>12,} vectors  {r['files']} files  peak RSS {r['peak_mib']:,.1f} MiB sampled, "
                  f"{r['hwm_mib']:,.1f} VmHWM, in {r['peak_stage']}  per stage {r['per_stage_mib']}  "
                  f"{r['wall']:.0f} s", flush=True)
    first, last = res["runs"][0], res["runs"][-1]
    res["ratio"] = round(last["hwm_mib"] / first["hwm_mib"], 3)
    print(f"peak RSS {last['vectors']:,} / {first['vectors']:,}: {res['ratio']}x (target <= {TARGET})")
    path = save("scale_driver_rss", res, a.quick)
    plot(res, path[:-5] + ".png")
    print(path)


if __name__ == "__main__":
    main()

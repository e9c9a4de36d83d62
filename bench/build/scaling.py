"""Seconds per million vectors as the corpus grows: shardex build --factory auto at 100k, 1M and 4M
SyntheticDataset vectors (d=128), with a memory budget of 50 bytes a vector, so auto picks
IVF{nlist},PQ32 with its own nlist (4*sqrt(N) up to 1M, 8*sqrt(N) above, so training grows
faster than N). Whole commands timed from outside; stage times from the build's summary.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/build/scaling.py [--sizes 100000,1000000,4000000]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT, loadavg, machine, run_cli, save, synthetic

BYTES_PER_VECTOR = 50


def run(n: int) -> dict:
    path = synthetic(n)
    root = f"{OUT}/scaling-{n}"
    shutil.rmtree(root, ignore_errors=True)
    before = loadavg()
    wall, out, err = run_cli(["build", f"{path}/corpus", root, "--vector-column", "vector", "--metric", "l2",
                              "--memory-budget", str(n * BYTES_PER_VECTOR), "--json"],
                             env={"RAY_AUTH_MODE": "disabled"})
    s = json.loads(out)
    shutil.rmtree(f"{root}/work", ignore_errors=True)
    return {"vectors": n, "factory": s["factory"], "wall": round(wall, 2),
            "seconds_per_million": round(wall / (n / 1e6), 1), "stages": s["seconds"],
            "stage_seconds_per_million": {k: round(v / (n / 1e6), 2) for k, v in s["seconds"].items()},
            "recall_at_10": s["recall_at_10"], "nprobe": s["nprobe"], "index_bytes": s["index_bytes"],
            "plan": [line.split("] ", 1)[1] for line in err.splitlines()
                     if "] plan: " in line and any(w in line for w in ("memory per shard", "disk", "training"))],
            "loadavg": [before, loadavg()]}


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["runs"]
    fig, ax = plt.subplots(figsize=(6.6, 4.0))
    bottom = [0.0] * len(rows)
    for st in rows[0]["stage_seconds_per_million"]:
        vals = [r["stage_seconds_per_million"][st] for r in rows]
        ax.bar([f"{r['vectors']:,}\n{r['factory']}" for r in rows], vals, bottom=bottom, label=st)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("seconds per million vectors")
    ax.set_title(f"shardex build --factory auto, d=128, {res['machine']['cpus']} CPUs", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000,4000000")
    a = ap.parse_args()
    res = {"machine": machine(), "runs": []}
    for n in (int(x) for x in a.sizes.split(",")):
        res["runs"].append(run(n))
        r = res["runs"][-1]
        print(f"{n:>10,} {r['factory']:<18} {r['wall']:8.1f} s  {r['seconds_per_million']:8.1f} s/M  "
              f"{r['stages']}  load {r['loadavg']}", flush=True)
        path = save("build_scaling", res)
    plot(res, path[:-5] + ".png")
    print(path)


if __name__ == "__main__":
    main()

"""Seconds per million vectors of each build stage as N grows (issue 17): `shardex build` of 1M, 4M
and 10M clustered vectors (d=128, IVF4096,PQ16, 4 shards, one factory for all sizes, so only N
changes; not d=96, whose 6-dim PQ sub-vectors take faiss's scalar code path, 7x slower to encode)
on this machine, each stage's time from the build's summary, per million vectors, and its
ratio to the first size's. The builds run against a `ray start --head` of the benchmark's own
(`--address`), as on a cluster, so starting Ray is in no stage, and plan in Ray tasks at every size
(SHARDEX_PLAN_LOCAL_ROWS=0), as every corpus over 1M rows does. Beside each, the capacity plan's
prediction for the same build (index_builder.plan.capacity.predict on Cluster.this_machine(); "n/a"
where the plan has no such stage or the module is not there). Target: every stage but train (the
k-means, whose work grows with the sample, not with N) within 1.2x per million of the 1M run.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/scale/stages.py           # 1M, 4M, 10M x 128
    flock /tmp/shardex-bench.lock .venv/bin/python bench/scale/stages.py --quick   # 100k, 400k
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT, RESULTS, clustered, loadavg, machine, ray_head, run_build, save

TARGET = 1.2
EXEMPT = ("train",)     # the k-means: its time follows the sample and nlist, not N


def predicted(n: int, d: int, factory: str, shards: int) -> tuple[dict, str | None]:
    """({stage: seconds}, None) from the capacity plan, or ({}, why not): the hook for
    index_builder.plan.capacity.predict(n, d, factory, shards, cluster) -> {stage: Stage(seconds, ...)}."""
    try:
        from index_builder.plan import capacity
    except ImportError as e:
        return {}, f"no index_builder.plan.capacity ({e})"
    try:
        got = capacity.predict(n, d, factory, shards, capacity.Cluster.this_machine())
        return {st: round(float(getattr(v, "seconds", v)), 2) for st, v in got.items()}, None
    except Exception as e:  # noqa: BLE001  (a plan still being written must not stop the measurement)
        return {}, f"capacity.predict failed: {type(e).__name__}: {e}"


def run(n: int, a, gcs: str) -> dict:
    src = clustered(n, a.dim, max(1, n // a.file_rows))
    root = f"{OUT}/stages-{n}"
    shutil.rmtree(root, ignore_errors=True)
    opts = ["--address", gcs, "--factory", a.factory, "--shards", str(a.shards), "--metric", "l2"]
    opts += ["--part-rows", str(a.part_rows)] if a.part_rows else []
    before = loadavg()
    b = run_build(src, root, opts, env={"SHARDEX_PLAN_LOCAL_ROWS": "0"})
    tr = train_record(root, b["summary"]["work"])
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    s, m = b["summary"], n / 1e6
    pred, why = predicted(n, a.dim, a.factory, a.shards)
    return {"vectors": n, "wall": b["wall"], "seconds": s["seconds"],
            "per_million": {st: round(v / m, 3) for st, v in s["seconds"].items()},
            "predicted": pred, "predicted_per_million": {st: round(v / m, 3) for st, v in pred.items()},
            "predicted_why_not": why, "recall_at_10": s["recall_at_10"], "nprobe": s["nprobe"],
            "index_bytes": s["index_bytes"], "train_vectors": tr["train_vectors"],
            "sample_bytes": tr["sample_bytes"], "sample_bytes_read": tr["sample_bytes_read"],
            "corpus_vector_bytes": n * a.dim * 4, "loadavg": [before, loadavg()], "cmd": b["cmd"]}


def train_record(root: str, work: str) -> dict:
    """The build's train record (index_builder/train/quantizer.train_task): the training sample's float32
    bytes and the bytes read to draw it, which issue 17 wants in proportion to the sample, not the corpus."""
    with open(os.path.join(root, work, "trained.index.json")) as f:
        return json.load(f)


def ratios(runs: list[dict]) -> dict:
    """Each stage's seconds per million against the first run's, and which break the target."""
    first = runs[0]["per_million"]
    out = {"ratio": [], "over": []}
    for r in runs:
        q = {st: round(v / first[st], 3) if first.get(st) else None for st, v in r["per_million"].items()}
        out["ratio"].append(q)
        out["over"].append(sorted(st for st, x in q.items() if x and x > TARGET and st not in EXEMPT))
    return out


def show(r: dict, q: dict) -> list[str]:
    lines = [f"{r['vectors']:>12,} vectors  {r['wall']:.0f} s  recall@10 {r['recall_at_10']} at nprobe {r['nprobe']}",
             f"    training read {r['sample_bytes_read'] / 2**20:,.1f} MiB for a sample of {r['train_vectors']:,} "
             f"({r['sample_bytes'] / 2**20:,.1f} MiB, {r['sample_bytes_read'] / r['sample_bytes']:.2f}x) of a "
             f"{r['corpus_vector_bytes'] / 2**20:,.0f} MiB corpus"]
    for st, v in r["per_million"].items():
        p = r["predicted_per_million"].get(st)
        lines.append(f"    {st:<9} {r['seconds'][st]:9.2f} s  {v:9.2f} s/M  x{q[st]} of the first"
                     f"  predicted {f'{p:.2f} s/M' if p is not None else 'n/a'}")
    if r["predicted_why_not"]:
        lines.append(f"    prediction n/a: {r['predicted_why_not']}")
    return lines


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    stages = list(runs[0]["per_million"])
    fig, ax = plt.subplots(figsize=(7.5, 4))
    w = 0.8 / len(runs)
    for i, r in enumerate(runs):
        xs = [j + i * w for j in range(len(stages))]
        ax.bar(xs, [r["per_million"][st] for st in stages], w, label=f"{r['vectors']:,}")
        pp = [(x, r["predicted_per_million"][st]) for x, st in zip(xs, stages) if st in r["predicted_per_million"]]
        if pp:
            ax.scatter(*zip(*pp), marker="_", s=200, color="k", label="predicted" if i == 0 else None)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(stages))], stages, fontsize=8)
    ax.set_ylabel("seconds per million vectors")
    ax.set_title(f"d={res['d']}, {res['factory']}, {res['shards']} shards, {res['machine']['cpus']} CPUs",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def repredict() -> None:
    """The predictions of the saved runs from the plan as it is now: a pure function of (N, d, factory,
    shards, this machine), so nothing is measured again."""
    path = f"{RESULTS}/scale_stages.json"
    with open(path) as f:
        res = json.load(f)
    for r in res["runs"]:
        pred, why = predicted(r["vectors"], res["d"], res["factory"], res["shards"])
        m = r["vectors"] / 1e6
        r.update(predicted=pred, predicted_per_million={st: round(v / m, 3) for st, v in pred.items()},
                 predicted_why_not=why)
    for r, q in zip(res["runs"], res["ratio"]):
        print("\n".join(show(r, q)))
    save("scale_stages", res, False)
    plot(res, path[:-5] + ".png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000000,4000000,10000000")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--factory", default="IVF4096,PQ16")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--part-rows", type=int, default=None, help="--part-rows of the builds (default: the build's)")
    ap.add_argument("--file-rows", type=int, default=500_000, help="rows per Parquet file of the corpus")
    ap.add_argument("--keep", action="store_true", help="keep each index root under bench/out/scale/")
    ap.add_argument("--quick", action="store_true", help="100k and 400k, IVF256,PQ16; results under "
                    "bench/out/scale/, not bench/results/")
    ap.add_argument("--repredict", action="store_true", help="measure nothing: put the capacity plan's "
                    "current predictions beside the measurements in bench/results/scale_stages.json (after "
                    "its cost table was refitted) and plot again")
    a = ap.parse_args()
    if a.repredict:
        return repredict()
    if a.quick:
        a.sizes, a.factory, a.file_rows = "100000,400000", "IVF256,PQ16", 100_000
    res = {"machine": machine(), "d": a.dim, "factory": a.factory, "shards": a.shards, "runs": []}
    with ray_head() as head:
        for n in (int(x) for x in a.sizes.split(",")):
            res["runs"].append(run(n, a, head["gcs"]))
            q = ratios(res["runs"])
            print("\n".join(show(res["runs"][-1], q["ratio"][-1])), flush=True)
            path = save("scale_stages", {**res, **q}, a.quick)
    res.update(q)
    over = {r["vectors"]: o for r, o in zip(res["runs"], q["over"]) if o}
    print(f"stages over {TARGET}x per million of the first run (train exempt): {over or 'none'}")
    plot(res, path[:-5] + ".png")
    print(path)


if __name__ == "__main__":
    main()

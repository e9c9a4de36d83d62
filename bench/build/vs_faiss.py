"""shardex build against single-process faiss: same vectors, same factory, same threads, same run.

Both are whole commands, timed from outside (interpreter start, imports and, for shardex,
starting local Ray are included):
- `shardex build CORPUS ROOT --vector-column vector --factory F --metric M --shards S`
  (plan, copy of the vectors, train, add, merge, tune, publish with sha256 checks);
- `python bench/build/single_process.py CORPUS F M OUT.index` (read, train on a sample of
  the same size, add, write).
They alternate for --rounds rounds and the best of each is kept. With --on-cluster, each round
also times the same `shardex build` against a Ray cluster that is already running (a
`ray start --head` on this machine, RAY_ADDRESS set), as a Ray job or a user with a cluster
runs it: the ratio without starting and stopping a local Ray. The baseline also runs a
second time with --no-polysemous: faiss's index_factory turns on polysemous training for
8-bit PQs, which shardex skips (it never searches that way, and results are the same), so
that ratio compares the same work. Then the indexes answer
the dataset's held-out queries at nprobe 1, 2, 4, ... and recall@10 is compared nprobe by
nprobe. With --seeds N, both sides are also built (untimed) from seeds 1..N-1, and their mean
recall compared: the seed picks the training sample and so k-means' start, which alone moves
recall@10 at low nprobe by about 0.01. Target: shardex within 1.10x the baseline's wall time,
recall@10 within 0.01.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/build/vs_faiss.py --dataset synth-1000000 \\
        --factory IVF4096,PQ32 --metric l2
    flock /tmp/shardex-bench.lock .venv/bin/python bench/build/vs_faiss.py --dataset minilm-50000 \\
        --factory IVF1024,PQ48 --metric ip
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT, RESULTS, faiss_search, loadavg, machine, run_cli, save, shardex_search, sweep


def baseline(corpus: str, factory: str, metric: str, out: str, threads: int, polysemous: bool = True,
             seed: int = 0) -> dict:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "single_process.py")
    t0 = time.time()
    p = subprocess.run([sys.executable, script, corpus, factory, metric, out, "--threads", str(threads),
                        "--seed", str(seed)] + ([] if polysemous else ["--no-polysemous"]),
                       capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return {"wall": round(wall, 2), **json.loads(p.stdout.strip().splitlines()[-1])}


def shardex(corpus: str, root: str, factory: str, metric: str, shards: int, address: str | None = None,
            seed: int = 0) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    wall, out, _ = run_cli(["build", corpus, root, "--vector-column", "vector", "--factory", factory,
                            "--metric", metric, "--shards", str(shards), "--seed", str(seed), "--json"],
                           env={"RAY_AUTH_MODE": "disabled", **({"RAY_ADDRESS": address} if address else {})})
    s = json.loads(out)
    return {"wall": round(wall, 2), "stages": s["seconds"], "nprobe": s["nprobe"],
            "recall_at_10_published": s["recall_at_10"], "index_bytes": s["index_bytes"]}


def ladder(top: int) -> list[int]:
    out, p = [], 1
    while p <= top:
        out.append(p)
        p *= 2
    return out


def running_head(on: bool):
    """A `ray start --head` of its own (tests/rayhead.py), or nothing."""
    if not on:
        return contextlib.nullcontext(None)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
    from rayhead import start_head

    return start_head(num_cpus=os.cpu_count())


def seed_curves(path: str, work: str, factory: str, metric: str, shards: int, seeds: int, nprobes: list[int],
                first: tuple[list, list]) -> dict:
    """Recall per nprobe of builds from seeds 0..seeds-1, on each side. The seed picks the training sample
    and so where k-means starts: luck, which at low nprobe moves recall@10 by about as much as the target
    allows. The mean over seeds compares the methods; the spread says how far each side moves by itself.
    first: the seed-0 curves (faiss without polysemous, shardex) the timed runs already made."""
    import faiss

    xq, gt = np.load(f"{path}/queries.npy"), np.load(f"{path}/gt.npy")
    fa, sx = [first[0]], [first[1]]
    for s in range(1, seeds):
        baseline(f"{path}/corpus", factory, metric, f"{work}/single-seed{s}.index", os.cpu_count(), False, seed=s)
        fa.append(sweep(faiss_search(faiss.read_index(f"{work}/single-seed{s}.index")), xq, gt, nprobes, reps=1))
        shardex(f"{path}/corpus", f"{work}/index-seed{s}", factory, metric, shards, seed=s)
        sx.append(sweep(shardex_search(f"{work}/index-seed{s}")[0], xq, gt, nprobes, reps=1))

    def stats(curves):
        r = np.array([[row["recall"] for row in c] for c in curves])
        return r.mean(axis=0), r.max(axis=0) - r.min(axis=0)

    (mf, rf), (ms, rs) = stats(fa), stats(sx)
    return {"seeds": seeds, "recall_faiss_by_seed": fa, "recall_shardex_by_seed": sx,
            "recall_mean": [{"nprobe": p, "faiss": round(float(a), 4), "shardex": round(float(b), 4),
                             "diff": round(float(b - a), 4), "faiss_range": round(float(c), 4),
                             "shardex_range": round(float(d), 4)} for p, a, b, c, d in zip(nprobes, mf, ms, rf, rs)],
            "max_abs_recall_mean_diff": round(float(np.abs(ms - mf).max()), 4),
            "max_recall_range_faiss": round(float(rf.max()), 4), "max_recall_range_shardex": round(float(rs.max()), 4)}


def run(dataset: str, factory: str, metric: str, shards: int, rounds: int, top_nprobe: int,
        on_cluster: bool = False, seeds: int = 1) -> dict:
    import faiss

    path = f"{OUT}/{dataset}"
    if not os.path.exists(f"{path}/gt.npy"):
        raise SystemExit(f"{path}: no dataset; make it with common.synthetic(N) or minilm.py")
    work = f"{OUT}/vs_faiss-{dataset}"
    os.makedirs(work, exist_ok=True)
    threads = os.cpu_count()
    load = [loadavg()]
    runs = {"baseline": [], "baseline_same_work": [], "shardex": [],
            **({"shardex_on_cluster": []} if on_cluster else {})}
    with running_head(on_cluster) as head:
        for _ in range(rounds):
            runs["baseline"].append(baseline(f"{path}/corpus", factory, metric, f"{work}/single.index", threads))
            runs["baseline_same_work"].append(baseline(f"{path}/corpus", factory, metric, f"{work}/single-np.index",
                                                       threads, polysemous=False))
            runs["shardex"].append(shardex(f"{path}/corpus", f"{work}/index", factory, metric, shards))
            if head:
                runs["shardex_on_cluster"].append(shardex(f"{path}/corpus", f"{work}/index-c", factory, metric,
                                                          shards, head["gcs"]))
            load.append(loadavg())
    bl = min(runs["baseline"], key=lambda r: r["wall"])
    bw = min(runs["baseline_same_work"], key=lambda r: r["wall"])
    sx = min(runs["shardex"], key=lambda r: r["wall"])
    cl = min(runs["shardex_on_cluster"], key=lambda r: r["wall"]) if on_cluster else None
    xq, gt = np.load(f"{path}/queries.npy"), np.load(f"{path}/gt.npy")
    faiss.omp_set_num_threads(threads)
    nprobes = ladder(top_nprobe)
    curve_bl = sweep(faiss_search(faiss.read_index(f"{work}/single.index")), xq, gt, nprobes)
    curve_bw = sweep(faiss_search(faiss.read_index(f"{work}/single-np.index")), xq, gt, nprobes)
    search, m = shardex_search(f"{work}/index")
    curve_sx = sweep(search, xq, gt, nprobes)
    diffs = [round(a["recall"] - b["recall"], 4) for a, b in zip(curve_sx, curve_bl)]
    spread = seed_curves(path, work, factory, metric, shards, seeds, nprobes, (curve_bw, curve_sx)) if seeds > 1 else {}
    at = next((i for i, p in enumerate(nprobes) if p == sx["nprobe"]), None)
    return {"dataset": dataset, "vectors": m.ntotal, "dim": m.encoder.dim, "factory": factory, "metric": metric,
            "shards": shards, "threads": threads, "rounds": rounds, "runs": runs, "baseline": bl, "shardex": sx,
            "ratio_wall": round(sx["wall"] / bl["wall"], 3),
            "baseline_same_work": bw, "ratio_wall_same_work": round(sx["wall"] / bw["wall"], 3),
            "recall_baseline_same_work": curve_bw,
            "max_abs_recall_diff_baselines": max(abs(a["recall"] - b["recall"]) for a, b in zip(curve_bl, curve_bw)),
            **({"shardex_on_cluster": cl, "ratio_wall_on_cluster": round(cl["wall"] / bl["wall"], 3)} if cl else {}),
            "recall_baseline": curve_bl, "recall_shardex": curve_sx, "recall_diff_shardex_minus_baseline": diffs,
            "max_abs_recall_diff": max(abs(d) for d in diffs), **spread,
            "at_published_nprobe": ({"nprobe": sx["nprobe"], "shardex": curve_sx[at]["recall"],
                                     "baseline": curve_bl[at]["recall"]} if at is not None else None),
            "machine": machine(), "loadavg": load}


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    left = 0.0
    for st, sec in res["shardex"]["stages"].items():
        a.barh("shardex build", sec, left=left, label=st)
        left += sec
    a.barh("shardex build", res["shardex"]["wall"] - left, left=left, color="lightgrey", label="start, Ray, exit")
    for key, row in (("baseline", "faiss defaults"), ("baseline_same_work", "faiss, no polysemous")):
        bl, left = res[key], 0.0
        for st, c in (("read", "tab:grey"), ("train", "tab:green"), ("add", "tab:olive"), ("write", "tab:cyan")):
            a.barh(row, bl[st], left=left, color=c, hatch="//", label=f"baseline {st}" if key == "baseline" else None)
            left += bl[st]
        a.barh(row, bl["wall"] - left, left=left, color="lightgrey")
    a.set_xlabel("seconds")
    a.legend(fontsize=6, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    a.set_title(f"{res['dataset']}: {res['factory']}, {res['threads']} threads; ratio {res['ratio_wall']:.2f}x "
                f"({res['ratio_wall_same_work']:.2f}x same work)",
                fontsize=9)
    for key, label in (("recall_baseline", "faiss defaults"), ("recall_baseline_same_work", "faiss, no polysemous"),
                       ("recall_shardex", "shardex")):
        b.plot([r["nprobe"] for r in res[key]], [r["recall"] for r in res[key]], "o-", label=label, ms=3)
    for key, label in (("recall_faiss_by_seed", "faiss"), ("recall_shardex_by_seed", "shardex")):
        if key in res:  # --seeds: each side's range over its seeds
            r = np.array([[row["recall"] for row in c] for c in res[key]])
            b.fill_between([row["nprobe"] for row in res[key][0]], r.min(axis=0), r.max(axis=0), alpha=0.25,
                           label=f"{label}, {len(r)} seeds")
    b.set_xscale("log", base=2)
    b.set_xlabel("nprobe")
    b.set_ylabel("recall@10 (held-out queries)")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="synth-1000000")
    ap.add_argument("--factory", default="IVF4096,PQ32")
    ap.add_argument("--metric", default="l2", choices=["l2", "ip"])
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--top-nprobe", type=int, default=256)
    ap.add_argument("--on-cluster", action="store_true", help="also time shardex against a running Ray head")
    ap.add_argument("--seeds", type=int, default=1,
                    help="also build both sides from seeds 1..N-1 (untimed) and compare mean recall per nprobe")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from this dataset's saved JSON")
    a = ap.parse_args()
    name = f"build_vs_faiss-{a.dataset}"
    if a.replot:
        with open(f"{RESULTS}/{name}.json") as f:
            return plot(json.load(f), f"{RESULTS}/{name}.png")
    res = run(a.dataset, a.factory, a.metric, a.shards, a.rounds, a.top_nprobe, a.on_cluster, a.seeds)
    print(save(name, res))
    plot(res, f"{os.path.dirname(save(name, res))}/{name}.png")
    print(f"{res['dataset']}: shardex {res['shardex']['wall']} s, single process {res['baseline']['wall']} s, "
          f"ratio {res['ratio_wall']}x, {res['ratio_wall_same_work']}x against faiss without polysemous training "
          f"({res['baseline_same_work']['wall']} s; on a running cluster: {res.get('ratio_wall_on_cluster')}x); "
          f"recall@10 max |diff| {res['max_abs_recall_diff']}, of the means over {res.get('seeds', 1)} seeds "
          f"{res.get('max_abs_recall_mean_diff')} (largest spread between seeds: faiss "
          f"{res.get('max_recall_range_faiss')}, shardex {res.get('max_recall_range_shardex')}) "
          f"(at nprobe {res['shardex']['nprobe']}: {res['at_published_nprobe']}); load {res['loadavg']}")


if __name__ == "__main__":
    main()

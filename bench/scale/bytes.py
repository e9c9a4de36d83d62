"""Bytes a build writes as the part count grows (issue 17): the same corpus built with 10, 100 and
1,000 parts (--part-rows), everything else equal, its INDEX_ROOT counted by category:

  work/        the run's scratch (add pieces, merged shards, trained index, tune data): peak and after
  versions/    the published version's index files (its docs/ stored fields apart)
  embeddings/  the vectors parts (their docs/ apart)

against the ideal N x (c + 8) per copy of the codes kept, plus one trained index per shard and one
per version, per copy (c: the code bytes of a vector; the trained index's size read from
versions/<v>/trained.index; copies: the directories that hold a merged shard-0, today
work/<run>/shards/ and versions/<v>/). The peak is sampled: the root is walked every --every s while
the build runs. Also the bytes training read against the sample's size, from the train record
(work/<run>/trained.index.json: sample_bytes_read, sample_bytes; "n/a" before a build records them).
Targets: the part counts within 1.2x of each other, each within 1.5x of the ideal.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/scale/bytes.py            # 60k x 768, IVF1024,PQ64
    flock /tmp/shardex-bench.lock .venv/bin/python bench/scale/bytes.py --quick    # 6k x 64, 10 and 100 parts
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    OUT,
    MiB,
    clustered,
    files_under,
    loadavg,
    machine,
    mib,
    run_build,
    save,
    tree_bytes,
)

ID_BYTES = 8
SPREAD_TARGET, IDEAL_TARGET = 1.2, 1.5


def codes(trained: str) -> int:
    """Code bytes of one vector in the trained index (the IVF's codes, not the list number)."""
    import faiss

    idx = faiss.read_index(trained)
    try:
        return faiss.extract_index_ivf(idx).code_size
    except RuntimeError:
        return idx.sa_code_size()            # not IVF: a flat code


def copies(root: str) -> list[str]:
    """Directories holding a merged shard 0 (add pieces excluded): each is one copy of the codes."""
    from index_builder.workdir import shard_name

    want = f"{shard_name(0)}.index"
    return sorted({os.path.dirname(r) for r, _ in files_under(root)
                   if os.path.basename(r) == want and "/add/" not in f"/{r}"})


def trained_path(root: str, s: dict) -> str:
    """The version's trained index, or the run's when the version refers to it instead of a copy."""
    v = f"{root}/versions/{s['version']}/trained.index"
    return v if os.path.exists(v) else f"{root}/{s['work']}/trained.index"


def train_read(rec: dict | None) -> dict:
    if not rec or "sample_bytes_read" not in rec or "sample_bytes" not in rec:
        return {"read": None, "sample": None, "ratio": None}
    r, b = rec["sample_bytes_read"], rec["sample_bytes"]
    return {"read": r, "sample": b, "ratio": round(r / b, 3) if b else None}


def run(src: str, n: int, d: int, parts: int, files: int, a) -> dict:
    root = f"{OUT}/bytes-{parts}"
    shutil.rmtree(root, ignore_errors=True)
    part_rows = math.ceil(n / parts)
    before = loadavg()
    b = run_build(src, root, ["--factory", a.factory, "--shards", str(a.shards), "--metric", "l2",
                              "--part-rows", str(part_rows)], tree_every=a.every)
    s = b["summary"]
    after = tree_bytes(root)
    t = os.path.getsize(trained_path(root, s))
    c = codes(trained_path(root, s))
    k = copies(root)
    ideal = max(len(k), 1) * (n * (c + ID_BYTES) + (a.shards + 1) * t)
    by = after["bytes"]
    index = by["work"] + by["versions"]
    res = {"parts": after["files"]["embeddings"], "part_rows": part_rows, "files": files, "wall": b["wall"],
           "seconds": s["seconds"], "after": after, "during": b["tree"], "trained_bytes": t, "code_bytes": c,
           "copies": k, "index_bytes": index, "peak_index_bytes": b["tree"]["peak_bytes"]["work"] + by["versions"],
           "ideal_bytes": ideal, "over_ideal": round(index / ideal, 3),
           "embeddings_ideal": n * (d * 4 + ID_BYTES), "train_read": train_read(b["train_record"]),
           "summary_index_bytes": s["index_bytes"], "loadavg": [before, loadavg()], "cmd": b["cmd"]}
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    return res


def show(r: dict) -> str:
    by, tr = r["after"]["bytes"], r["train_read"]
    tread = (f"{mib(tr['read'])} / {mib(tr['sample'])} MiB ({tr['ratio']}x)" if tr["ratio"] is not None
             else "n/a")
    return (f"{r['parts']:>6} parts  work {mib(by['work'])} (peak {mib(r['during']['peak_bytes']['work'])})  "
            f"versions {mib(by['versions'])}  index {mib(r['index_bytes'])} MiB = {r['over_ideal']}x ideal "
            f"{mib(r['ideal_bytes'])} ({len(r['copies'])} copies)  embeddings {mib(by['embeddings'])} "
            f"(+docs {mib(by['embeddings_docs'])}; ideal {mib(r['embeddings_ideal'])})  version docs "
            f"{mib(by['versions_docs'])}  root peak {mib(r['during']['peak_total'])}  train read {tread}  "
            f"{r['wall']:.0f} s")


def verdict(runs: list[dict]) -> dict:
    xs = [r["index_bytes"] for r in runs]
    spread = round(max(xs) / min(xs), 3)
    worst = max(r["over_ideal"] for r in runs)
    return {"spread": spread, "spread_ok": spread <= SPREAD_TARGET, "worst_over_ideal": worst,
            "ideal_ok": worst <= IDEAL_TARGET,
            "vs_first": [round(x / xs[0], 3) for x in xs]}


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    keys = [("work after", lambda r: r["after"]["bytes"]["work"]),
            ("work peak", lambda r: r["during"]["peak_bytes"]["work"]),
            ("versions", lambda r: r["after"]["bytes"]["versions"]),
            ("embeddings", lambda r: r["after"]["bytes"]["embeddings"]),
            ("ideal (index)", lambda r: r["ideal_bytes"])]
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.8 / len(keys)
    for i, (name, f) in enumerate(keys):
        ax.bar([j + i * w for j in range(len(runs))], [f(r) / MiB for r in runs], w, label=name)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(runs))], [f"{r['parts']:,} parts" for r in runs])
    ax.set_yscale("log")
    ax.set_ylabel("MiB on disk")
    ax.set_title(f"{res['n']:,} x {res['d']}, {res['factory']}, {res['shards']} shards: bytes by part count",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--factory", default="IVF1024,PQ64")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--parts", default="10,100,1000", help="part counts to build with, comma-separated")
    ap.add_argument("--files", type=int, default=10, help="Parquet files of the corpus")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between walks of the root")
    ap.add_argument("--keep", action="store_true", help="keep each index root under bench/out/scale/")
    ap.add_argument("--quick", action="store_true", help="6k x 64, IVF64,PQ16, 10 and 100 parts; results "
                    "under bench/out/scale/, not bench/results/")
    a = ap.parse_args()
    if a.quick:
        a.n, a.dim, a.factory, a.parts, a.every = 6000, 64, "IVF64,PQ16", "10,100", 0.5
    src = clustered(a.n, a.dim, a.files)
    res = {"machine": machine(), "n": a.n, "d": a.dim, "factory": a.factory, "shards": a.shards, "runs": []}
    for p in (int(x) for x in a.parts.split(",")):
        res["runs"].append(run(src, a.n, a.dim, p, a.files, a))
        print(show(res["runs"][-1]), flush=True)
    res["verdict"] = v = verdict(res["runs"])
    print(f"index bytes across part counts: {v['spread']}x (target <= {SPREAD_TARGET}; against the first: "
          f"{v['vs_first']}); worst against the ideal: {v['worst_over_ideal']}x (target <= {IDEAL_TARGET})")
    path = save("scale_bytes", res, a.quick)
    plot(res, path[:-5] + ".png")
    print(path)


if __name__ == "__main__":
    main()

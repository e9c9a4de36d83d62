"""`shardex encode` against a plain single-process sentence-transformers loop, whole processes.

Same texts (every standard-library docstring), same weights, same machine and cores, in the same
run. The plain loop is `model.encode(texts, batch_size=64)` in one process; shardex is the
`shardex encode` command, local Ray start and per-part commits included. Prints docs/s of each
and the ratio (target: >= 0.95), the padding length sorting saved, and how far apart the two
sets of vectors are. Writes bench/results/encode_cpu.json and .png.

    .venv/bin/python bench/encode/cpu.py [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow.dataset as ds

from index_builder.demo.textcorpus import write_corpus
from shards.encoder import resolve_model

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "out", "encode")
RESULTS = os.path.join(HERE, "..", "results")
SHARDEX = os.path.join(os.path.dirname(sys.executable), "shardex")


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{cmd[:3]} failed:\n{p.stderr[-3000:]}")
    return time.time() - t0, p.stdout


def plain(corpus: str, npy: str) -> float:
    return timed([sys.executable, os.path.join(HERE, "plain_loop.py"), corpus, npy, "--model", resolve_model(None)])[0]


def shardex(corpus: str, out: str) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    secs, stdout = timed([SHARDEX, "encode", corpus, out, "--json"])
    return secs, json.loads(stdout)


def agreement(corpus: str, npy: str, emb: str) -> float:
    """Largest |difference| between the two encodings of the same document."""
    ids = ds.dataset(corpus).to_table(columns=["id"]).column(0).to_pylist()
    ref = dict(zip(ids, np.load(npy)))
    t = ds.dataset(emb).to_table(columns=["id", "vector"])
    x = np.array(t.column("vector").to_pylist(), dtype=np.float32)
    return float(max(np.abs(ref[i] - v).max() for i, v in zip(t.column("id").to_pylist(), x)))


def plot(res: dict, path: str) -> None:
    import matplotlib  # the `bench` extra
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.4))
    names = ["plain model.encode", "shardex encode"]
    vals = [res["plain_docs_per_s"], res["shardex_docs_per_s"]]
    ax.barh(names, vals, color=["grey", "tab:blue"])
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xlabel("documents/s, whole process")
    ax.set_title(f"{res['documents']:,} docstrings, {res['machine']}: ratio {res['ratio']:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each; the best of each is kept")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    load0 = open("/proc/loadavg").read().split()[:3]
    corpus, npy, emb = os.path.join(OUT, "corpus"), os.path.join(OUT, "plain.npy"), os.path.join(OUT, "emb")
    shutil.rmtree(corpus, ignore_errors=True)
    n = write_corpus(corpus, limit=None)["documents"]
    runs = {"plain": [], "shardex": []}
    for _ in range(a.rounds):
        runs["plain"].append(round(plain(corpus, npy), 2))
        secs, summary = shardex(corpus, emb)
        runs["shardex"].append(round(secs, 2))
        print(f"plain {runs['plain'][-1]:.1f} s, shardex {secs:.1f} s", flush=True)
    tp, ts = min(runs["plain"]), min(runs["shardex"])
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, CPU only", "documents": n, "runs_s": runs,
           "plain_docs_per_s": round(n / tp, 2), "shardex_docs_per_s": round(n / ts, 2),
           "ratio": round(tp / ts, 3), "target": 0.95,
           "tokens": summary["tokens"], "padded_tokens": summary["padded"],
           "padded_tokens_unsorted": summary["padded_unsorted"],
           "padding_saved": round(1 - summary["padded"] / summary["padded_unsorted"], 3),
           "max_abs_diff_vs_plain": agreement(corpus, npy, emb), "parts": summary["parts"],
           "loadavg_before_after": [load0, open("/proc/loadavg").read().split()[:3]]}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "encode_cpu.json"), "w") as f:
        json.dump(res, f, indent=2)
    plot(res, os.path.join(RESULTS, "encode_cpu.png"))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

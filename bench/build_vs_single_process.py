"""What the pipeline costs over the simplest thing that works, on the demo corpus.

shardex build (Ray: plan, encode actors, train, add, merge, tune, publish) against a
single process that encodes every document with the same encoder and threads, then
trains and adds into one faiss index of the same factory. Both read the same Parquet.
The ratio is shardex's wall time over the baseline's: on one small machine it is the
price of parallel stages, checkpoints and publishing; on a cluster it is what buys the
scaling. Prints the table, writes bench/results/build_vs_single_process.json and a .png.

    .venv/bin/python bench/build_vs_single_process.py [--docs 5000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time

import pyarrow.dataset as ds

from index_builder.config import BuildConfig
from index_builder.demo.textcorpus import write_corpus
from index_builder.pipeline import build
from shards.encoder import Encoder
from shards.raytools import ensure_ray

OUT = os.path.join(os.path.dirname(__file__), "out")          # scratch: corpus and index (ignored by git)
RESULTS = os.path.join(os.path.dirname(__file__), "results")  # what bench/README.md reports


def baseline(corpus: str, factory: str, metric: str, threads: int) -> dict:
    """One process: read, encode, train, add. No Ray, no checkpoints, nothing published."""
    import faiss

    t0 = time.time()
    texts = ds.dataset(corpus).to_table(columns=["text"]).column(0).to_pylist()
    enc = Encoder(threads=threads)
    t1 = time.time()
    xb = enc.encode_documents(texts)
    t2 = time.time()
    index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
    index.train(xb)
    index.add(xb)
    t3 = time.time()
    return {"load": round(t1 - t0, 2), "encode": round(t2 - t1, 2), "index": round(t3 - t2, 2),
            "total": round(t3 - t0, 2), "vectors": len(xb)}


def shardex(corpus: str, root: str, shards: int) -> dict:
    t0 = time.time()
    ensure_ray()
    t1 = time.time()
    s = build(BuildConfig(source=corpus, index_root=root, fields=["title", "text"], shards=shards, part_rows=1000))
    t2 = time.time()
    return {"ray_start": round(t1 - t0, 2), "build": round(t2 - t1, 2), "stages": s.seconds, "rates": s.rates,
            "factory": s.factory, "documents": s.documents, "index_bytes": s.index_bytes,
            "nprobe": s.nprobe, "recall_at_10": s.recall_at_10}


def plot(res: dict, path: str) -> None:
    import matplotlib  # the `bench` extra: pip install -e '.[cpu,bench]'
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    st = res["shardex"]["stages"]
    fig, ax = plt.subplots(figsize=(8, 2.6))
    left = 0.0
    for name, sec in st.items():
        ax.barh("shardex", sec, left=left, label=name)
        left += sec
    b = res["baseline"]
    ax.barh("single process", b["load"], color="grey")
    ax.barh("single process", b["encode"], left=b["load"], color="tab:orange")
    ax.barh("single process", b["index"], left=b["load"] + b["encode"], color="tab:green")
    ax.set_xlabel("seconds")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{res['documents']:,} stdlib docstrings, {res['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=5000)
    ap.add_argument("--shards", type=int, default=2)
    a = ap.parse_args()
    work = os.path.join(OUT, "build_vs_single_process")
    shutil.rmtree(work, ignore_errors=True)
    corpus = os.path.join(work, "corpus")
    info = write_corpus(corpus, limit=a.docs)
    sx = shardex(corpus, os.path.join(work, "index"), a.shards)
    bl = baseline(corpus, sx["factory"], "ip", threads=os.cpu_count())
    from shards.encoder import pick_device

    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, device {pick_device()}",
           "documents": info["documents"],
           "shardex": sx, "baseline": bl, "ratio_build_over_baseline": round(sx["build"] / bl["total"], 2)}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "build_vs_single_process.json"), "w") as f:
        json.dump(res, f, indent=2)
    plot(res, os.path.join(RESULTS, "build_vs_single_process.png"))
    print(f"documents       {res['documents']:,}  ({sx['factory']}, {a.shards} shards)")
    print(f"ray start       {sx['ray_start']:7.1f} s")
    for k, v in sx["stages"].items():
        print(f"  {k:<12} {v:7.1f} s")
    print(f"shardex build   {sx['build']:7.1f} s")
    print(f"single process  {bl['total']:7.1f} s  "
          f"(load {bl['load']} s, encode {bl['encode']} s, index {bl['index']} s)")
    print(f"ratio           {res['ratio_build_over_baseline']:.2f}x")


if __name__ == "__main__":
    main()

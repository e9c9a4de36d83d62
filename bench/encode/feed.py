"""The host side of encoding, alone: texts to padded batches, docs/s per CPU core, on this CPU.

On a GPU this side sets the pace (bench/README.md: 22.8k docs/s forward pass alone for
all-MiniLM-L6-v2 on an H100, about 6k through one process). Measured, same texts, same token
limit, one core each unless said:
  baseline   sentence-transformers' own tokenize (the transformers tokenizer call, padding and
             tensors), batches of 64 in input order: what model.encode does per batch
  in-process shardex's FastTokenizer.batches (Rust tokenizer, numpy padding, token-budget batches)
  feeder W   index_builder/encode/feed.py with W tokenizer processes: docs/s in all, per process,
             and the CPU seconds the calling (kernel-launching) process still spends per 1k docs
on two corpora: the standard library's docstrings (long: most reach the 256-token limit) and their
first sentences (short). Then the cores that feed one GPU at the forward-pass rate. Writes
bench/results/encode_feed.json and .png.

    .venv/bin/python bench/encode/feed.py [--repeat 8] [--workers 1,2]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per tokenizer: rates are per core

from index_builder.demo.textcorpus import stdlib_docstrings
from index_builder.encode.feed import Feeder
from shards.encoder import Encoder

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "..", "results")
FORWARD_H100 = 22_800  # docs/s, forward pass alone, MiniLM fp16 batches of 256 (bench/README.md, gpu.py)
PART = 5000            # texts per call, as a part of --part-rows 5000


def timed(fn, texts: list[str]) -> tuple[float, float]:
    """(docs/s, CPU seconds of this process per 1k docs) over parts of PART texts."""
    fn(texts[:PART])  # warm-up: workers spawned, caches filled
    w0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), PART):
        fn(texts[i:i + PART])
    w, c = time.perf_counter() - w0, time.process_time() - c0
    return len(texts) / w, 1000 * c / len(texts)


def corpora(repeat: int) -> dict[str, list[str]]:
    docs = [r["text"] for r in stdlib_docstrings(limit=None)]
    first = [d.split(". ")[0][:300] for d in docs]
    return {"docstrings": docs * repeat, "first_sentences": first * repeat}


def measure(enc: Encoder, texts: list[str], workers: list[int]) -> dict:
    st = enc.model.tokenize if hasattr(enc.model, "tokenize") else enc._preprocess

    def baseline(ts):
        for i in range(0, len(ts), 64):
            st(ts[i:i + 64])

    r = {"documents": len(texts), "tokens_per_doc": round(float(enc.tokenize(texts[:PART]).lens.mean()), 1)}
    r["baseline_docs_per_s"] = round(timed(baseline, texts)[0], 1)
    r["in_process_docs_per_s"] = round(timed(lambda ts: enc.fast.batches(ts, enc.batch_tokens), texts)[0], 1)
    for w in workers:
        f = Feeder(enc.fast, enc.batch_tokens, w)
        rate, cpu = timed(f, texts)
        f.close()
        r[f"feeder_{w}"] = {"docs_per_s": round(rate, 1), "docs_per_s_per_process": round(rate / w, 1),
                            "caller_cpu_s_per_1k_docs": round(cpu, 4)}
    r["ratio_in_process_over_baseline"] = round(r["in_process_docs_per_s"] / r["baseline_docs_per_s"], 2)
    per_core = r[f"feeder_{max(workers)}"]["docs_per_s_per_process"]  # every core busy, as on a node
    r["cores_to_feed_h100_forward"] = math.ceil(FORWARD_H100 / per_core)
    return r


def plot(res: dict, path: str) -> None:
    import matplotlib  # the `bench` extra
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
    for ax, (name, r) in zip(axes, res["corpora"].items()):
        labels = ["st tokenize", "in-process"] + [f"feeder x{w}" for w in res["workers"]]
        vals = [r["baseline_docs_per_s"], r["in_process_docs_per_s"]] + [r[f"feeder_{w}"]["docs_per_s"]
                                                                           for w in res["workers"]]
        ax.barh(labels, vals, color=["grey", "tab:blue"] + ["tab:green"] * len(res["workers"]))
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
        ax.set_title(f"{name} ({r['tokens_per_doc']} tokens/doc)", fontsize=9)
        ax.set_xlabel("documents/s")
    fig.suptitle(res["machine"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--workers", default="1,2")
    a = ap.parse_args()
    workers = [int(w) for w in a.workers.split(",")]
    enc = Encoder(threads=1)
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
           "model": enc.name, "max_seq_length": enc.model.max_seq_length, "batch_tokens": enc.batch_tokens,
           "workers": workers, "forward_h100_docs_per_s": FORWARD_H100, "corpora": {}}
    for name, texts in corpora(a.repeat).items():
        res["corpora"][name] = measure(enc, texts, workers)
        print(name, json.dumps(res["corpora"][name]), flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "encode_feed.json"), "w") as f:
        json.dump(res, f, indent=2)
    plot(res, os.path.join(RESULTS, "encode_feed.png"))


if __name__ == "__main__":
    main()

"""What a nightly reindex costs next to a full build, when 1% of the corpus changed.

Real documents (the paragraphs of this Python's standard-library docstrings, plus the man pages
installed here: index_builder/demo/textcorpus.py), at least 20,000 of them. In one process and one
Ray session:
  1. `shardex build` of the corpus (the full cost: every document through the encoder);
  2. 1% of the corpus changes: 0.5% of documents edited, 0.25% deleted, 0.25% new (real
     documents held out of step 1);
  3. `shardex reindex` of the changed corpus.
The ratio is reindex wall time over build wall time; the target is at most 0.10. Prints the
table, writes bench/results/reindex.json and reindex.png, with /proc/loadavg before and after.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/reindex/run.py [--docs 20000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq

from index_builder.config import BuildConfig, ReindexConfig
from index_builder.demo.textcorpus import SCHEMA, chunks, docstring_paragraphs, man_pages, spread
from index_builder.pipeline import build
from index_builder.reindex.incremental import reindex
from shards.raytools import ensure_ray

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "out", "reindex")
RESULTS = os.path.join(HERE, "..", "results")
TARGET = 0.10
FILES = 8


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def real_documents(n: int) -> list[dict]:
    """n real documents, unique by text, spread over docstring paragraphs and man pages."""
    seen, recs = set(), []
    for r in docstring_paragraphs() + man_pages():
        if r["text"] not in seen:
            seen.add(r["text"])
            recs.append(r)
    if len(recs) < n:
        raise SystemExit(f"only {len(recs):,} real documents here (docstrings + man pages); ask for fewer")
    return spread(recs, n)


def write(corpus: str, recs: list[dict]) -> None:
    os.makedirs(corpus, exist_ok=True)
    for i, chunk in enumerate(chunks(recs, FILES)):
        pq.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), os.path.join(corpus, f"part-{i}.parquet"),
                       row_group_size=1000)


def change(recs: list[dict], fresh: list[dict], frac: float) -> tuple[list[dict], dict]:
    """Edit frac/2 of the documents, delete frac/4, add frac/4 new ones; every file is touched."""
    n = len(recs)
    k_edit, k_del = round(n * frac / 2), round(n * frac / 4)
    picks = [round(i * n / (k_edit + k_del)) for i in range(k_edit + k_del)]   # evenly over every file
    every = (k_edit + k_del) / max(k_del, 1)
    delete = {picks[int(j * every)] for j in range(k_del)}
    edit = set(picks) - delete
    out = []
    for i, r in enumerate(recs):
        if i in delete:
            continue
        if i in edit:  # a real edit: the document now also says what another one is about
            other = recs[(i + n // 2) % n]
            r = {**r, "text": f"{r['text']} See also: {other['title']}."}
        out.append(r)
    return out + fresh, {"edited": len(edit), "deleted": len(delete), "new": len(fresh)}


def plot(res: dict, path: str) -> None:
    import matplotlib  # the `bench` extra
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys([*res["build"]["stages"], *res["reindex"]["stages"]]))
    color = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}  # one colour per stage in both bars
    fig, ax = plt.subplots(figsize=(8, 2.4))
    labelled = set()
    for row, key in ((1, "build"), (0, "reindex")):
        left = 0.0
        for name, sec in res[key]["stages"].items():
            ax.barh(row, sec, left=left, color=color[name], label=None if name in labelled else name)
            labelled.add(name)
            left += sec
    ax.set_yticks([0, 1], [f"reindex (1% changed): {res['reindex']['seconds']:.0f} s",
                           f"full build: {res['build']['seconds']:.0f} s"])
    ax.set_xlabel("seconds")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{res['documents']:,} real documents: reindex / build = {res['ratio']:.3f} "
                 f"(target <= {TARGET})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of the corpus that changes")
    ap.add_argument("--shards", type=int, default=2)
    a = ap.parse_args()
    load_before = loadavg()
    shutil.rmtree(OUT, ignore_errors=True)
    corpus, root = os.path.join(OUT, "corpus"), os.path.join(OUT, "index")
    k_new = round(a.docs * a.changed / 4)
    recs = real_documents(a.docs + k_new)
    base, fresh = recs[:a.docs], recs[a.docs:]      # the new documents are real ones held out of the build
    write(corpus, base)
    ensure_ray()

    t0 = time.time()
    b = build(BuildConfig(source=corpus, index_root=root, fields=["title", "text"], shards=a.shards, part_rows=2000))
    t_build = time.time() - t0

    changed, what = change(base, fresh, a.changed)
    shutil.rmtree(corpus)
    write(corpus, changed)
    t0 = time.time()
    r = reindex(ReindexConfig(source=corpus, index_root=root))
    t_reindex = time.time() - t0

    assert (r.changed, r.deleted, r.new) == (what["edited"], what["deleted"], what["new"]), (r, what)
    assert r.encoded == what["edited"] + what["new"] and r.published
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "loadavg_before": load_before, "loadavg_after": loadavg(),
        "documents": len(base), "changed": what, "touched_fraction": a.changed,
        "build": {"seconds": round(t_build, 2), "stages": b.seconds, "factory": b.factory, "version": b.version},
        "reindex": {"seconds": round(t_reindex, 2), "stages": r.build.seconds, "encoded": r.encoded,
                    "unchanged": r.unchanged, "retrained": r.retrained, "retrain_reason": r.retrain_reason,
                    "drift": r.drift, "version": r.version},
        "ratio": round(t_reindex / t_build, 4), "target": TARGET,
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "reindex.json"), "w") as f:
        json.dump(res, f, indent=2)
    try:
        plot(res, os.path.join(RESULTS, "reindex.png"))
    except ImportError:
        print("(no plot: install the bench extra for matplotlib)")
    print(f"documents      {len(base):,}; changed: {what}")
    print(f"full build     {t_build:7.1f} s  {b.seconds}")
    print(f"reindex        {t_reindex:7.1f} s  {r.build.seconds}")
    print(f"               encoded {r.encoded:,}, reused {r.unchanged:,}, "
          f"quantizer {'retrained: ' + str(r.retrain_reason) if r.retrained else 'reused'}, drift {r.drift}")
    print(f"ratio          {res['ratio']:.3f}  (target <= {TARGET}: {'met' if res['ratio'] <= TARGET else 'MISSED'})")
    print(f"loadavg        before {load_before} / after {res['loadavg_after']}")


if __name__ == "__main__":
    main()

"""A reindex of a vector corpus after 1% of it changed in one file, against the full build (issue 19).

400,000 x 128 clustered vectors in 50 Parquet files (IVF1024,PQ32, 4 shards, hash sharding):
  1. `build` of the corpus;
  2. one file changes: 4,000 vectors of it replaced by new ones (the same distribution);
  3. `reindex` of the changed corpus, keeping the quantizer.
Counted: wall time of each, and the bytes each wrote under INDEX_ROOT (the files it created,
by size, from a listing before and after: a build's work/ scratch included, as it is written),
by top-level directory; the ids the reindex's id check read, and where it found the entries it
marked dead (issue 19 item 5). Targets: reindex bytes <= 5% of the build's, time <= 0.15x.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/reindex/vectors.py [--n 400000] [--files 50]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index_builder.config import BuildConfig, ReindexConfig
from index_builder.pipeline import build
from index_builder.reindex.incremental import reindex
from shards.raytools import ensure_ray

HERE = os.path.dirname(os.path.abspath(__file__))

OUT = os.path.join(HERE, "..", "out", "reindex-vectors")
RESULTS = os.path.join(HERE, "..", "results")
TARGETS = {"bytes": 0.05, "time": 0.15}


def write(path: str, ids: np.ndarray, x: np.ndarray) -> None:
    vec = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    pq.write_table(pa.table({"id": ids, "vector": vec}), path, row_group_size=8192)


def files(root: str) -> dict[str, int]:
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = os.path.getsize(p)
    return out


def written(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Bytes of the files that are new (or changed size) in after, by top-level directory."""
    by = {}
    for p, n in after.items():
        if before.get(p) != n:
            top = p.split(os.sep)[0]
            by[top] = by.get(top, 0) + n
    return by


def located(root: str) -> dict:
    """Where the reindex found the entries it marked dead (the lineage's record of it)."""
    from shards.storage.manifest import current_version, load_manifest
    from shards.storage.store import Store

    store = Store(root)
    return load_manifest(store, current_version(store)).lineage.located


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400_000)
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--d", type=int, default=128)
    a = ap.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    src, root = os.path.join(OUT, "corpus"), os.path.join(OUT, "index")
    os.makedirs(src)
    from faiss.contrib.datasets import SyntheticDataset

    k = a.n // 100  # the change: 1% of the corpus, vectors of the same distribution held out of the build
    xa = SyntheticDataset(a.d, 0, a.n + k, 0, seed=1338).get_database().astype(np.float32)
    x, fresh = xa[:a.n], xa[a.n:]
    ids = np.arange(a.n, dtype=np.int64)
    per = a.n // a.files
    for f in range(a.files):
        write(f"{src}/part-{f:03d}.parquet", ids[f * per:(f + 1) * per], x[f * per:(f + 1) * per])
    ensure_ray()
    common = dict(source=src, index_root=root, vector_column="vector", metric="l2")
    t0 = time.time()
    b = build(BuildConfig(**common, factory="IVF1024,PQ32", shards=4))
    tb, after_build = time.time() - t0, files(root)
    # one file changes: a 1% share of the corpus gets new vectors of the same distribution
    f = a.files // 2
    y = x[f * per:(f + 1) * per].copy()
    y[:k] = fresh
    write(f"{src}/part-{f:03d}.parquet", ids[f * per:(f + 1) * per], y)
    t0 = time.time()
    r = reindex(ReindexConfig(source=src, index_root=root))
    tr, after = time.time() - t0, files(root)
    wb, wr = written({}, after_build), written(after_build, after)
    res = {"n": a.n, "d": a.d, "files": a.files, "changed": k, "factory": "IVF1024,PQ32", "shards": 4,
           "build": {"seconds": round(tb, 2), "bytes": wb, "stages": b.seconds},
           "reindex": {"seconds": round(tr, 2), "bytes": wr, "stages": r.build.seconds if r.build else {},
                       "changed": r.changed, "new": r.new, "deleted": r.deleted, "retrained": r.retrained,
                       "ids_read": r.ids_read, "located": located(root)},
           "ratio": {"bytes": round(sum(wr.values()) / sum(wb.values()), 4), "time": round(tr / tb, 4)},
           "targets": TARGETS, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "reindex_vectors.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    mib = lambda by: ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sorted(by.items()))  # noqa: E731
    print(f"build   {tb:7.1f} s  wrote {sum(wb.values()) / 2**20:8.1f} MiB ({mib(wb)})")
    print(f"reindex {tr:7.1f} s  wrote {sum(wr.values()) / 2**20:8.1f} MiB ({mib(wr)}); "
          f"{r.changed:,} changed, retrained {r.retrained}")
    print(f"id check read {r.ids_read:,} of {a.n:,} ids; replaced entries found {res['reindex']['located']}")
    print(f"ratio   time {res['ratio']['time']:.3f}x (target {TARGETS['time']}), "
          f"bytes {res['ratio']['bytes']:.3f}x (target {TARGETS['bytes']})")


if __name__ == "__main__":
    main()

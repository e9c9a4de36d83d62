"""Ten nightly reindexes of 1% each, with compaction, against a fresh build of the same corpus (issue 19).

The corpus of bench/reindex/vectors.py (400,000 x 128 clustered vectors in 50 files, IVF1024,PQ32,
4 shards). Each night one file changes: 2,000 of its vectors replaced, 1,000 of its rows deleted,
and a new file of 1,000 documents comes: 4,000 documents, 1% of the corpus. `reindex` runs with its
defaults (compaction when a shard's deltas pass 10% of its base, or 8 segments).

Counted each night:
  - the reindex: wall time, bytes written under INDEX_ROOT;
  - the swap a serving replica makes (shards/search/held.py, each shard's HeldShard following the
    versions, as a shard replica does): bytes its process read (/proc/self/io rchar) and seconds to
    load the new version from the one it holds, against a fresh load of the same version.
After the tenth night: a fresh `build` of the final corpus, and both versions searched through the
Python router (backend local, the same threads) at the fresh build's tuned nprobe: QPS (the median
of 7 rounds taken in turn, also per CPU second) and recall@10 against exact search over the live
vectors. Targets: QPS within 10% of the fresh
build's, recall unchanged (within 0.01); each swap reads <= 5% of a full load's bytes.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/reindex/nightly.py [--n 400000] [--nights 10]
    ... nightly.py --search-only      # the last run's final version and fresh build, searched again
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vectors import files, write, written

from index_builder.config import BuildConfig, ReindexConfig
from index_builder.pipeline import build
from index_builder.reindex.incremental import reindex
from shards.raytools import ensure_ray
from shards.search.held import HeldShard
from shards.search.router import Router
from shards.storage.manifest import current_version, load_manifest
from shards.storage.store import Store

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "out", "reindex-nightly")
RESULTS = os.path.join(HERE, "..", "results")
TARGETS = {"qps_ratio_min": 0.9, "recall_drop_max": 0.01, "swap_bytes": 0.05}
FACTORY, SHARDS, THREADS = "IVF1024,PQ32", 4, 2
COMMON = dict(vector_column="vector", metric="l2", factory=FACTORY, shards=SHARDS)


class Corpus:
    """The corpus as files of (ids, vectors), changed night by night from a pool of fresh vectors."""

    def __init__(self, src: str, n: int, d: int, nfiles: int, nights: int, write: bool = True):
        from faiss.contrib.datasets import SyntheticDataset

        self.src, self.per = src, n // nfiles
        self.k = self.per // 8  # 1,000 at the default shape: 4,000 documents a night, 1% of 400,000
        p = nights * 4 * self.k
        xa = SyntheticDataset(d, 0, n + p + 2000, 0, seed=1338).get_database().astype(np.float32)
        self.pool, self.xq = xa[n:n + p], xa[n + p:]
        cut = lambda f: slice(f * self.per, (f + 1) * self.per)  # noqa: E731
        self.parts = {f: (np.arange(n, dtype=np.int64)[cut(f)], xa[cut(f)]) for f in range(nfiles)}
        for f in self.parts if write else []:
            self._write(f)

    def _write(self, f: int) -> None:
        write(f"{self.src}/part-{f:03d}.parquet", *self.parts[f])

    def night(self, i: int, nfiles: int) -> None:
        """File (7 i mod files): 2,000 replaced, 1,000 deleted; a new file of 1,000 documents."""
        k = self.k
        fresh = self.pool[i * 4 * k:(i + 1) * 4 * k]
        f = (7 * i) % nfiles
        ids, x = self.parts[f]
        x = x.copy()
        x[:2 * k] = fresh[:2 * k]
        self.parts[f] = (ids[:-k], x[:-k])
        self._write(f)
        new = 10**7 + i * k + np.arange(k, dtype=np.int64)
        self.parts[1000 + i] = (new, fresh[2 * k:3 * k])
        self._write(1000 + i)

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([p[0] for p in self.parts.values()]),
                np.concatenate([p[1] for p in self.parts.values()]))


def swap(store: Store, held: list[HeldShard], v: str) -> dict:
    """The replicas' swap to v (each shard's held versions) against a fresh load of v."""
    from shards.storage import integrity

    out = {"in_place": {"bytes": 0, "seconds": 0.0}, "full": {"bytes": 0, "seconds": 0.0}}
    for s, h in enumerate(held):
        h.get(v)
        integrity._known.clear()  # a new replica's process has hashed no file yet: it reads each twice
        fresh = HeldShard(store, s, {}, THREADS)
        fresh.get(v)
        for kind, rec in (("in_place", h.loads[v]), ("full", fresh.loads[v])):
            out[kind]["bytes"] += rec["bytes_read"]
            out[kind]["seconds"] += rec["seconds"]
    out["ratio_bytes"] = round(out["in_place"]["bytes"] / out["full"]["bytes"], 4)
    out["ratio_seconds"] = round(out["in_place"]["seconds"] / out["full"]["seconds"], 4)
    return out


def qps_recall(roots: dict[str, tuple[str, str]], xq: np.ndarray, gt: np.ndarray, nprobe: int,
               rounds: int = 7) -> dict:
    """Per name, (root, version) searched through the Python router: QPS as the median of `rounds`
    rounds taken in turn (this machine's timings drift by 20% within a minute: alternating keeps the
    ratio fair), the same per CPU second used, and recall@10."""
    rs = {k: Router(root, version=v, backend="local", threads=THREADS) for k, (root, v) in roots.items()}
    wall, cpu, rec = {k: [] for k in rs}, {k: [] for k in rs}, {}
    try:
        for _ in range(rounds):
            for k, r in rs.items():
                t, c = time.perf_counter(), time.process_time()
                _, I = r.search_vectors(xq, k=10, nprobe=nprobe)
                wall[k].append(len(xq) / (time.perf_counter() - t))
                cpu[k].append(len(xq) / (time.process_time() - c))
                rec[k] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, gt)]))
    finally:
        for r in rs.values():
            r.close()
    return {k: {"qps": round(float(np.median(wall[k])), 1), "qps_per_cpu_s": round(float(np.median(cpu[k])), 1),
                "recall_at_10": round(rec[k], 4)} for k in rs}


def run_nights(c: Corpus, src: str, root: str, nights: int, nfiles: int) -> tuple[float, list[dict]]:
    """The build, then each night's change, reindex and swap; (build seconds, one record a night)."""
    t0 = time.time()
    build(BuildConfig(**COMMON, source=src, index_root=root))
    tb, store, out = time.time() - t0, Store(root), []
    held = [HeldShard(store, s, {}, THREADS) for s in range(SHARDS)]
    for h in held:
        h.get(current_version(store))
    for i in range(nights):
        c.night(i, nfiles)
        before, t0 = files(root), time.time()
        r = reindex(ReindexConfig(source=src, index_root=root))
        tr, v = time.time() - t0, current_version(store)
        m = load_manifest(store, v)
        n = {"night": i + 1, "version": v, "seconds": round(tr, 2), "bytes": sum(written(before, files(root)).values()),
             "new": r.new, "changed": r.changed, "deleted": r.deleted, "retrained": r.retrained,
             "compacted": sorted(m.lineage.compacted), "deltas": [len(sh.deltas) for sh in m.shards],
             "swap": swap(store, held, v)}
        out.append(n)
        w = n["swap"]
        print(f"night {i + 1:2d}: reindex {tr:5.1f} s, wrote {n['bytes'] / 2**20:6.1f} MiB, compacted "
              f"{n['compacted'] or '-'}, deltas {n['deltas']}; swap read {w['in_place']['bytes'] / 2**20:6.1f}"
              f" MiB in {w['in_place']['seconds']:.2f} s vs full {w['full']['bytes'] / 2**20:6.1f}"
              f" MiB in {w['full']['seconds']:.2f} s ({w['ratio_bytes']:.3f}x bytes)", flush=True)
    return tb, out


def live_corpus(src: str) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    t = pq.read_table(src)
    col = t.column("vector").combine_chunks()
    return t.column("id").to_numpy(), col.values.to_numpy().reshape(len(col), -1).astype(np.float32)


def compare(src: str, root: str, froot: str, xq: np.ndarray) -> dict:
    """The final version against a fresh build of the final corpus (made unless froot holds one)."""
    import faiss

    t0 = time.time()
    if not os.path.exists(os.path.join(froot, "CURRENT")):
        build(BuildConfig(**COMMON, source=src, index_root=froot))
    tf, fv = time.time() - t0, current_version(Store(froot))
    nprobe = load_manifest(Store(froot), fv).search.nprobe
    ids, x = live_corpus(src)
    flat = faiss.IndexFlatL2(x.shape[1])
    flat.add(x)
    gt = ids[flat.search(xq, 10)[1]]
    got = qps_recall({"reindexed": (root, current_version(Store(root))), "fresh": (froot, fv)}, xq, gt, nprobe)
    return {"fresh_build_seconds": round(tf, 2), "nprobe": nprobe, "search": got,
            "qps_ratio": round(got["reindexed"]["qps"] / got["fresh"]["qps"], 3),
            "qps_per_cpu_ratio": round(got["reindexed"]["qps_per_cpu_s"] / got["fresh"]["qps_per_cpu_s"], 3),
            "recall_drop": round(got["fresh"]["recall_at_10"] - got["reindexed"]["recall_at_10"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400_000)
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--nights", type=int, default=10)
    ap.add_argument("--search-only", action="store_true", help="search the last run's versions again")
    a = ap.parse_args()
    src, root, froot = (os.path.join(OUT, x) for x in ("corpus", "index", "fresh"))
    out = os.path.join(RESULTS, "reindex_nightly.json")
    if a.search_only:
        with open(out) as fh:
            res = json.load(fh)
        xq = Corpus(src, a.n, a.d, a.files, a.nights, write=False).xq
    else:
        shutil.rmtree(OUT, ignore_errors=True)
        os.makedirs(src)
        c = Corpus(src, a.n, a.d, a.files, a.nights)
        ensure_ray()
        tb, nights = run_nights(c, src, root, a.nights, a.files)
        res = {"n": a.n, "d": a.d, "files": a.files, "nights": nights, "factory": FACTORY, "shards": SHARDS,
               "build_seconds": round(tb, 2),
               "worst_swap_bytes": max(n["swap"]["ratio_bytes"] for n in nights if not n["compacted"]),
               "compaction_swap_bytes": [n["swap"]["ratio_bytes"] for n in nights if n["compacted"]]}
        xq = c.xq
    res.update(compare(src, root, froot, xq), targets=TARGETS,
               machine={"platform": platform.platform(), "cpus": os.cpu_count()})
    os.makedirs(RESULTS, exist_ok=True)
    with open(out, "w") as fh:
        json.dump(res, fh, indent=2)
    for k, g in res["search"].items():
        print(f"{k:9s}: {g['qps']:8.1f} QPS ({g['qps_per_cpu_s']:.1f} per CPU second), recall@10 "
              f"{g['recall_at_10']:.4f} at nprobe {res['nprobe']}")
    print(f"ratio    : QPS {res['qps_ratio']:.3f}x, per CPU second {res['qps_per_cpu_ratio']:.3f}x (target >= "
          f"{TARGETS['qps_ratio_min']}), recall drop {res['recall_drop']:+.4f}; worst swap of a delta "
          f"{res['worst_swap_bytes']:.3f}x the bytes of a full load (target {TARGETS['swap_bytes']}); nights "
          f"that compacted: {res['compaction_swap_bytes']}")


if __name__ == "__main__":
    main()

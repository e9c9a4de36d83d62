"""Runs inside bench/.venv-lancedb (pinned to one core by bench/build/refine.py): LanceDB's IVF_PQ on a
dataset's .npy vectors, its recall@10 and speed per (nprobes, refine_factor), in batches and one query
at a time; prints one JSON line.

    bench/.venv-lancedb/bin/python bench/build/lancedb_run.py NPY_DIR QUERIES.npy GT.npy WORK METRIC PARTITIONS SUB
"""
import json
import os
import sys
import time

import numpy as np

NPROBES = (16, 32, 64, 128, 256, 512)
REFINE = (None, 2, 4, 10, 20)   # by hand: LanceDB does not choose it
LATENCY_QUERIES = 200
MIN_SECS = 0.2


def recall(I, gt):
    return round(float(np.mean([len(np.intersect1d(a[a >= 0], b)) / 10 for a, b in zip(I, gt)])), 4)


def ids_of(t, nq):
    I = np.full((nq, 10), -1, np.int64)
    qi, ids = t.column("query_index").to_numpy(), t.column("id").to_numpy()
    for q in range(nq):
        got = ids[qi == q][:10]
        I[q, :len(got)] = got
    return I


def main() -> None:
    import lancedb
    import pyarrow as pa

    npy, xq_file, gt_file, work, metric, parts, sub = sys.argv[1:8]
    x = np.concatenate([np.load(f"{npy}/{f}") for f in sorted(os.listdir(npy))])
    xq, gt = np.load(xq_file), np.load(gt_file)
    db = lancedb.connect(work)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    t = pa.table({"id": np.arange(len(x)), "vector": vec})
    tbl = db.create_table("t", t, mode="overwrite")
    t0 = time.time()
    tbl.create_index(metric="dot" if metric == "ip" else "l2", num_partitions=int(parts), num_sub_vectors=int(sub),
                     vector_column_name="vector", index_type="IVF_PQ")
    build = time.time() - t0

    def q(v, p, r):
        s = tbl.search(v).limit(10).nprobes(p).select(["id"])
        return (s.refine_factor(r) if r else s).to_arrow()

    batched, single = {}, {}
    for r in REFINE:
        rows, lat = [], []
        for p in NPROBES:
            runs, t0 = 0, time.perf_counter()
            while True:
                I = ids_of(q(xq, p, r), len(xq))
                runs += 1
                if time.perf_counter() - t0 >= MIN_SECS and runs >= 2:
                    break
            qps = len(xq) * runs / (time.perf_counter() - t0)
            rows.append({"nprobe": p, "recall": recall(I, gt), "qps": round(qps, 1)})
            ts = []
            for i in range(LATENCY_QUERIES):
                t1 = time.perf_counter()
                q(xq[i:i + 1], p, r)
                ts.append((time.perf_counter() - t1) * 1000)
            lat.append({"nprobe": p, "recall": rows[-1]["recall"], "p50_ms": round(float(np.percentile(ts, 50)), 3),
                        "p99_ms": round(float(np.percentile(ts, 99)), 3)})
        batched[str(r or 0)], single[str(r or 0)] = rows, lat
    import lancedb as L
    print(json.dumps({"version": L.__version__, "build_index_s": round(build, 2), "partitions": int(parts),
                      "sub_vectors": int(sub), "batched": batched, "single": single}))


if __name__ == "__main__":
    main()

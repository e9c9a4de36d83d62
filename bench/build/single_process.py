"""The baseline of bench/build/vs_faiss.py: one process, plain faiss, no Ray, nothing checked or published.

It reads the same Parquet files shardex reads, trains the same factory on a sample of the
same size (index_builder.plan.factory.train_size, drawn at random from the whole corpus in
memory), adds every vector with its id, and writes the index to one file. Prints its
timings as JSON on stdout. faiss's defaults as they are, unless --no-polysemous: then it
skips the polysemous training index_factory turns on for 8-bit PQs, as shardex does (the
search results are the same; see index_builder.train.quantizer.skip_polysemous).

    .venv/bin/python bench/build/single_process.py CORPUS_DIR FACTORY METRIC OUT.index [--threads T]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("factory")
    ap.add_argument("metric", choices=["ip", "l2"])
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-polysemous", action="store_true",
                    help="turn off the polysemous training index_factory turns on for 8-bit PQs (as shardex does)")
    a = ap.parse_args()
    t0 = time.time()
    from shards.storage.faissio import faiss as load_faiss  # the same BLAS kernels shardex picks (faissio.CORES)

    faiss = load_faiss()
    import pyarrow.parquet as pq

    from index_builder.plan.factory import train_size
    from index_builder.train.quantizer import skip_polysemous

    faiss.omp_set_num_threads(a.threads)
    ids, xs = [], []
    for f in sorted(glob.glob(os.path.join(a.corpus, "*.parquet"))):
        t = pq.read_table(f, columns=["id", "vector"])
        vec = t.column("vector").combine_chunks()
        ids.append(t.column("id").to_numpy())
        xs.append(vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), -1))
    ids, xb = np.concatenate(ids), np.ascontiguousarray(np.concatenate(xs), dtype=np.float32)
    del xs
    t1 = time.time()
    index = faiss.index_factory(xb.shape[1], a.factory,
                                faiss.METRIC_INNER_PRODUCT if a.metric == "ip" else faiss.METRIC_L2)
    nl = faiss.extract_index_ivf(index).nlist if "IVF" in a.factory else None
    if a.no_polysemous:  # shardex's own switch, so both sides turn off exactly the same step
        skip_polysemous(index)
    n_train = train_size(len(xb), xb.shape[1], a.factory, nl)
    xt = xb[np.random.default_rng(a.seed).choice(len(xb), n_train, replace=False)]
    index.train(xt)
    t2 = time.time()
    index.add_with_ids(xb, ids)
    t3 = time.time()
    faiss.write_index(index, a.out)
    t4 = time.time()
    print(json.dumps({"read": round(t1 - t0, 2), "train": round(t2 - t1, 2), "add": round(t3 - t2, 2),
                      "write": round(t4 - t3, 2), "total_in_process": round(t4 - t0, 2),
                      "train_vectors": n_train, "vectors": len(xb), "threads": a.threads,
                      "polysemous": not a.no_polysemous}))


if __name__ == "__main__":
    main()

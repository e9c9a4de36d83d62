"""The default nprobe: the smallest that reaches the target recall@10 against exact search,
measured on held-out vectors (stored vectors, each left out of its own search) by the measures
of index_builder/eval/measures.py, which `shardex eval` uses too."""
from __future__ import annotations

import io

import numpy as np
import ray

from index_builder.build.merge import open_merged
from index_builder.eval.measures import choose_nprobe, climb, merged_search, merged_truth
from index_builder.workdir import WorkDir
from shards.storage.faissio import faiss, nlist
from shards.storage.store import Store


def ground_truth(store: Store, wd: WorkDir, units: list[str], metric: str, k: int):
    """(query vectors, their ids, exact top-k without themselves) from what each add task found."""
    q = np.load(io.BytesIO(store.read_bytes(wd.queries)))
    res = []
    for u in units:
        g = np.load(io.BytesIO(store.read_bytes(wd.unit_gt(u))))
        res.append((g["D"], g["I"]))
    return q["xq"], q["ids"], merged_truth(res, k, metric, own=q["ids"])


@ray.remote
def tune_task(store: Store, wd: WorkDir, units: list[str], *, shards: int, metric: str, target: float, k: int,
              threads: int) -> dict:
    """The default nprobe of wd's merged shards, and the recall@k it reaches on tune's queries."""
    faiss().omp_set_num_threads(threads)
    index = [open_merged(store, wd, s) for s in range(shards)]
    xq, own, gt = ground_truth(store, wd, units, metric, k)
    nl = nlist(index[0])
    rows = climb(merged_search(index, metric), xq, gt, k, nl, target, own)
    best = choose_nprobe(rows, target)
    return {"nprobe": best["nprobe"], "recall_at_10": best["recall"], "eval_queries": len(xq), "ladder": rows}


def recall_warning(tuned: dict, target: float) -> str | None:
    """The published nprobe's recall when it is under the target: more probing did not reach it
    (the ladder plateaued, or every list was probed), so the codes or the lists are too coarse."""
    r = tuned.get("recall_at_10")
    if r is None or r >= target:
        return None
    at = f"nprobe={tuned['nprobe']}" if tuned.get("nprobe") else "exact scan of the codes"
    return (f"recall: {r:.3f} recall@10 at {at} is under --target-recall {target}, and probing more lists "
            f"does not reach it; give finer codes (a larger --memory-budget, or --factory with a bigger PQ{{M}}, "
            f"SQ8 or Flat) or a lower --target-recall")

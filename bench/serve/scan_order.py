"""Why the router sends a batch grouped by nearest list: scan cost with the queries as given and in that order.

The hash-sharded version of bench/serve/throughput.py (200k x 64, IVF1024,Flat, 2 shards), its
monolithic index, the same queries and nprobe. The coarse search is done once per batch, outside
the timings; then, with the batch as given and grouped by nearest list (shards.search.shard_selection.scan_order):
  shards  both shards scan their half of every probed list at the same time, each in its own
          Ray actor on one thread (what the router runs): wall seconds, and each actor's thread
          CPU seconds, summed
  faiss   the monolithic index scans the same lists in this process on every core
          (search_preassigned, queries split over threads): wall and process CPU seconds
Alternating batch by batch, --rounds times. Reports CPU ms per 1000 queries: the work the
scans cost, apart from the router's dispatch and merge; also per L3 state (see throughput.py:
the host runs the two vCPUs on cores sharing an L3 or not, and pingpong.c tells which, between
batches). Writes bench/results/serve_scan_order.json.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/serve/scan_order.py
"""
from __future__ import annotations

import os
import time

from common import built, core_pingpong_ns, corpus, corpus_args, loadavg, machine, monolithic, queries, save
from throughput import PINGPONG_ROUNDS, l3_state

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def timed_searcher():
    import ray

    from shards.search.searcher import ShardSearcher

    @ray.remote
    class Timed(ShardSearcher):
        """The real shard searcher; search also returns its thread's CPU seconds."""

        def timed_search(self, xq, k, nprobe, coarse):
            c0 = time.thread_time()
            self.search(xq, k, nprobe, None, coarse)
            return time.thread_time() - c0
    return Timed


def main() -> None:
    ap = corpus_args(nq=10_000, rounds=3)
    a = ap.parse_args()
    load_before = loadavg()

    import ray

    from shards.search.shard_selection import scan_order
    from shards.storage.faissio import coarse_search, faiss, ivf, search_preassigned

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="warning")
    src, ids, x = corpus(a.n, a.d)
    root = built(src, f"hash-{a.factory.replace(',', '_')}-{a.n}-s2", factory=a.factory, shards=2,
                 sharding="hash", metric="l2")
    index, m = monolithic(root, ids, x)
    nprobe = m.search.nprobe
    faiss().omp_set_num_threads(os.cpu_count())
    ivf(index).parallel_mode = 3   # search_preassigned splits the queries over threads only in this mode
    from shards.storage.store import Store

    Timed = timed_searcher()
    shards = [Timed.options(num_cpus=0.4).remote(Store(root), m.version, s, 1) for s in m.shards]
    xq = queries(x, a.nq)

    def shards_scan(q, c):
        t0 = time.perf_counter()
        cpu = sum(ray.get([s.timed_search.remote(q, a.k, nprobe, c) for s in shards]))
        return time.perf_counter() - t0, cpu

    def faiss_scan(q, c):
        t0, c0 = time.perf_counter(), time.process_time()
        search_preassigned(index, q, a.k, c)
        return time.perf_counter() - t0, time.process_time() - c0

    batches = []
    for i in range(0, a.nq, a.batch):
        q = xq[i:i + a.batch]
        c = coarse_search(index, q, nprobe)
        o = scan_order(c[1])
        batches.append({"given": (q, c), "ordered": (q[o], (c[0][o], c[1][o]))})
    shards_scan(*batches[0]["given"])
    faiss_scan(*batches[0]["given"])
    tot = {}    # (state, "who order") -> [wall, cpu, queries]
    for _ in range(a.rounds):
        for b in batches:
            for order in ("given", "ordered"):
                for who, scan in (("shards", shards_scan), ("faiss", faiss_scan)):
                    before = core_pingpong_ns(PINGPONG_ROUNDS)
                    w, c = scan(*b[order])
                    for st in ("all", l3_state(before, core_pingpong_ns(PINGPONG_ROUNDS))):
                        t = tot.setdefault((st, f"{who} {order}"), [0.0, 0.0, 0])
                        t[0], t[1], t[2] = t[0] + w, t[1] + c, t[2] + len(b[order][0])

    def per_1000(state):
        return {name: {"wall": round(1e6 * w / n, 1), "cpu": round(1e6 * c / n, 1), "queries": n}
                for (st, name), (w, c, n) in sorted(tot.items()) if st == state}
    res = {"machine": machine(), "n": a.n, "d": a.d, "factory": a.factory, "shards": 2, "nprobe": nprobe, "k": a.k,
           "queries": a.nq, "batch": a.batch, "rounds": a.rounds, "per_1000_queries_ms": per_1000("all"),
           "per_1000_queries_ms_by_l3": {st: per_1000(st) for st in sorted({s for s, _ in tot}) if st != "all"},
           "loadavg_before": load_before, "loadavg_after": loadavg()}
    for st, per in [("all", res["per_1000_queries_ms"]), *res["per_1000_queries_ms_by_l3"].items()]:
        for name, v in per.items():
            print(f"{st:9s} {name:16s} wall {v['wall']:7.1f} ms  cpu {v['cpu']:7.1f} ms  per 1000 queries "
                  f"({v['queries']} queries)")
    save("serve_scan_order", res)


if __name__ == "__main__":
    main()

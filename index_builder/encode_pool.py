"""The encode stage on Ray: a pool of encoder actors (one per GPU, or CPU threads) fed one queue of parts.

Sizing on CPU: actors x torch threads = the CPUs of a node, never more, so
the pool does not oversubscribe the cores. Actors restart when they die and
their in-flight part is retried; parts commit atomically, so a retried part is
written once.
"""
from __future__ import annotations

import time

import ray

from shards.manifest import EncoderInfo

from .config import BuildConfig
from .corpus import Corpus, InputShard
from .encode import PartResult, prepare
from .raytools import log, node_cpus, ray_get

MAX_IN_FLIGHT = 2  # parts queued per actor: one running, one ready, so the actor never idles


@ray.remote(max_restarts=-1, max_task_retries=3)
class EncoderActor:
    def __init__(self, cfg: BuildConfig, threads: int, device: str | None):
        from .encoder import Encoder

        self.cfg = cfg
        self.enc = Encoder(cfg.model, device=device, threads=threads, query_prefix=cfg.query_prefix,
                           document_prefix=cfg.document_prefix, batch_size=cfg.batch_size, metric=cfg.metric)

    def info(self):
        return self.enc.info()

    def run(self, shard: InputShard, fp: str, kind: str) -> PartResult:
        return prepare(shard, self.cfg, fp, None, kind, self.enc.encode_documents)


@ray.remote(max_retries=3)
def prepare_vectors(shard: InputShard, cfg: BuildConfig, fp: str, dim: int, kind: str) -> PartResult:
    return prepare(shard, cfg, fp, dim, kind)


def pool_shape(cfg: BuildConfig) -> tuple[int, int, float]:
    """(actors, torch threads per actor, GPUs per actor) for the cluster Ray is connected to."""
    res = ray.cluster_resources()
    gpus = res.get("GPU", 0)
    gpa = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    return shape(int(res.get("CPU", 1)), node_cpus(), gpus, gpa, cfg.actors)


def shape(total_cpus: int, node_cpus: int, gpus: float, gpa: float, actors: int | None):
    """Pure sizing rule. GPU: one actor per GPU share, a few CPU threads each for tokenising.
    CPU: 4 torch threads per actor (more scale poorly), fewer when a node has fewer cores."""
    if gpa > 0:
        n = actors or max(1, int(gpus // gpa))
        return n, max(1, min(4, node_cpus // max(1, n))), gpa
    if actors:
        return actors, max(1, min(node_cpus, total_cpus // actors)), 0.0
    threads = min(node_cpus, 4)
    return max(1, total_cpus // threads), threads, 0.0


def start_pool(cfg: BuildConfig) -> list:
    actors, threads, gpa = pool_shape(cfg)
    device = "cuda" if gpa > 0 else "cpu"
    log(f"encode: {actors} actor(s) x {threads} thread(s)" + (f", {gpa} GPU each" if gpa else " on CPU"))
    return [EncoderActor.options(num_cpus=threads, num_gpus=gpa).remote(cfg, threads, device)
            for _ in range(actors)]


def run_parts(submit, shards: list[InputShard], workers: int, slots: int, what: str) -> list[PartResult]:
    """Keep `slots` parts in flight per worker; log each finished part with its docs/s."""
    queue, pending, done = list(shards), {}, []
    load = [0] * workers
    t0, ndocs = time.time(), 0
    while queue or pending:
        while queue and min(load) < slots:
            w = load.index(min(load))
            load[w] += 1
            pending[submit(queue.pop(0), w)] = w
        ready, _ = ray.wait(list(pending), num_returns=1)
        load[pending.pop(ready[0])] -= 1
        r = ray_get(ready[0])
        done.append(r)
        ndocs += r.rows
        rate = f"{r.rows / r.seconds:,.0f} docs/s" if not r.reused else "reused"
        log(f"{what}: part {r.part} done ({len(done)}/{len(shards)}): {r.rows} docs, {rate}; "
            f"stage {ndocs / max(time.time() - t0, 1e-9):,.0f} docs/s")
    return sorted(done, key=lambda r: r.part)


def encode_corpus(cfg: BuildConfig, corpus: Corpus, fp_of) -> tuple[list[PartResult], object, str]:
    """Run the encode stage. fp_of(encoder_info) -> the embeddings fingerprint."""
    if cfg.vector_column:
        info = EncoderInfo(name="precomputed", dim=corpus.dim, normalize=False, metric=cfg.metric or "l2")
        fp = fp_of(info)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        res = run_parts(lambda s, w: prepare_vectors.options(num_cpus=1).remote(s, cfg, fp, corpus.dim,
                                                                                corpus.id_kind),
                        corpus.shards, cpus, 1, "vectors")
        return res, info, fp
    pool = start_pool(cfg)
    try:
        info = ray_get(pool[0].info.remote())
        fp = fp_of(info)
        res = run_parts(lambda s, w: pool[w].run.remote(s, fp, corpus.id_kind),
                        corpus.shards, len(pool), MAX_IN_FLIGHT, "encode")
    finally:
        for a in pool:
            ray.kill(a)
    return res, info, fp

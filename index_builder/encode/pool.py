"""The encode stage on Ray: a pool of encoder actors (one per GPU, or CPU threads) fed one queue of parts.

Sizing (encode/sizing.py) is per node: one actor per GPU with that node's CPUs shared among its
GPUs (tokenizer processes, encode/feed.py), or on CPU actors x torch threads = the node's CPUs,
never more. Each actor is placed on the node it was sized for. Actors restart when they die and
their in-flight part is retried; parts commit atomically, so a retried part is
written once.

Why not Ray Data's map_batches with an actor pool: the unit that must be exactly-once
here is a part (one Parquet file, committed by a rename), and a plain queue of parts
over named actors makes that unit explicit: a part is either committed or redone
whole. map_batches re-chunks rows into blocks of its own, so a block would have to be
mapped back to parts to commit them, and Ray's issue tracker reports it running about
slower than direct iteration while holding several times the dataset in memory.
bench/README.md compares this pool with a plain single-process loop.
"""
from __future__ import annotations

import threading
import uuid

import ray

from index_builder.config import BuildConfig
from index_builder.encode.parts import Layout, PartResult, prepare
from index_builder.encode.reuse import Reuse
from index_builder.encode.sizing import Node, Slot, describe, slots
from index_builder.plan.corpus import Corpus, InputShard
from index_builder.progress import Progress
from shards.errors import ShardexError
from shards.raytools import TASK_RETRIES, log, ray_get
from shards.storage.manifest import EncoderInfo

ACTOR_PREFIX = "shardex-encoder-"
MAX_IN_FLIGHT = 2  # parts queued per actor: one running, one ready, so the actor never idles


# Two parts run at once in each actor, in threads: while one holds the device, the other
# reads its rows, checks them and tokenizes (before) or writes its Parquet (after). The lock
# keeps the device to one part at a time, and the driver's MAX_IN_FLIGHT bounds memory.
@ray.remote(max_restarts=-1, max_task_retries=3, max_concurrency=MAX_IN_FLIGHT)
class EncoderActor:
    def __init__(self, cfg: BuildConfig, slot: Slot):
        from shards.encoder import Encoder

        self.cfg = cfg
        self.enc = Encoder(cfg.model, device="cuda" if slot.gpus else "cpu", threads=slot.threads,
                           query_prefix=cfg.query_prefix, document_prefix=cfg.document_prefix,
                           batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens, metric=cfg.metric,
                           max_seq_length=cfg.max_seq_length, dtype=cfg.dtype)
        self.lock = threading.Lock()
        self.feed = None
        if slot.feeders and self.enc.fast:
            from index_builder.encode.feed import Feeder

            self.feed = Feeder(self.enc.fast, self.enc.batch_tokens, slot.feeders)
        elif slot.feeders:
            log(f"encode: {self.enc.name}'s tokenizer is not the Rust one shardex pads itself; it runs in "
                "the actor, not in tokenizer processes")

    def info(self):
        return self.enc.info()

    def run(self, shard: InputShard, layout: Layout, kind: str, reuse=None) -> PartResult:
        pads, given = [], []  # padding stats, and how many texts the encoder got

        def encode(texts):
            x, pad = self.enc.encode_part(texts, self.lock, self.feed)
            pads.append(pad)
            given.append(len(texts))
            return x

        r = prepare(shard, self.cfg, layout, None, kind, encode, reuse)
        r.encoded = sum(given)
        if pads:
            r.tokens, r.padded, r.padded_unsorted = pads[0].tokens, pads[0].padded, pads[0].padded_unsorted
        return r


@ray.remote(**TASK_RETRIES)
def prepare_vectors(shard: InputShard, cfg: BuildConfig, layout: Layout, dim: int, kind: str,
                    reuse=None) -> PartResult:
    return prepare(shard, cfg, layout, dim, kind, reuse=reuse)


def pool_slots(cfg: BuildConfig) -> list[Slot]:
    """The encoder actors for the cluster Ray is connected to, node by node."""
    nodes = [Node(n["NodeID"], int(n["Resources"].get("CPU", 0)), n["Resources"].get("GPU", 0.0))
             for n in ray.nodes() if n["Alive"]]
    gpus = sum(n.gpus for n in nodes)
    gpa = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    return slots(nodes, gpa, cfg.actors, cfg.tokenizer_workers)


def start_pool(cfg: BuildConfig) -> list:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    pool = pool_slots(cfg)
    log(f"encode: {describe(pool)}")
    tag = uuid.uuid4().hex[:8]  # named, so an operator (or a test) can find and kill one
    # soft: an actor whose node is lost restarts on another
    return [EncoderActor.options(name=f"{ACTOR_PREFIX}{tag}-{i}", num_cpus=s.cpus, num_gpus=s.gpus,
                                 scheduling_strategy=NodeAffinitySchedulingStrategy(s.node, soft=True)
                                 if s.node else "DEFAULT").remote(cfg, s) for i, s in enumerate(pool)]


def run_parts(submit, shards: list[InputShard], workers: int, slots: int, what: str) -> list[PartResult]:
    """Keep `slots` parts in flight per worker; log progress (parts done of total, docs/s, ETA) at a
    steady pace. A part whose worker died for good goes back on the queue for the others: parts commit
    atomically, so the redo writes it once."""
    queue, pending, done, dead = list(shards), {}, [], set()
    load = [0] * workers
    p, fresh = Progress(what, len(shards), "parts", items="docs"), [0, 0]
    while queue or pending:
        live = [w for w in range(workers) if w not in dead]
        if not live:
            raise ShardexError(f"{what}: every worker died; {len(queue)} part(s) not done (see the Ray logs)")
        while queue and min(load[w] for w in live) < slots:
            w = min(live, key=load.__getitem__)
            load[w] += 1
            s = queue.pop(0)
            pending[submit(s, w)] = (w, s)
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=p.pace)
        if not ready:
            p.tick()
            continue
        w, s = pending.pop(ready[0])
        load[w] -= 1
        try:
            r = ray_get(ready[0])
        except ray.exceptions.RayActorError:
            dead.add(w)
            queue.insert(0, s)
            log(f"{what}: worker {w} died during part {s.part}; the part goes to another worker")
            continue
        done.append(r)
        fresh[0] += r.new
        fresh[1] += r.changed
        p.add(1, r.rows)
    if any(fresh):  # a reindex: what the encoder ran on
        log(f"{what}: {fresh[0]:,} new and {fresh[1]:,} changed documents encoded, "
            f"{sum(r.reused for r in done)} part(s) reused")
    return sorted(done, key=lambda r: r.part)


def log_padding(res: list[PartResult]) -> None:
    tok, pad, unsorted = (sum(getattr(r, k) for r in res) for k in ("tokens", "padded", "padded_unsorted"))
    if tok:
        log(f"encode: {pad:,} tokens computed for {tok:,} real; batches in input order would have "
            f"computed {unsorted:,} ({1 - pad / unsorted:.0%} saved by length sorting)")


ENCODER_FILE = "_shardex_encoder.json"  # written by `shardex encode` beside its parts


def precomputed_encoder(cfg: BuildConfig, corpus: Corpus) -> EncoderInfo:
    """Vectors from `shardex encode` keep their encoder (so text queries work); others are 'precomputed',
    with --metric, or else the metric their norms suggest."""
    from shards.storage.store import Store

    store = Store(cfg.source, cfg.s3_endpoint)
    if cfg.vector_column == "vector" and store.exists(ENCODER_FILE):
        info = EncoderInfo.model_validate_json(store.read_text(ENCODER_FILE))
        if info.dim != corpus.dim:
            raise ShardexError(f"{cfg.source}/{ENCODER_FILE}: encoder dim {info.dim}, vectors have {corpus.dim}")
        return info.model_copy(update={"metric": cfg.metric or info.metric})
    return EncoderInfo(name="precomputed", dim=corpus.dim, normalize=False, metric=cfg.metric or _metric(cfg, corpus))


def _metric(cfg: BuildConfig, corpus: Corpus) -> str:
    """Without --metric: ip for unit vectors, else l2 (plan/metric.py), said in one line."""
    from index_builder.plan.metric import vector_metric

    metric, why = vector_metric(corpus.files, cfg.vector_column, corpus.dim, cfg.s3_endpoint)
    log(f"metric: {metric}: {why}")
    return metric


class Encoders:
    """The encode stage's workers, held for one run: `info` (the encoder's identity, which names the
    embeddings) is known once they are up, before `encode` writes any part. Text: the actor pool,
    killed on exit; a vector column: one task per part, and nothing to hold.

        with Encoders(cfg, corpus) as pool:
            parts = pool.encode(Layout.build(short_hash(corpus.columns, pool.info)))
    """

    def __init__(self, cfg: BuildConfig, corpus: Corpus):
        self.cfg, self.corpus, self.pool = cfg, corpus, []

    def __enter__(self) -> Encoders:
        if self.cfg.vector_column:
            self.info = precomputed_encoder(self.cfg, self.corpus)
            return self
        self.pool = start_pool(self.cfg)
        try:
            self.info = ray_get(self.pool[0].info.remote())
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for a in self.pool:
            ray.kill(a)

    def encode(self, layout: Layout, reuse: dict[int, Reuse] | None = None) -> list[PartResult]:
        """Every part of the corpus, written under layout; reuse (a reindex): per part, the live
        vectors it may reuse."""
        cfg, c, reuse = self.cfg, self.corpus, reuse or {}
        if not self.pool:
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            return run_parts(lambda s, w: prepare_vectors.options(num_cpus=1).remote(
                s, cfg, layout, c.dim, c.id_kind, reuse.get(s.part)), c.shards, cpus, 1, "vectors")
        res = run_parts(lambda s, w: self.pool[w].run.remote(s, layout, c.id_kind, reuse.get(s.part)),
                        c.shards, len(self.pool), MAX_IN_FLIGHT, "encode")
        log_padding(res)
        return res

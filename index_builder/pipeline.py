"""build: every stage of the pipeline, in order, on Ray. Each stage skips work a killed run finished."""
from __future__ import annotations

import hashlib
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np

from shards.config import parse_bytes
from shards.errors import ConfigError, CorpusError, IntegrityError
from shards.storage.manifest import (DocsInfo, DriftBaseline, EmbeddingsInfo, IndexInfo, Lineage, Manifest, SearchDefaults,
                             ShardingInfo, SourceInfo, new_version_name, vdir)
from shards.storage.store import Store, resolve_endpoint

from index_builder.build.add import add_task, split_task
from index_builder.config import BuildConfig
from index_builder.plan.corpus import plan_corpus
from index_builder.encode.parts import part_rel
from index_builder.encode.pool import encode_corpus
from index_builder.build.merge import expected_digest, merge_task, ram_budget_exceeded, shard_info, shard_rel
from index_builder.plan.factory import choose_factory, train_size
from index_builder.plan.factory import index_plan
from index_builder.build.publish import copy_files, file_info, publish, write_quarantine
from shards.raytools import ensure_ray, log, node_cpus, ray_get
from index_builder.shard_math import ivf_ranges, sum_digests
from index_builder.train.quantizer import sample_parallel, train_record, train_task
from index_builder.build.tune import EVAL_QUERIES, tune_task


@dataclass
class Summary:
    version: str
    index_root: str
    documents: int
    rejected: int
    quarantine: str | None
    factory: str
    shards: int
    index_bytes: int
    nprobe: int | None
    recall_at_10: float | None
    seconds: dict = field(default_factory=dict)
    rates: dict = field(default_factory=dict)     # vectors/s per stage
    reused: dict = field(default_factory=dict)    # units of work a previous run had finished
    work: str | None = None                       # this run's scratch under INDEX_ROOT (safe to delete now)

    def lines(self) -> list[str]:
        out = [f"version      {self.version}  (CURRENT of {self.index_root})",
               f"documents    {self.documents:,} indexed, {self.rejected:,} rejected"
               + (f" -> {self.quarantine}" if self.quarantine else ""),
               f"index        {self.factory}, {self.shards} shard(s), {self.index_bytes / 2**20:.1f} MiB",
               f"search       {f'nprobe={self.nprobe}' if self.nprobe else 'no nprobe (flat)'}: "
               f"recall@10 {self.recall_at_10} vs exact search"]
        for st, s in self.seconds.items():
            rate = f"{self.rates[st]:>10,.0f} vectors/s" if st in self.rates else " " * 20
            re = f"  ({self.reused[st]} reused)" if self.reused.get(st) else ""
            out.append(f"  {st:<8} {s:7.1f} s {rate}{re}")
        return out


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        log(f"{name}: start")
        t0 = time.time()
        yield
        self.seconds[name] = round(time.time() - t0, 2)
        log(f"{name}: {self.seconds[name]:.1f} s")


def short_hash(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def with_endpoint(cfg: BuildConfig) -> BuildConfig:
    """The driver's AWS_ENDPOINT_URL, carried in the config to Ray workers that may not have it."""
    if cfg.s3_endpoint is None and resolve_endpoint():
        return cfg.model_copy(update={"s3_endpoint": resolve_endpoint()})
    return cfg


def build(cfg: BuildConfig) -> Summary:
    cfg = with_endpoint(cfg)
    store, t = Store(cfg.index_root, cfg.s3_endpoint), Timer()
    with t.stage("plan"):
        corpus = plan_corpus(cfg)  # before Ray starts: a bad corpus fails in a second
    ensure_ray()
    log(f"plan: {len(corpus.files)} file(s), {corpus.total_rows:,} rows, {len(corpus.shards)} part(s)")
    shown = None
    if corpus.dim:  # precomputed vectors: N and d are known before any work, so is the plan
        shown = _show_plan(cfg, corpus.total_rows - corpus.rejected_ids, corpus.dim, cfg.metric,
                           merge_ram_budget(cfg))
    with t.stage("encode"):
        parts, enc, fp = encode_corpus(cfg, corpus, lambda info: short_hash(corpus.fingerprint, info))
    return index_and_publish(cfg, store, t, corpus, parts, enc, fp, shown=shown)


def index_and_publish(cfg: BuildConfig, store: Store, t: Timer, corpus, parts, enc, fp: str,
                      reuse_trained: str | None = None, annotate=None, shown=None) -> Summary:
    """The stages after encode, over the parts in embeddings/<fp>/. A reindex passes reuse_trained (a trained
    index to reuse instead of training; cfg.factory must be its factory) and annotate (manifest -> manifest).
    shown: the (N, factory) whose plan build() already printed."""
    ram_budget = merge_ram_budget(cfg)
    n = sum(p.rows for p in parts)
    if n == 0:
        raise CorpusError(f"{cfg.source}: no valid documents ({corpus.total_rows} rows, all rejected)")
    metric = cfg.metric or enc.metric
    enc = enc.model_copy(update={"metric": metric})
    choice, factory = _choose(cfg, n, enc.dim)
    if shown != (n, factory):  # text: known once encoded; vectors: some rows were rejected
        _show_plan(cfg, n, enc.dim, metric, ram_budget)
    reused = [reuse_trained] if reuse_trained else []  # a reused quantizer never shares scratch with a trained one
    work = f"work/{short_hash(fp, factory, metric, cfg.shards, cfg.sharding, cfg.seed, *reused)}"
    emb = [part_rel(fp, p.part) for p in parts if p.rows]
    live = [p for p in parts if p.rows]

    if reuse_trained:  # by the driver: a reindex killed here leaves nothing half-done (tests crash it here)
        store.copy(reuse_trained, f"{work}/trained.index")
    with t.stage("train"):
        res, t0 = train_resources(), time.time()
        size = 0 if reuse_trained else train_size(n, enc.dim, factory, _nlist_of(factory))
        drawn = ([] if store.exists(train_record(f"{work}/trained.index")) else  # a killed run's, done
                 sample_parallel(store, [(r, p.rows) for r, p in zip(emb, live)], size, cfg.seed, EVAL_QUERIES))
        tr = ray_get(train_task.options(**res).remote(
            store, drawn, factory, enc.dim, metric, cfg.seed, f"{work}/trained.index", res["num_cpus"],
            f"{work}/trained.index" if reuse_trained else None, t0))
    trained = f"{work}/trained.index"
    with t.stage("add"):
        added = ray_get([add_task.options(num_cpus=1).remote(store, trained, r, p.part, cfg.shards, work,
                                                             cfg.sharding, metric) for r, p in zip(emb, live)])
        ranges, subs = None, added
        if cfg.sharding == "ivf":
            ranges = ivf_ranges(np.sum([a["list_sizes"] for a in added], axis=0), cfg.shards)
            log(f"add: IVF list ranges per shard {ranges}")
            subs = ray_get([split_task.options(num_cpus=1).remote(store, trained, work, p.part, ranges)
                            for p in live])
    with t.stage("merge"):
        merged = merge_shards(cfg, store, work, live, added, subs, tr["nlist"], ram_budget)
    with t.stage("tune"):
        best = ray_get(tune_task.options(num_cpus=node_cpus()).remote(
            store, work, cfg.shards, [p.part for p in live], metric, cfg.target_recall, node_cpus()))
    with t.stage("baseline"):
        from index_builder.reindex.drift import baseline_task

        base = ray_get(baseline_task.options(num_cpus=node_cpus()).remote(
            store, f"{work}/trained.index", work, cfg.shards, [(r, p.rows) for r, p in zip(emb, live)], cfg.seed,
            f"{work}/lists.npy", node_cpus()))
    with t.stage("publish"):
        version = new_version_name(work.split("/")[-1])
        infos = [shard_info(store, work, s) for s in range(cfg.shards)]
        copy_files(store, version, [(trained, "trained.index")]
                   + [(shard_rel(work, s), f"shard-{s}.index") for s in range(cfg.shards)]
                   + [(f"{work}/shards/{i.ivfdata}", i.ivfdata) for i in infos if i.ivfdata]
                   + [(part_rel(fp, p.part, "docs"), f"docs/part-{p.part:05d}.parquet") for p in live])
        quarantine = write_quarantine(store, version, [part_rel(fp, p.part, "rejected") for p in parts])
        m = Manifest(
            version=version,
            source=SourceInfo(uri=cfg.source, fingerprint=corpus.fingerprint, documents=n,
                              rejected=sum(p.rejected for p in parts), quarantine=quarantine),
            encoder=enc,
            index=IndexInfo(factory=factory, metric=metric, auto_reason=choice.reason if choice else None,
                            nlist=tr["nlist"], train_vectors=tr["train_vectors"] or 0,
                            train_seconds=round(tr["seconds"], 2), train_device=tr.get("device", "cpu")),
            sharding=ShardingInfo(mode=cfg.sharding, shards=cfg.shards, ranges=ranges),
            trained=file_info(store, version, "trained.index"),
            shards=infos,
            docs=DocsInfo(files=[f"docs/part-{p.part:05d}.parquet" for p in live],
                          fields=cfg.stored_fields, id_kind=corpus.id_kind),
            search=SearchDefaults(nprobe=best["nprobe"], recall_at_10=best["recall_at_10"],
                                  eval_queries=best["eval_queries"], target_recall=cfg.target_recall),
            timings=dict(t.seconds),
            vectors=emb)
        if base["lists"]:
            store.copy(base["lists"], f"{vdir(version)}/lists.npy")
        m.embeddings = EmbeddingsInfo(parts=emb)
        m.drift = DriftBaseline(**{**base, "lists": "lists.npy" if base["lists"] else None}, trained_in=version)
        m.lineage = Lineage()
        m.options = cfg.model_dump(exclude={"source", "index_root", "s3_endpoint"})
        m = annotate(m) if annotate else m
        publish(store, m)
    s = _summary(cfg, m, parts, added, merged, tr, t)
    s.work = work
    return s


def _nlist_of(factory: str) -> int | None:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else None


def _choose(cfg: BuildConfig, n: int, d: int):
    """(the auto Choice or None, the factory string); ivf sharding needs an IVF factory."""
    choice = choose_factory(n, d, cfg.budget_bytes, need_ivf=cfg.sharding == "ivf") if cfg.factory == "auto" else None
    factory = choice.factory if choice else cfg.factory
    if cfg.sharding == "ivf" and not _nlist_of(factory):
        raise ConfigError(f"sharding: ivf needs an IVF index, and {factory!r} has no IVF lists; "
                          f"give --sharding hash or an IVF factory")
    return choice, factory


def _show_plan(cfg: BuildConfig, n: int, d: int, metric: str | None, ram_budget: int) -> tuple[int, str]:
    """Log what the build will make (memory per shard, disk, training sample) before it makes it."""
    choice, factory = _choose(cfg, n, d)
    log(f"index: {factory} over {n:,} x {d}" + (f" ({metric})" if metric else "")
        + (f": {choice.reason}" if choice else ""))
    for line in index_plan(n, d, factory, cfg.shards, ram_budget).lines():
        log(line)
    return n, factory


def train_resources() -> dict:
    """The train task takes a whole node: a GPU node's CPUs and one GPU when the cluster has GPUs
    (k-means runs there), else the CPUs of the largest node."""
    import ray

    gpu_nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) >= 1]
    if gpu_nodes:
        return {"num_cpus": int(max(n["Resources"].get("CPU", 1) for n in gpu_nodes)), "num_gpus": 1}
    return {"num_cpus": node_cpus()}


def merge_ram_budget(cfg: BuildConfig) -> int:
    """--merge-ram-budget in bytes; auto: half the memory Ray gives tasks on its smallest node."""
    if cfg.merge_ram_budget != "auto":
        return parse_bytes(cfg.merge_ram_budget)
    import ray

    mem = [n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]]
    return int(min(m for m in mem if m) // 2) if any(mem) else 2 << 30


def merge_shards(cfg: BuildConfig, store: Store, work: str, live, added: list[dict], subs: list[dict],
                 nlist: int | None, budget: int) -> list[dict]:
    """One merge task per serving shard, in RAM or on disk by its size. subs: what each part put
    in each shard (the add's, or the ivf split's). First checks that the shards together hold
    every added id exactly once."""
    S = cfg.shards
    want = [expected_digest(subs, s) for s in range(S)]
    if sum_digests(want) != sum_digests(a["digest"] for a in added):
        raise IntegrityError(f"{store.uri(work)}: the shards' sub-indexes do not add up to the parts' ids; "
                             f"delete it and rebuild")
    refs = []
    for s in range(S):
        in_bytes = sum(a["bytes"][s] for a in subs)
        ondisk = bool(nlist) and ram_budget_exceeded(in_bytes, budget)
        if ondisk:
            log(f"merge: shard {s} ({in_bytes / 2**20:,.1f} MiB) exceeds --merge-ram-budget "
                f"{budget / 2**20:,.0f} MiB: on-disk inverted lists")
        refs.append(merge_task.options(num_cpus=1).remote(store, f"{work}/trained.index", work,
                                                          [p.part for p in live], s, want[s], ondisk))
    return ray_get(refs)


def _summary(cfg, m: Manifest, parts, added, merged, tr, t: Timer) -> Summary:
    n = m.source.documents
    secs = t.seconds
    rates = {st: n / secs[st] for st in ("encode", "add", "merge") if secs.get(st)}
    if tr["train_vectors"] and secs.get("train"):
        rates["train"] = tr["train_vectors"] / secs["train"]
    reused = {"encode": sum(p.reused for p in parts), "add": sum(a["reused"] for a in added),
              "merge": sum(x["reused"] for x in merged), "train": int(tr["reused"])}
    return Summary(version=m.version, index_root=cfg.index_root, documents=n, rejected=m.source.rejected,
                   quarantine=(f"{cfg.index_root}/versions/{m.version}/{m.source.quarantine}"
                               if m.source.quarantine else None),
                   factory=m.index.factory, shards=len(m.shards), index_bytes=sum(s.bytes for s in m.shards),
                   nprobe=m.search.nprobe, recall_at_10=m.search.recall_at_10, seconds=secs,
                   rates={k: round(v, 1) for k, v in rates.items()}, reused=reused)


def as_dict(s: Summary) -> dict:
    return asdict(s)


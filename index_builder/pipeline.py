"""build: every stage of the pipeline, in order, on Ray. Each stage skips work a killed run finished.

plan, encode, then the stages over the embeddings parts (index_and_publish): train, add, merge,
tune, baseline, publish. Each is one function taking and returning plain values; the run's
scratch is a WorkDir (workdir.py). A reindex (reindex/incremental.py) runs the same stages after
its own encode, with a Run that may keep the live quantizer.
"""
from __future__ import annotations

import hashlib
import io
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np

from index_builder import progress
from index_builder.build import merge_ranges
from index_builder.build.add import add_task, sum_sizes
from index_builder.build.fields import shuffle
from index_builder.build.fields import spec_of as fields_spec
from index_builder.build.merge import merge_task, ram_budget_exceeded
from index_builder.build.publish import claim_version, publish_run
from index_builder.build.tune import recall_warning
from index_builder.build.tune import tune as tune_shards
from index_builder.config import BuildConfig
from index_builder.encode.parts import Layout, PartResult, part_rel
from index_builder.encode.pool import Encoders
from index_builder.eval.measures import EVAL_QUERIES, K
from index_builder.eval.queries import digest, tune_file
from index_builder.plan.capacity import train_seconds
from index_builder.plan.corpus import Corpus, plan_corpus
from index_builder.plan.factory import (
    Choice,
    check_trainable,
    choose_factory,
    index_plan,
    plan_warnings,
    train_size,
)
from index_builder.reindex.drift import baseline_task
from index_builder.shard_math import add_rows, add_units, ivf_ranges, sum_digests
from index_builder.summary import Summary
from index_builder.train.groups import kept_ranges
from index_builder.train.quantizer import check_factory, sample_parallel, train_args, train_task, zero_norm_warning
from index_builder.workdir import WorkDir
from shards.config import parse_bytes
from shards.errors import ConfigError, CorpusError, IntegrityError
from shards.raytools import cluster_cpus, ensure_ray, log, node_cpus, ray_get
from shards.storage.lease import hold
from shards.storage.manifest import DriftBaseline, EncoderInfo, Lineage, ListsInfo, Manifest, ShardingInfo
from shards.storage.store import Store, resolve_endpoint


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        log(f"{name}: start")
        progress.stage_started(name)
        t0 = time.time()
        yield
        self.seconds[name] = round(time.time() - t0, 2)
        progress.stage_ended(name, self.seconds[name])
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
    with hold(store, "shardex build"), progress.tracking(store, "shardex build") as p:  # before Ray too:
        p.doc["stages"].update(t.seconds)                                # a second writer is refused at once
        return _build(cfg, store, t, corpus)


def _build(cfg: BuildConfig, store: Store, t: Timer, corpus: Corpus) -> Summary:
    ensure_ray()
    log(f"plan: {len(corpus.files)} file(s), {corpus.total_rows:,} rows, {len(corpus.shards)} part(s)")
    n0, shown = corpus.total_rows - corpus.rejected_ids, []

    def plan(d: int, metric: str | None) -> None:  # also refuses, before any work, what train or merge would
        shown.append(show_plan(cfg, n0, d, metric))

    if corpus.dim:  # precomputed vectors: N and d are known before any work, so is the plan
        plan(corpus.dim, cfg.metric)
    with t.stage("encode"):  # text: d is known once the encoders are up, before they encode anything
        parts, enc, fp = encode(cfg, corpus, None if corpus.dim else lambda info: plan(info.dim, cfg.metric))
    run = Run.of(cfg, corpus, parts, enc, fp)
    if shown[-1] != (run.n, run.factory):  # some rows were rejected
        show_plan(cfg, run.n, run.enc.dim, run.metric)
    return index_and_publish(cfg, store, t, run)


def encode(cfg: BuildConfig, corpus: Corpus, before=None) -> tuple[list[PartResult], EncoderInfo, str]:
    """(part results, encoder info, fingerprint): the parts go to embeddings/<fp>/, fp naming the
    corpus and the encoder. before(info), if given, runs once the encoder is known, before any part."""
    with Encoders(cfg, corpus) as pool:
        if before:
            before(pool.info)
        fp = short_hash(corpus.columns, pool.info)  # parts are keyed by their source: a reindex shares them
        return pool.encode(Layout.build(fp)), pool.info, fp


@dataclass(frozen=True)
class Kept:
    """A reindex's live quantizer, kept: the run starts from its trained index, and the version keeps
    the reason it was chosen and the drift baseline measured when it was trained."""

    trained: str                 # versions/<live>/trained.index
    auto_reason: str | None
    drift: DriftBaseline | None
    parent: str = ""             # the live version the reindex starts from
    sharding: ShardingInfo | None = None  # the live version's: its list ranges, when grouped, stay
    lists: ListsInfo | None = None        # the live version's: how its lists were capped at training
    refine: str | None = None             # the live version's refine store precision: --refine auto keeps it


@dataclass(frozen=True)
class Run:
    """What the stages after encode work on, fixed once the corpus is encoded."""

    corpus: Corpus
    parts: list[PartResult]      # every part, empty ones too (their rejects are quarantined)
    enc: EncoderInfo             # with the run's metric
    fp: str                      # the parts are embeddings/<fp>/
    factory: str
    choice: Choice | None        # --factory auto's
    wd: WorkDir
    kept: Kept | None = None

    @classmethod
    def of(cls, cfg: BuildConfig, corpus: Corpus, parts: list[PartResult], enc: EncoderInfo, fp: str,
           kept: Kept | None = None) -> Run:
        """cfg.factory must be the kept quantizer's factory when kept is given."""
        n = sum(p.rows for p in parts)
        if n == 0:
            raise CorpusError(f"{cfg.source}: no valid documents ({corpus.total_rows} rows, all rejected)")
        enc = enc.model_copy(update={"metric": cfg.metric or enc.metric})
        choice, factory = _choose(cfg, n, enc.dim)
        # a reused quantizer never shares scratch with a trained one, nor a reindex with another's parent
        reused = [kept.trained, kept.parent] if kept else []
        order = [cfg.ivf_order] if cfg.sharding == "ivf" else []  # grouped lists are another trained index
        tq = [digest(cfg.tune_queries, cfg.s3_endpoint)] if cfg.tune_queries else []  # their truth is the add's
        h = short_hash(fp, corpus.fingerprint, factory, enc.metric, cfg.shards, cfg.sharding, cfg.seed, *order,
                       *reused, f"cap{cfg.list_cap:g}", *tq)
        return cls(corpus, parts, enc, fp, factory, choice, WorkDir.of(h), kept)

    @property
    def n(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def auto_refine(self) -> str | None:
        """What --refine auto means for this run: --factory auto's choice, or a kept quantizer's version's."""
        return self.choice.refine if self.choice else self.kept.refine if self.kept else None

    @property
    def metric(self) -> str:
        return self.enc.metric

    @property
    def live(self) -> list[PartResult]:
        return [p for p in self.parts if p.rows]

    @property
    def emb(self) -> list[str]:
        return [part_rel(self.fp, p.name) for p in self.live]

    @property
    def sizes(self) -> list[tuple[str, int]]:
        """(embeddings part, rows) of every part with rows."""
        return [(part_rel(self.fp, p.name), p.rows) for p in self.live]


def index_and_publish(cfg: BuildConfig, store: Store, t: Timer, run: Run, lineage: Lineage | None = None,
                      options: dict | None = None) -> Summary:
    """The stages after encode, over run's embeddings parts. A reindex passes its lineage and the
    options it was asked for (its cfg may carry the kept quantizer's factory and metric instead)."""
    run = replace(run, wd=claim_version(store, run.wd))  # the version is named once: a rerun resumes it
    if run.kept:  # by the driver: a reindex killed here leaves nothing half-done (tests crash it here)
        store.copy(run.kept.trained, run.wd.trained)
    with t.stage("train"):
        tr = train(cfg, store, run)
        if cfg.tune_queries:
            put_tune_queries(cfg, store, run)
    said = [w for w in [zero_norm_warning(tr, run.metric)] if w]
    with t.stage("add"):
        added, sizes, ranges, order = add(cfg, store, run, tr)
    with t.stage("merge"):
        merged = merge_shards(cfg, store, run, added, sizes, ranges, tr["nlist"])
    with t.stage("fields"):
        stored = write_fields(cfg, store, run, added, ranges)
    refine, dtype = None, cfg.refine_dtype(run.auto_refine)
    if dtype:
        with t.stage("refine"):
            refine = write_fields(cfg, store, run, added, ranges, dtype)
    with t.stage("tune"):
        best = tune(cfg, store, run, [a["unit"] for a in added], merged, ranges, refine)
    said += [w for w in [recall_warning(best, cfg.target_recall)] if w]
    for w in said:
        log(f"warning: {w}")
    with t.stage("baseline"):
        base = baseline(cfg, store, run)
    with t.stage("publish"):
        m = publish_run(cfg, store, run, trained=tr, ranges=ranges, order=order, tuned=best, base=base,
                        stored=stored, refine=refine, timings=dict(t.seconds),
                        lineage=lineage or Lineage(),
                        options=options_of(cfg) if options is None else options)
    s = _summary(cfg, m, run.parts, added, merged, tr, t)
    s.work = run.wd.root
    s.warnings = plan_warnings(run.n, run.enc.dim, run.factory, cfg.shards) + said  # show_plan logged the plan's
    return s


def options_of(cfg: BuildConfig) -> dict:
    """The build options a version records (a reindex's defaults): all but the paths."""
    return cfg.model_dump(exclude={"source", "index_root", "s3_endpoint"})


def train(cfg: BuildConfig, store: Store, run: Run) -> dict:
    """The trained index and tune's queries in run.wd (a kept quantizer is taken as it is)."""
    res, t0 = train_resources(), time.time()
    size = 0 if run.kept else train_size(run.n, run.enc.dim, run.factory, _nlist_of(run.factory))
    drawn = ([] if store.exists(run.wd.train_record) else  # a killed run's, done
             sample_parallel(store, run.sizes, size, cfg.seed, EVAL_QUERIES))
    expect = train_seconds(run.n, run.enc.dim, run.factory, res["num_cpus"], res.get("num_gpus", 0)) if size else None
    return progress.gather([train_task.options(**res).remote(
        store, run.wd, *train_args(drawn), factory=run.factory, d=run.enc.dim, metric=run.metric, seed=cfg.seed,
        threads=res["num_cpus"], keep=bool(run.kept), t0=t0, groups=_groups(cfg),
        list_cap=cfg.list_cap)], "train", "task", expect=expect)[0]


def put_tune_queries(cfg: BuildConfig, store: Store, run: Run) -> None:
    """--tune-queries, encoded by a task with the run's encoder, in place of the held-out queries the
    train task drew: the add finds their exact answers, the tune measures on them ("real" marks them)."""
    import ray

    xq = ray_get(ray.remote(tune_file).options(num_cpus=1).remote(cfg.tune_queries, run.enc, cfg.s3_endpoint,
                                                                   cfg.seed))
    buf = io.BytesIO()
    np.savez(buf, xq=xq, ids=np.full(len(xq), -1, np.int64), real=np.ones(1, bool))
    store.write_bytes(run.wd.queries, buf.getvalue())
    log(f"tune: {len(xq):,} queries from {cfg.tune_queries}")


def _groups(cfg: BuildConfig) -> int:
    """train_task's groups: the shard count when the lists are grouped into regions (ivf, grouped)."""
    return cfg.shards if cfg.sharding == "ivf" and cfg.ivf_order == "grouped" and cfg.shards > 1 else 0


def add(cfg: BuildConfig, store: Store, run: Run, tr: dict) -> tuple[list[dict], np.ndarray | None, list | None,
                                                                      str | None]:
    """(each add unit's record, and with --sharding ivf the IVF list sizes, list ranges and their order
    (ShardingInfo.order), else None). tr: the train record; grouped lists keep the groups' ranges (a kept
    quantizer its version's)."""
    rows = add_rows(run.enc.dim, run.n, cluster_cpus(), cfg.add_rows)
    units = add_units(run.sizes, rows)
    names = [f"unit-{i:05d}-{short_hash(u)[:8]}" for i, u in enumerate(units)]
    log(f"add: {len(units):,} unit(s) of up to {rows:,} vectors")
    added = progress.gather([add_task.options(num_cpus=1).remote(store, run.wd, name, u, shards=cfg.shards,
                                                                 sharding=cfg.sharding, metric=run.metric, k=K)
                             for name, u in zip(names, units)], "add", "units")
    if cfg.sharding != "ivf":
        return added, None, None, None
    sizes = sum_sizes(store, run.wd, names)
    grouped = kept_ranges(run.kept.sharding if run.kept else None, cfg.shards, tr)
    ranges = grouped or ivf_ranges(sizes, cfg.shards)
    log(f"add: IVF list ranges per shard {ranges}" + (" (grouped lists)" if grouped else ""))
    return added, sizes, ranges, "grouped" if grouped else "kmeans"


def write_fields(cfg: BuildConfig, store: Store, run: Run, added: list[dict], ranges,
                 refine: str | None = None) -> list[list]:
    """Each shard's stored fields files, generation 0 (build/fields.py); refine (a dtype): its refine files."""
    spec = fields_spec(cfg.sharding, cfg.shards, ranges, added[0]["fingerprint"])
    return shuffle(store, run.wd.root, run.fp, run.live, spec, run.wd.version, 0, cfg.stored_fields,
                   run.corpus.id_kind, refine)


def tune(cfg: BuildConfig, store: Store, run: Run, units: list[str], merged: list[dict], ranges,
         refine: list[list] | None = None) -> dict:
    """The search defaults; with --sharding ivf and --route ranked, the ranked routing's gap too; with
    refine (each shard's refine files) the refine factor too."""
    return tune_shards(store, run.wd, units, shards=cfg.shards, metric=run.metric, target=cfg.target_recall,
                       k=K, cpus=cluster_cpus(), node=node_cpus(), shard_bytes=sum(m["bytes"] for m in merged),
                       ranges=ranges if cfg.sharding == "ivf" and cfg.route == "ranked" else None, refine=refine)


def baseline(cfg: BuildConfig, store: Store, run: Run) -> dict:
    return progress.gather([baseline_task.options(num_cpus=node_cpus()).remote(
        store, run.wd, run.sizes, shards=cfg.shards, seed=cfg.seed, threads=node_cpus())], "baseline", "task")[0]


def _nlist_of(factory: str) -> int | None:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else None


def _choose(cfg: BuildConfig, n: int, d: int):
    """(the auto Choice or None, the factory string); ivf sharding needs an IVF factory."""
    choice = auto_choice(cfg, n, d) if cfg.factory == "auto" else None
    factory = choice.factory if choice else cfg.factory
    if cfg.sharding == "ivf" and not _nlist_of(factory):
        raise ConfigError(f"sharding: ivf needs an IVF index, and {factory!r} has no IVF lists; "
                          f"give --sharding hash or an IVF factory")
    return choice, factory


def auto_choice(cfg: BuildConfig, n: int, d: int):
    """--factory auto's Choice for n vectors of d dims; with --refine auto it may add a refine store."""
    return choose_factory(n, d, cfg.budget_bytes, need_ivf=cfg.sharding == "ivf", shards=cfg.shards,
                          target=cfg.target_recall if cfg.refine == "auto" else None)


def show_plan(cfg: BuildConfig, n: int, d: int, metric: str | None, trains: bool = True) -> tuple[int, str]:
    """Log what the build will make (memory per shard, disk, training sample) before it makes it,
    refusing first what training (unless a kept quantizer is reused) or the merge would refuse;
    returns the (N, factory) it showed."""
    choice, factory = _choose(cfg, n, d)
    check_factory(factory, d, metric or "l2", cfg.sharding)  # one faiss can build, and add/merge/split handle
    if trains:
        check_trainable(factory, n, d, cfg.shards, cfg.sharding)
    log(f"index: {factory} over {n:,} x {d}" + (f" ({metric})" if metric else "")
        + (f": {choice.reason}" if choice else ""))
    refine = cfg.refine_dtype(choice.refine if choice else None)
    for line in index_plan(n, d, factory, cfg.shards, merge_ram_budget(cfg), refine).lines():
        log(line)
    for w in plan_warnings(n, d, factory, cfg.shards):
        log(f"warning: {w}")
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


def merge_shards(cfg: BuildConfig, store: Store, run: Run, added: list[dict], sizes: np.ndarray | None,
                 ranges: list[list[int]] | None, nlist: int | None) -> list[dict]:
    """One merge task per serving shard, in RAM or on disk by the size of its payload; then checks
    that the shards together hold every added id exactly once."""
    budget, units, c = merge_ram_budget(cfg), [a["unit"] for a in added], added[0]["code_size"]
    refs = []
    for s in range(cfg.shards):
        if ranges:  # ivf: a range of the lists of every unit's one section
            section, lists, want, n = 0, tuple(ranges[s]), None, int(sizes[slice(*ranges[s])].sum())
        else:       # hash: section s of every unit, all its lists
            section, lists = s, (0, nlist or 1)
            want = list(sum_digests(a["digests"][s] for a in added))
            n = want[0]
        ondisk = bool(nlist) and ram_budget_exceeded(n * (c + 8), budget)
        if ondisk:
            log(f"merge: shard {s} ({n * (c + 8) / 2**20:,.1f} MiB) exceeds --merge-ram-budget "
                f"{budget / 2**20:,.0f} MiB: on-disk inverted lists")
        if ondisk and n * (c + 8) > parse_bytes(cfg.merge_task_bytes):
            refs.append(merge_ranges.submit(store, run.wd, units, s, section, lists, want,
                                            sizes[slice(*lists)] if ranges else None, nlist, c + 8,
                                            parse_bytes(cfg.merge_task_bytes)))
            continue
        refs.append(merge_task.options(num_cpus=1).remote(store, run.wd, units, s, section, lists, want, ondisk))
    merged = progress.gather(refs, "merge", "shards")
    if sum_digests(m["digest"] for m in merged) != sum_digests(a["digest"] for a in added):
        raise IntegrityError(f"{store.uri(run.wd.root)}: the merged shards do not hold every added id exactly once; "
                             f"delete it and rebuild")
    return merged


def _summary(cfg, m: Manifest, parts, added, merged, tr, t: Timer) -> Summary:
    n = m.source.documents
    secs = t.seconds
    rates = {st: n / secs[st] for st in ("encode", "add", "merge") if secs.get(st)}
    if tr["train_vectors"] and secs.get("train"):
        rates["train"] = tr["train_vectors"] / secs["train"]
    reused = {"encode": sum(p.reused for p in parts), "add": sum(a["reused"] for a in added),
              "merge": sum(x["reused"] for x in merged), "train": int(tr["reused"])}
    return Summary(version=m.version, index_root=cfg.index_root, documents=n, rejected=m.source.rejected,
                   quarantine=f"{cfg.index_root}/{m.path(m.source.quarantine)}" if m.source.quarantine else None,
                   factory=m.index.factory, shards=len(m.shards), index_bytes=sum(s.bytes for s in m.shards),
                   nprobe=m.search.nprobe, recall_at_10=m.search.recall_at_10, seconds=secs,
                   rates={k: round(v, 1) for k, v in rates.items()}, reused=reused, refine=m.index.refine,
                   refine_bytes=sum(s.refine_bytes for s in m.shards), refine_factor=m.search.refine_factor)



"""publish: the version's files put in place by parallel tasks, its manifest written and checked, CURRENT moved last.

A run has one version, named once (claim_version: work/<run>/version.json) before anything is
written under versions/<v>/. The merge writes the shards there; publish copies the trained index
and the list sizes beside them (Ray tasks; server-side copies on S3) and writes the quarantine;
encode's docs parts stay where they are and are referred to (Manifest.path), never copied. So a
killed build or publish re-runs under the same version and skips what is in place. A run whose
version is already published (rerun as it was) publishes a new version whose manifest refers to
that one's files.

Every sha256 comes from where its file was written (the merge's records, encode's docs records,
the copy and quarantine tasks here); the check before CURRENT moves lists each directory once.
A run killed before CURRENT moves leaves the previous version served; a versions/<v>/ without a
manifest is never listed. The manifest is assembled here (make_manifest) from what the stages returned.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import replace

import pyarrow as pa
import ray

from index_builder.build.merge import shard_info
from index_builder.config import BuildConfig
from index_builder.encode.parts import PartResult, docs_record, part_rel
from index_builder.plan.corpus import Corpus
from index_builder.progress import gather
from index_builder.workdir import WorkDir
from shards.raytools import TASK_RETRIES, ray_get
from shards.storage.lease import assert_held
from shards.storage.manifest import (
    ROOTED,
    DocsInfo,
    DriftBaseline,
    EmbeddingsInfo,
    EncoderInfo,
    FieldsInfo,
    FileInfo,
    IndexInfo,
    Lineage,
    ListsInfo,
    Manifest,
    SearchDefaults,
    ShardInfo,
    ShardingInfo,
    SourceInfo,
    check_listed,
    load_manifest,
    new_version_name,
    ref,
    set_current,
    vdir,
    write_manifest,
)
from shards.storage.store import Store

TRAINED = "trained.index"   # names in versions/<v>/
LISTS = "lists.npy"
QUARANTINE = "quarantine.parquet"
KEPT_BASELINE = ("error_kind", "error", "sample", "imbalance", "trained_in")


def claim_version(store: Store, wd: WorkDir) -> WorkDir:
    """wd with the run's version: the one an earlier attempt recorded, else a new name, recorded
    before anything is written under it. Shards an older shardex merged into work/<run>/shards/ are
    copied into the version, so its merge records stay good."""
    try:
        v = json.loads(store.read_text(wd.version_record))["version"]
    except FileNotFoundError:
        v = new_version_name(wd.run)
        store.write_text(wd.version_record, json.dumps({"version": v}))
    wd = replace(wd, version=v)
    have = store.sizes(wd.shards)
    old = [n for n in store.sizes(wd.legacy_shards) if not n.endswith(".json") and n not in have]
    copy_all(store, [(f"{wd.legacy_shards}/{n}", f"{wd.shards}/{n}") for n in old])
    return wd


@ray.remote(**TASK_RETRIES)
def copy_task(store: Store, src: str, dst: str) -> dict:
    """src copied to dst (server-side on S3) unless an earlier attempt did; dst's FileInfo fields."""
    size = store.size(src)
    if store.sizes(posixpath.dirname(dst)).get(posixpath.basename(dst)) != size:
        store.copy(src, dst)
    return {"file": dst, "sha256": store.sha256(dst), "bytes": size}


@ray.remote(**TASK_RETRIES)
def quarantine_task(store: Store, rels: list[str], dst: str) -> dict | None:
    """All rejected rows, with their reasons, in one Parquet file; its FileInfo fields, or None when none."""
    tables = [store.read_table(r) for r in rels if store.exists(r)]
    if not tables:
        return None
    w = store.write_table(dst, pa.concat_tables(tables))
    return {"file": dst, "sha256": w.sha256, "bytes": w.bytes}


def copy_all(store: Store, pairs: list[tuple[str, str]]) -> list[FileInfo]:
    """(src, dst) pairs copied by parallel tasks; FileInfos named by their path under the root."""
    if not pairs:
        return []
    return [FileInfo(**d) for d in gather([copy_task.options(num_cpus=0.25).remote(store, *p) for p in pairs],
                                          "publish", "files")]


def put_files(store: Store, run, base: dict) -> dict[str, FileInfo | None]:
    """The run's own files put in versions/<v>/ (v: run.wd.version): the trained index, the list sizes
    and the quarantine, at once. FileInfos by role, named by their path under the root."""
    d = vdir(run.wd.version)
    pairs = [(run.wd.trained, f"{d}/{TRAINED}")] + ([(base["lists"], f"{d}/{LISTS}")] if base["lists"] else [])
    rejected = [part_rel(run.fp, p.name, "rejected") for p in run.parts if p.rejected]
    q = quarantine_task.options(num_cpus=1).remote(store, rejected, f"{d}/{QUARANTINE}") if rejected else None
    copied = copy_all(store, pairs)
    qi = ray_get(q) if q else None
    return {"trained": copied[0], "lists": copied[1] if base["lists"] else None,
            "quarantine": FileInfo(**qi) if qi else None}


def published_files(prev: Manifest) -> dict[str, FileInfo | None]:
    """The same roles, taken from an already published version of this run (its files are reused)."""
    def at(f: FileInfo | None) -> FileInfo | None:
        return f.model_copy(update={"file": prev.path(f.file)}) if f else None

    extra = {posixpath.basename(prev.path(f.file)): f for f in prev.extra}
    return {"trained": at(prev.trained), "lists": at(extra.get(LISTS)), "quarantine": at(extra.get(QUARANTINE))}


def named(f: FileInfo | None, version: str) -> FileInfo | None:
    """f (named by its path under the root) as version's manifest names it."""
    return f.model_copy(update={"file": ref(version, f.file)}) if f else None


def located_shard(store: Store, wd: WorkDir, s: int, version: str, stored: list[FieldsInfo] | None = None,
                  refine: list[FieldsInfo] | None = None) -> ShardInfo:
    """Shard s's ShardInfo (one base segment) from its merge record, its files named as version's
    manifest names them; stored, refine: its fields and refine files (build/fields.py), named by their path."""
    i = shard_info(store, wd, s)
    up = {"file": ref(version, wd.shard(s))}
    if i.ivfdata:
        up["ivfdata"] = ref(version, wd.shard_data(s))
    return ShardInfo(**i.model_copy(update=up).model_dump(),
                     fields=[named(f, version) for f in stored or []],
                     refine=[named(f, version) for f in refine or []])


def docs_files(store: Store, run) -> tuple[list[str], list[dict]]:
    """(rooted names, records) of the live parts' docs, as encode wrote and recorded them."""
    rels = [part_rel(run.fp, p.name, "docs") for p in run.live]
    recs = [p.docs or docs_record(store, r) for p, r in zip(run.live, rels)]  # a record is made once if none
    return [ROOTED + r for r in rels], recs


def publish(store: Store, m: Manifest) -> Manifest:
    """Check that every file is in place at its size, write the manifest, then point CURRENT at it."""
    check_listed(store, m)
    assert_held(store)  # a writer whose lease was taken over must not publish
    write_manifest(store, m)
    set_current(store, m.version)
    return m


def drift_baseline(base: dict, version: str, kept: DriftBaseline | None = None,
                   lists: str | None = None) -> DriftBaseline:
    """The baseline the build measured (base: the baseline task's), its list sizes published as `lists`.
    kept: a kept quantizer's baseline, which stays the one measured when it was trained."""
    d = DriftBaseline(**{**base, "lists": lists if base["lists"] else None}, trained_in=version)
    return d.model_copy(update={k: getattr(kept, k) for k in KEPT_BASELINE}) if kept else d


def make_manifest(version: str, cfg: BuildConfig, *, corpus: Corpus, parts: list[PartResult], vectors: list[str],
                  quarantine: str | None, encoder: EncoderInfo, factory: str, auto_reason: str | None,
                  trained: dict, trained_file: FileInfo, shards: list[FileInfo], ranges: list | None,
                  order: str | None, tuned: dict, drift: DriftBaseline, timings: dict, lineage: Lineage, options: dict,
                  docs: tuple[list[str], list[dict]], extra: list[FileInfo], lists: ListsInfo | None = None,
                  per_shard: bool = False, refine: str | None = None) -> Manifest:
    """The version's manifest. trained, tuned: what the train and tune tasks returned; vectors: the
    embeddings parts indexed; options: the build options asked for (reindex's defaults); docs:
    (names, records) of the docs parts; extra: the version's other files (quarantine, list sizes)."""
    live = [p for p in parts if p.rows]
    return Manifest(
        version=version,
        source=SourceInfo(uri=cfg.source, fingerprint=corpus.fingerprint, documents=sum(p.rows for p in live),
                          rejected=sum(p.rejected for p in parts), quarantine=quarantine),
        encoder=encoder,
        index=IndexInfo(factory=factory, metric=encoder.metric, auto_reason=auto_reason,
                        nlist=trained["nlist"], train_vectors=trained["train_vectors"] or 0,
                        train_seconds=round(trained["seconds"], 2), train_device=trained.get("device", "cpu"),
                        lists=lists, refine=refine),
        sharding=ShardingInfo(mode=cfg.sharding, shards=cfg.shards, ranges=ranges,
                              order=order if cfg.sharding == "ivf" else None),
        trained=trained_file,
        shards=shards,
        docs=DocsInfo(files=docs[0], fields=cfg.stored_fields, id_kind=corpus.id_kind,
                      bytes=[r["bytes"] for r in docs[1]], sha256=[r["sha256"] for r in docs[1]],
                      per_shard=per_shard),
        search=SearchDefaults(nprobe=tuned["nprobe"], recall_at_10=tuned["recall_at_10"],
                              eval_queries=tuned["eval_queries"], target_recall=cfg.target_recall,
                              route_gap=tuned.get("route_gap"), touched=tuned.get("touched"),
                              exact_touched=tuned.get("exact_touched"), refine_factor=tuned.get("refine_factor"),
                              tuned_on=tuned.get("tuned_on", "held-out")),
        timings=timings,
        vectors=vectors,
        embeddings=EmbeddingsInfo(parts=vectors),
        drift=drift,
        lineage=lineage,
        options=options,
        extra=extra)


def publish_run(cfg: BuildConfig, store: Store, run, *, trained: dict, ranges: list | None, order: str | None,
                tuned: dict, base: dict, timings: dict, lineage: Lineage, options: dict,
                stored: list[list[FieldsInfo]] | None = None, refine: list[list[FieldsInfo]] | None = None
                ) -> Manifest:
    """Publish the run's version (run.wd.version, claimed before the merge), or a new one referring to
    its files when that one is published already; CURRENT moves to it.
    run: the pipeline's Run (its work dir, parts, encoder, factory, kept quantizer); stored: each
    shard's fields files (None: the version's docs files serve lookups); refine: its refine files (None: none)."""
    home = run.wd.version
    prev = load_manifest(store, home) if store.exists(f"{vdir(home)}/manifest.json") else None
    version = new_version_name(run.wd.run) if prev else home
    got = published_files(prev) if prev else put_files(store, run, base)
    t, lists, q = (named(got[k], version) for k in ("trained", "lists", "quarantine"))
    kept = run.kept
    m = make_manifest(version, cfg, corpus=run.corpus, parts=run.parts, vectors=run.emb,
                      quarantine=q.file if q else None, encoder=run.enc, factory=run.factory,
                      auto_reason=kept.auto_reason if kept else run.choice.reason if run.choice else None,
                      trained=trained, trained_file=t.model_copy(update={"ntotal": None}),
                      shards=[located_shard(store, run.wd, s, version, stored[s] if stored else None,
                                            refine[s] if refine else None) for s in range(cfg.shards)],
                      ranges=ranges, order=order, tuned=tuned,
                      drift=drift_baseline(base, version, kept.drift if kept else None, lists.file if lists else None),
                      timings=timings, lineage=lineage, options=options,
                      docs=docs_files(store, run), extra=[f for f in (q, lists) if f],
                      lists=built_lists(cfg, base, trained, kept), per_shard=stored is not None,
                      refine=cfg.refine_dtype(run.auto_refine) if refine else None)
    return publish(store, m)


def built_lists(cfg: BuildConfig, base: dict, trained: dict, kept) -> ListsInfo | None:
    """The manifest's list sizes: the baseline task measured them; the cap and splits are the training's,
    or a kept quantizer's (from its version)."""
    if base.get("imbalance") is None:
        return None
    how = (kept.lists.cap, kept.lists.split) if kept and kept.lists else (None, 0) if kept else \
        (cfg.list_cap, trained.get("balance", {}).get("splits", 0))
    return ListsInfo(imbalance=base["imbalance"], largest=base.get("largest", 0), mean=round(base.get("mean", 0.0), 1),
                     cap=how[0], split=how[1])

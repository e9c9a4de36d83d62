"""publish: copy the version's files into versions/<v>/, write the manifest, verify, then move CURRENT.

CURRENT is the last write. A run killed anywhere before it leaves the previous
version served; a half-copied versions/<v>/ has no manifest and is never listed.
The manifest is assembled here (make_manifest) from what the stages returned.
"""
from __future__ import annotations

import pyarrow as pa

from index_builder.build.merge import shard_info
from index_builder.config import BuildConfig
from index_builder.encode.parts import PartResult, part_rel
from index_builder.plan.corpus import Corpus
from index_builder.workdir import WorkDir
from shards.errors import IntegrityError
from shards.storage.lease import assert_held
from shards.storage.manifest import (
    DocsInfo,
    DriftBaseline,
    EmbeddingsInfo,
    EncoderInfo,
    FileInfo,
    IndexInfo,
    Lineage,
    Manifest,
    SearchDefaults,
    ShardingInfo,
    SourceInfo,
    new_version_name,
    set_current,
    vdir,
    verify,
    write_manifest,
)
from shards.storage.store import Store

TRAINED = "trained.index"   # names in versions/<v>/
LISTS = "lists.npy"
KEPT_BASELINE = ("error_kind", "error", "sample", "imbalance", "trained_in")


def doc_name(part: int) -> str:
    return f"docs/part-{part:05d}.parquet"


def run_files(wd: WorkDir, shards: list[FileInfo], docs: list[tuple[str, int]]) -> list[tuple[str, str]]:
    """(source, name in the version) of every file the version holds: the trained index, the merged
    shards, their .ivfdata, then the docs parts (docs: (rel, part) per part)."""
    return ([(wd.trained, TRAINED)] + [(wd.shard(s), i.file) for s, i in enumerate(shards)]
            + [(wd.shard_data(s), i.ivfdata) for s, i in enumerate(shards) if i.ivfdata]
            + [(rel, doc_name(p)) for rel, p in docs])


def copy_files(store: Store, version: str, pairs: list[tuple[str, str]]) -> None:
    if store.exists(vdir(version)):
        raise IntegrityError(f"{store.uri(vdir(version))}: exists; a published version is never rewritten")
    for src, name in pairs:
        store.copy(src, f"{vdir(version)}/{name}")


def write_quarantine(store: Store, version: str, rejected_rels: list[str]) -> str | None:
    """All rejected rows, with their reasons, in one Parquet file of the version."""
    tables = [store.read_table(r) for r in rejected_rels if store.exists(r)]
    if not tables:
        return None
    store.write_table(f"{vdir(version)}/quarantine.parquet", pa.concat_tables(tables))
    return "quarantine.parquet"


def file_info(store: Store, version: str, name: str, ntotal: int | None = None) -> FileInfo:
    rel = f"{vdir(version)}/{name}"
    return FileInfo(file=name, sha256=store.sha256(rel), bytes=store.size(rel), ntotal=ntotal)


def publish(store: Store, m: Manifest) -> Manifest:
    """Write and verify the manifest (its files are already in place), then point CURRENT at it."""
    write_manifest(store, m)
    verify(store, m)
    set_current(store, m.version)
    return m


def drift_baseline(base: dict, version: str, kept: DriftBaseline | None = None) -> DriftBaseline:
    """The baseline the build measured (base: the baseline task's), its list sizes published as LISTS.
    kept: a kept quantizer's baseline, which stays the one measured when it was trained."""
    d = DriftBaseline(**{**base, "lists": LISTS if base["lists"] else None}, trained_in=version)
    return d.model_copy(update={k: getattr(kept, k) for k in KEPT_BASELINE}) if kept else d


def make_manifest(version: str, cfg: BuildConfig, *, corpus: Corpus, parts: list[PartResult], vectors: list[str],
                  quarantine: str | None, encoder: EncoderInfo, factory: str, auto_reason: str | None,
                  trained: dict, trained_file: FileInfo, shards: list[FileInfo], ranges: list | None,
                  tuned: dict, drift: DriftBaseline, timings: dict, lineage: Lineage, options: dict) -> Manifest:
    """The version's manifest. trained, tuned: what the train and tune tasks returned; vectors: the
    embeddings parts indexed; options: the build options asked for (reindex's defaults)."""
    live = [p for p in parts if p.rows]
    return Manifest(
        version=version,
        source=SourceInfo(uri=cfg.source, fingerprint=corpus.fingerprint, documents=sum(p.rows for p in live),
                          rejected=sum(p.rejected for p in parts), quarantine=quarantine),
        encoder=encoder,
        index=IndexInfo(factory=factory, metric=encoder.metric, auto_reason=auto_reason,
                        nlist=trained["nlist"], train_vectors=trained["train_vectors"] or 0,
                        train_seconds=round(trained["seconds"], 2), train_device=trained.get("device", "cpu")),
        sharding=ShardingInfo(mode=cfg.sharding, shards=cfg.shards, ranges=ranges),
        trained=trained_file,
        shards=shards,
        docs=DocsInfo(files=[doc_name(p.part) for p in live], fields=cfg.stored_fields, id_kind=corpus.id_kind),
        search=SearchDefaults(nprobe=tuned["nprobe"], recall_at_10=tuned["recall_at_10"],
                              eval_queries=tuned["eval_queries"], target_recall=cfg.target_recall),
        timings=timings,
        vectors=vectors,
        embeddings=EmbeddingsInfo(parts=vectors),
        drift=drift,
        lineage=lineage,
        options=options)


def publish_run(cfg: BuildConfig, store: Store, run, *, trained: dict, ranges: list | None, tuned: dict,
                base: dict, timings: dict, lineage: Lineage, options: dict) -> Manifest:
    """Copy the run's files into a new version, write its manifest and move CURRENT to it.
    run: the pipeline's Run (its work dir, parts, encoder, factory, kept quantizer)."""
    version = new_version_name(run.wd.run)
    infos = [shard_info(store, run.wd, s) for s in range(cfg.shards)]
    copy_files(store, version, run_files(run.wd, infos, [(part_rel(run.fp, p.part, "docs"), p.part)
                                                         for p in run.live]))
    quarantine = write_quarantine(store, version, [part_rel(run.fp, p.part, "rejected") for p in run.parts])
    kept = run.kept
    m = make_manifest(version, cfg, corpus=run.corpus, parts=run.parts, vectors=run.emb, quarantine=quarantine,
                      encoder=run.enc, factory=run.factory,
                      auto_reason=kept.auto_reason if kept else run.choice.reason if run.choice else None,
                      trained=trained, trained_file=file_info(store, version, TRAINED), shards=infos,
                      ranges=ranges, tuned=tuned, drift=drift_baseline(base, version, kept.drift if kept else None),
                      timings=timings, lineage=lineage, options=options)
    if base["lists"]:
        store.copy(base["lists"], f"{vdir(version)}/{LISTS}")
    assert_held(store)  # a writer whose lease was taken over must not move CURRENT
    return publish(store, m)

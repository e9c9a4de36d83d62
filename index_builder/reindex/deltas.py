"""deltas: a reindex that keeps the quantizer publishes delta segments, not a rebuild.

The new version's shard s is the live version's segments, referred to and never copied, plus
  - one new delta segment holding the shard's new and changed vectors (build/delta.py), and
  - a new dead set: the live one and the keys of the live entries of every changed or deleted id.
Where such an entry is: a live delta entry of the id (read from the live deltas), else the id in
the base of its shard (hash sharding: the id's shard; ivf: the range of its list, which lists_task
reads from the list record the add wrote for its part, build/rowlists.py). Those lists also correct the list sizes the
drift baseline keeps (lists.npy). Search defaults (nprobe, recall) are the live version's: the
quantizer is the same and the lineage says how much changed. Full rebuilds remain for a retrain,
a flat or fast-scan index, or other shards (why_not).
"""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import numpy as np

from index_builder import progress
from index_builder.build import compact, fields
from index_builder.build.add import add_task
from index_builder.build.delta import delta_task
from index_builder.build.merge import ram_budget_exceeded
from index_builder.build.payload import code_size, fingerprint
from index_builder.build.publish import (
    LISTS,
    QUARANTINE,
    claim_version,
    docs_files,
    located_shard,
    named,
    publish,
    quarantine_task,
)
from index_builder.encode.parts import part_rel
from index_builder.eval.measures import K
from index_builder.pipeline import Run, Timer, merge_ram_budget
from index_builder.plan.factory import fast_scan
from index_builder.reindex.drift import imbalance, lists_info, lists_task, load_npy, save_npy
from index_builder.shard_math import add_rows, add_units, hash_shard
from index_builder.summary import Summary
from shards.errors import IntegrityError
from shards.raytools import cluster_cpus, log, ray_get
from shards.storage import segments
from shards.storage.faissio import from_bytes, no_search_flags
from shards.storage.manifest import (
    DeltaInfo,
    DocsInfo,
    EmbeddingsInfo,
    FileInfo,
    Lineage,
    Manifest,
    ShardInfo,
    SourceInfo,
    rebase,
    ref,
    vdir,
)
from shards.storage.store import Store


def why_not(live: Manifest, cfg, retrain: bool) -> str | None:
    """None when this reindex can add delta segments to the live version's shards; else why not."""
    if retrain:
        return "the quantizer is retrained"
    if not live.index.nlist:
        return f"{live.index.factory} has no IVF lists to add delta segments to"
    if fast_scan(live.index.factory):
        return f"{live.index.factory}: fast-scan lists are packed in blocks, which delta segments do not hold"
    if (live.sharding.mode, live.sharding.shards) != (cfg.sharding, cfg.shards):
        return (f"the shards change ({live.sharding.shards} {live.sharding.mode} -> "
                f"{cfg.shards} {cfg.sharding})")
    if live.search.target_recall != cfg.target_recall:
        return "--target-recall changed, which needs a new tune"
    return None


def live_deltas(store: Store, m: Manifest, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, keys, lists) of shard s's live delta entries in m."""
    sh = m.shards[s]
    got = [segments.read_delta(store, m, d) for d in sh.deltas]
    if not got:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    ids = np.concatenate([g[2] for g in got])
    keys = np.concatenate([segments.keys(h["first"], h["n"]) for h, *_ in got])
    lists = np.concatenate([g[1] for g in got]).astype(np.int64)
    ok = ~np.isin(keys, segments.read_dead(store, m, sh))
    return ids[ok], keys[ok], lists[ok]


def locate(store: Store, live: Manifest, old, diff) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, int]]:
    """Per shard of the live version, (keys, lists) of the live entries of the ids the diff found
    gone (diff.gone: per old part, its ids changed or deleted); and how many entries were found where:
    in the live deltas' records, in the parts' list records, or by assigning their vectors again."""
    S, out, rest = len(live.shards), [], diff.gone_ids
    how = {"deltas": 0, "records": 0, "assigned": 0}
    if not len(rest):
        return [(np.empty(0, np.int64), np.empty(0, np.int64))] * S, how
    for s in range(S):
        ids, keys, lists = live_deltas(store, live, s)
        hit = np.isin(ids, rest)
        out.append([keys[hit], lists[hit]])
        rest = np.setdiff1d(rest, ids[hit])
        how["deltas"] += int(hit.sum())
    if not len(rest):
        return [tuple(o) for o in out], how
    trained, tfp = live.path(live.trained.file), live.trained.sha256
    refs = [lists_task.options(num_cpus=1).remote(store, trained, tfp, old.sources[p], ids[np.isin(ids, rest)].tolist())
            for p, ids in diff.gone.items() if np.isin(ids, rest).any()]
    got = ray_get(refs)
    ids = np.concatenate([g[0] for g in got])
    lists = np.concatenate([g[1] for g in got])
    for g in got:
        how["records" if g[2] else "assigned"] += len(g[0])
    if len(ids) != len(rest):
        raise IntegrityError(f"{live.version}: {len(rest) - len(ids)} live id(s) not found in its embeddings parts")
    if live.sharding.mode == "ivf":
        starts = np.array([r[0] for r in live.sharding.ranges])
        sh = np.searchsorted(starts, lists, "right") - 1
    else:
        sh = hash_shard(ids, S)
    for s in range(S):
        k = sh == s
        out[s] = [np.concatenate([out[s][0], ids[k]]), np.concatenate([out[s][1], lists[k]])]
    return [tuple(o) for o in out], how


def index_deltas(cfg, store: Store, t: Timer, run: Run, live: Manifest, gone, diff, lineage: Lineage,
                 options: dict, policy: tuple[float, int]) -> Summary:
    """Publish run's new and changed vectors as delta segments over the live version (see above);
    gone: locate's (keys, lists) per shard; policy: (share, segments), when a shard is compacted
    (build/compact.py due)."""
    run = replace(run, wd=claim_version(store, run.wd))
    v, S, nlist = run.wd.version, len(live.shards), live.index.nlist
    if not store.exists(run.wd.trained):
        store.copy(run.kept.trained, run.wd.trained)
    fp = fingerprint(store.read_bytes(run.wd.trained))
    with t.stage("add"):
        # every part this run wrote, its kept rows too: the add records the lists of all their rows
        changed = [(part_rel(run.fp, p.name), p.rows) for p in run.live if not p.kept]
        n, rows = sum(p.new + p.changed for p in run.live), sum(r for _, r in changed)
        units = add_units(changed, add_rows(run.enc.dim, rows, cluster_cpus(), cfg.add_rows)) if rows else []
        names = [f"delta-{i:05d}" for i in range(len(units))]
        added = progress.gather([add_task.options(num_cpus=1).remote(
            store, run.wd, u, pieces, shards=S, sharding=live.sharding.mode, metric=run.metric, k=K,
            changed_only=True) for u, pieces in zip(names, units)], "add", "units")
    with t.stage("merge"):
        ranges = live.sharding.ranges
        refs = [delta_task.options(num_cpus=1).remote(
            store, run.wd, names, s, 0 if ranges else s, tuple(ranges[s]) if ranges else None, fp,
            _next_first(live.shards[s]), nlist) for s in range(S)] if names else []
        made = progress.gather(refs, "merge", "shards") if refs else [None] * S
        shards = [_shard(store, live, v, s, made[s], gone[s][0]) for s in range(S)]
    if live.docs.per_shard:
        with t.stage("fields"):
            shards = [sh.model_copy(update={"fields": [*sh.fields, *(named(f, v) for f in new)]})
                      for sh, new in zip(shards, _fields(cfg, store, run, live, v, fp))]
    if live.index.refine:
        with t.stage("refine"):
            shards = [sh.model_copy(update={"refine": [*sh.refine, *(named(f, v) for f in new)]})
                      for sh, new in zip(shards, _fields(cfg, store, run, live, v, fp, live.index.refine))]
    due = {s: why for s in range(S) if (why := compact.due(shards[s], *policy))}
    if due:
        with t.stage("compact"):
            shards = compact_shards(store, run.wd, live.model_copy(update={"version": v, "shards": shards}), due,
                                    merge_ram_budget(cfg))
        lineage = lineage.model_copy(update={"compacted": {str(s): why for s, why in due.items()}})
    if sum(a["vectors"] for a in added) != n:
        raise IntegrityError(f"{store.uri(run.wd.root)}: added {sum(a['vectors'] for a in added)} of {n} vectors")
    with t.stage("publish"):
        m = _manifest(cfg, store, run, live, v, shards, made, gone, diff, lineage, options, dict(t.seconds))
        publish(store, m)
    log(f"reindex: {v}: delta segments of {n:,} vector(s), {sum(len(g[0]) for g in gone):,} entries dead; "
        f"search defaults kept from {live.version} (nprobe {live.search.nprobe})")
    return Summary(version=v, index_root=cfg.index_root, documents=m.source.documents, rejected=m.source.rejected,
                   quarantine=None, factory=m.index.factory, shards=S,
                   index_bytes=sum(s.bytes + sum(d.bytes for d in s.segment_files()) for s in m.shards),
                   nprobe=m.search.nprobe, recall_at_10=m.search.recall_at_10, seconds=dict(t.seconds),
                   work=run.wd.root)


def compact_shards(store: Store, wd, m: Manifest, due: dict[int, str], budget: int) -> list[ShardInfo]:
    """m's shards with those in `due` compacted into new bases in m's version (wd: its run, with the
    trained index in place), in RAM or on disk by the merge's budget; their fields files too."""
    c = code_size(from_bytes(store.read_bytes(wd.trained), no_search_flags()))
    for s, why in due.items():
        log(f"compact: shard {s}: {why}")
    refs = [compact.compact_task.options(num_cpus=1).remote(
        store, wd, m, s, ram_budget_exceeded(m.shards[s].live * (c + 8), budget)) for s in due]
    progress.gather(refs, "compact", "shards")
    stored = fields.compact(store, wd.root, m, [s for s in due if m.shards[s].fields], m.version)
    return [located_shard(store, wd, s, m.version, stored.get(s), [f.model_copy(update={"file": m.path(f.file)})
                                                                 for f in m.shards[s].refine]) if s in due else sh
            for s, sh in enumerate(m.shards)]


def _fields(cfg, store: Store, run: Run, live: Manifest, v: str, fp: str, refine: str | None = None) -> list[list]:
    """Per shard, the fields files of the next generation: every row of the docs parts this run wrote
    (new, changed and kept rows: a kept row's vector stays where it was, its fields may have changed).
    refine (the live version's refine dtype): the refine files of the next generation, of the same rows."""
    gen = max((f.gen for sh in live.shards for f in (sh.refine if refine else sh.fields)), default=-1) + 1
    spec = fields.spec_of(live.sharding.mode, len(live.shards), live.sharding.ranges, fp)
    return fields.shuffle(store, run.wd.root, run.fp, [p for p in run.live if not p.kept], spec, v, gen,
                          cfg.stored_fields, run.corpus.id_kind, refine)


def _next_first(sh: ShardInfo) -> int:
    return max((d.first + (d.ntotal or 0) for d in sh.deltas), default=0)


def _shard(store: Store, live: Manifest, v: str, s: int, made: dict | None, dead_keys: np.ndarray) -> ShardInfo:
    """Shard s of version v: the live one's segments referred to, its new delta, its new dead set."""
    sh = rebase(live, v).shards[s]
    deltas = list(sh.deltas)
    if made and made["ntotal"]:
        deltas.append(DeltaInfo(file=ref(v, made["file"]), sha256=made["sha256"], bytes=made["bytes"],
                                ntotal=made["ntotal"], first=made["first"]))
    dead, count = sh.dead, sh.dead_count
    if len(dead_keys):
        keys = np.union1d(segments.read_dead(store, live, live.shards[s]), dead_keys)
        rel = f"{vdir(v)}/shard-{s}.dead.npy"
        w = store.write_bytes(rel, segments.dead_bytes(keys))
        dead, count = FileInfo(file=ref(v, rel), sha256=w.sha256, bytes=w.bytes, ntotal=len(keys)), len(keys)
    return sh.model_copy(update={"deltas": deltas, "dead": dead, "dead_count": count})


def _lists(store: Store, live: Manifest, v: str, made: list, gone: list) -> tuple[FileInfo, np.ndarray] | None:
    """The list sizes after this reindex (the drift baseline's) written in version v, and them;
    None when the live version keeps none."""
    if not (live.drift and live.drift.lists):
        return None
    sizes = load_npy(store, live.path(live.drift.lists)).astype(np.int64)
    for m in made:
        if m:
            sizes = sizes + np.asarray(m["counts"], np.int64)
    for _, lists in gone:
        sizes = sizes - np.bincount(lists.astype(np.int64), minlength=len(sizes))
    w = save_npy(store, f"{vdir(v)}/{LISTS}", sizes)
    return FileInfo(file=LISTS, sha256=w.sha256, bytes=w.bytes), sizes


def _index(live: Manifest, sizes: np.ndarray | None):
    """The live version's index info, with the list sizes after the deltas."""
    if sizes is None:
        return live.index
    was = live.index.lists
    return live.index.model_copy(update={"lists": lists_info(sizes, was.cap if was else None, was.split if was else 0)})


def _manifest(cfg, store, run: Run, live: Manifest, v: str, shards, made, gone, diff, lineage, options,
              timings) -> Manifest:
    rejected = [part_rel(run.fp, p.name, "rejected") for p in run.parts if p.rejected]
    q = ray_get(quarantine_task.remote(store, rejected, f"{vdir(v)}/{QUARANTINE}")) if rejected else None
    qi = FileInfo(file=QUARANTINE, sha256=q["sha256"], bytes=q["bytes"]) if q else None
    got = _lists(store, live, v, made, gone)
    li, sizes = got if got else (None, None)
    drift = live.drift.model_copy(update={"lists": LISTS if li else None,
                                          "imbalance": live.drift.imbalance}) if live.drift else None
    docs = docs_files(store, run)
    n = sum(p.rows for p in run.live)
    m = rebase(live, v).model_copy(update=dict(
        version=v, created=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        source=SourceInfo(uri=cfg.source, fingerprint=run.corpus.fingerprint, documents=n,
                          rejected=sum(p.rejected for p in run.parts), quarantine=QUARANTINE if q else None),
        shards=shards, encoder=run.enc,
        docs=DocsInfo(files=docs[0], fields=cfg.stored_fields, id_kind=run.corpus.id_kind,
                      bytes=[r["bytes"] for r in docs[1]], sha256=[r["sha256"] for r in docs[1]],
                      per_shard=live.docs.per_shard),
        timings=timings, vectors=run.emb, embeddings=EmbeddingsInfo(parts=run.emb), drift=drift,
        index=_index(live, sizes), lineage=lineage, options=options, extra=[f for f in (qi, li) if f]))
    if m.ntotal != n:
        raise IntegrityError(f"{store.uri(vdir(v))}: its shards hold {m.ntotal} live vectors, the corpus {n}; "
                             f"delete it and reindex")
    if sizes is not None:
        log(f"reindex: list imbalance {imbalance(sizes):.3f} after the deltas")
    return m


"""`shardex reindex SOURCE INDEX_ROOT`: a new version from a changed corpus, encoding only what changed.

1. plan      the corpus as a build would; options not given are the live version's
2. encode    each input shard: hash the encoded column of every row, compare (id, hash) with the
             live version's embeddings; a match keeps its stored vector, the rest is encoded
             (everything is encoded when the encoder differs from the live version's)
3. diff      new, changed, deleted and unchanged documents, from the parts' origin column, in
             tasks over id buckets (reindex/diff.py)
4. drift     keep the live quantizer unless --retrain, another encoder, another factory, or the
             new vectors' quantization error or the lists' imbalance passed its threshold
5. index     add, merge, tune and publish as a build does, with the kept quantizer in place
6. prune     with --keep N, old versions and stale scratch go (shards/storage/retention.py)

A reindex killed anywhere leaves CURRENT as it was; run again, it reuses what it finished.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from index_builder import progress
from index_builder.config import BuildConfig, ReindexConfig, make
from index_builder.encode.parts import Layout, part_key, part_rel
from index_builder.encode.pool import Encoders
from index_builder.encode.reuse import Reuse
from index_builder.pipeline import (
    Kept,
    Run,
    Timer,
    auto_choice,
    build,
    index_and_publish,
    options_of,
    short_hash,
    show_plan,
    with_endpoint,
)
from index_builder.plan.corpus import Corpus, plan_corpus
from index_builder.reindex import deltas
from index_builder.reindex.diff import Diff, Old, diff
from index_builder.reindex.drift import (
    BASELINE_SAMPLE,
    Decision,
    decide,
    delta_task,
    imbalance,
    list_sizes,
    load_npy,
)
from index_builder.summary import Summary
from shards.errors import ShardexError
from shards.raytools import ensure_ray, log, ray_get
from shards.storage.integrity import check_info
from shards.storage.lease import hold
from shards.storage.manifest import EncoderInfo, Lineage, Manifest, current_version, load_manifest
from shards.storage.retention import Pruned, prune
from shards.storage.store import Store

# Encoder settings that change the vectors of the documents: any difference re-encodes everything.
# (query_prefix only changes queries; dtype changes precision, not the space.)
SPACE_FIELDS = ("name", "revision", "modules", "dim", "normalize", "document_prefix", "max_seq_length")
# Build options whose change alone makes a new version worth publishing.
RESULT_OPTIONS = ("fields", "factory", "memory_budget", "shards", "sharding", "ivf_order", "metric",
                  "target_recall", "query_prefix")


@dataclass
class ReindexSummary:
    version: str
    parent: str | None
    published: bool
    new: int = 0
    changed: int = 0
    deleted: int = 0
    unchanged: int = 0
    encoded: int = 0                  # documents the encoder ran on (new + changed, or all)
    ids_read: int = 0                 # ids the corpus-wide id check read (plan/known.py)
    reencoded_all: str | None = None
    retrained: bool = False
    retrain_reason: str | None = None
    drift: dict = field(default_factory=dict)
    build: Summary | None = None
    pruned: Pruned | None = None

    def lines(self) -> list[str]:
        if not self.published:
            out = [f"version      {self.version}  (CURRENT, unchanged: the corpus matches it)"]
        else:
            out = list(self.build.lines())
        out.append(f"reindex      from {self.parent or '(none: a full build)'}: {self.new:,} new, "
                   f"{self.changed:,} changed, {self.deleted:,} deleted, {self.unchanged:,} unchanged")
        out.append(f"encoded      {self.encoded:,} document(s)"
                   + (f": all of them, {self.reencoded_all}" if self.reencoded_all else ""))
        q = f"retrained ({self.retrain_reason})" if self.retrained else "reused the live version's"
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in self.drift.items())
        out.append(f"quantizer    {q}" + (f"; drift {ratios} of the baseline" if ratios else ""))
        if self.pruned:
            out += self.pruned.lines()
        return out


def space_change(new: EncoderInfo, live: EncoderInfo) -> str | None:
    """None when the new encoder's document vectors can share an index with the live ones; else why not."""
    for f in SPACE_FIELDS:
        a, b = getattr(live, f), getattr(new, f)
        if a != b:
            return f"the encoder's {f} changed ({a!r} -> {b!r})"
    return None


def effective_config(cfg: ReindexConfig, live: Manifest | None) -> BuildConfig:
    """Build options: the live version's, overridden by the ones given."""
    opts = {k: v for k, v in ((live.options or {}) if live else {}).items() if k in BuildConfig.model_fields}
    if live and live.sharding.mode == "ivf" and "ivf_order" not in opts:  # a version from before grouped lists
        opts["ivf_order"] = live.sharding.order or "kmeans"
    return make(BuildConfig, {**opts, **cfg.build_options()}, where="shardex reindex")


def _live(store: Store) -> Manifest | None:
    try:
        return load_manifest(store, current_version(store))
    except ShardexError:
        if store.exists("CURRENT"):
            raise  # CURRENT names a version that cannot be read: never build around it
        return None


def checked_keys(live: Manifest, bcfg: BuildConfig) -> set[str] | None:
    """The keys of the live parts, whose files the live version's id check read (plan/known.py), when it
    read the same id column; else None, and the plan checks every file's ids again."""
    if not live.embeddings or (live.options or {}).get("id_column") != bcfg.id_column:
        return None
    return {k for p in live.embeddings.parts if (k := part_key(p))}


def old_ids(store: Store, m: Manifest, parts: list[str] | None = None) -> Old:
    """Where the live ids of `parts` (default: every part) are, and whether the live vectors can be
    reused: when some part is gone, the ids come from the version's own docs files."""
    every = m.embeddings.parts if m.embeddings else []
    missing = None
    if not m.embeddings:
        missing = f"{m.version} records no embeddings (built before reindex support)"
    elif gone := [p for p in every if not store.exists(p)]:
        missing = f"{len(gone)} of {m.version}'s embeddings parts are gone (e.g. {store.uri(gone[0])})"
    if missing:
        return Old(sources=[m.path(f) for f in m.docs.files], parts=[], missing=missing)
    parts = list(every if parts is None else parts)
    return Old(sources=parts, parts=parts)


def reindex(cfg: ReindexConfig) -> ReindexSummary:
    cfg = with_endpoint(cfg)
    store = Store(cfg.index_root, cfg.s3_endpoint)
    # the build and prune it runs re-enter this lease, and add to this progress record
    with hold(store, "shardex reindex"), progress.tracking(store, "shardex reindex"):
        return _reindex(cfg, store)


def _reindex(cfg: ReindexConfig, store: Store) -> ReindexSummary:
    live = _live(store)
    bcfg = effective_config(cfg, live)
    if live is None:
        log(f"reindex: no live version under {store.root}: a full build")
        s = build(bcfg)
        return _finish(cfg, store, ReindexSummary(version=s.version, parent=None, published=True, new=s.documents,
                                                  build=s, retrained=True, retrain_reason="first version"), [s.work])
    t = Timer()
    with t.stage("plan"):
        corpus = plan_corpus(bcfg, live_keys=checked_keys(live, bcfg))
    ensure_ray()
    log(f"plan: {len(corpus.files)} file(s), {corpus.total_rows:,} rows, {len(corpus.shards)} part(s); "
        f"live {live.version}: {live.source.documents:,} documents; the id check read {corpus.ids_read:,} ids")
    with t.stage("encode"):
        parts, enc, fp, why_all, old = encode(bcfg, corpus, live, store)
    wrote = [p for p in parts if p.rows and not p.kept]
    emb, news = [part_rel(fp, p.name) for p in wrote], [p.new + p.changed for p in wrote]  # what this run wrote
    d = diff(store, old, emb, sum(p.rows for p in parts))
    log(f"reindex: {d.new:,} new, {d.changed:,} changed, {d.deleted:,} deleted, {d.unchanged:,} unchanged")
    found = ReindexSummary(version=live.version, parent=live.version, published=False, new=d.new, changed=d.changed,
                           deleted=d.deleted, unchanged=d.unchanged, encoded=sum(p.encoded for p in parts),
                           ids_read=corpus.ids_read, reencoded_all=why_all)
    if not (d.new or d.changed or d.deleted or why_all or cfg.retrain) and _same_options(bcfg, live):
        log(f"reindex: nothing changed since {live.version}; CURRENT stays")
        return _finish(cfg, store, found, [])

    with t.stage("drift"):
        # where the gone ids' live entries are, and their lists: the dead sets' keys, the drift's list counts
        located, how = (deltas.locate(store, live, old, d) if live.index.nlist and not (why_all or cfg.retrain)
                        else (None, {}))
        if how:
            log(f"reindex: gone entries found in the deltas {how['deltas']:,}, in the list records "
                f"{how['records']:,}, by their vectors {how['assigned']:,}")
        dec = _quantizer(cfg, bcfg, store, live, Changes(old, emb, news, d, why_all, located), dim=enc.dim,
                         metric=bcfg.metric or enc.metric)
    log(f"quantizer: {'retrain: ' + dec.reason if dec.retrain else 'reuse ' + live.version + chr(39) + 's'}"
        + (f" (drift {dec.ratios})" if dec.ratios else ""))
    run_cfg, kept = _run_config(bcfg, live, dec)
    run = Run.of(run_cfg, corpus, parts, enc, fp, kept)
    show_plan(run_cfg, run.n, run.enc.dim, run.metric, trains=kept is None)
    why = deltas.why_not(live, bcfg, dec.retrain)
    # the version records the options asked for, not the kept quantizer's factory and metric
    if why is None:
        s = deltas.index_deltas(run_cfg, store, t, run, live, located, d,
                                _lineage(found, dec, "delta").model_copy(update={"located": how}),
                                options_of(bcfg), (cfg.compact_share, cfg.compact_segments))
    else:
        log(f"reindex: new segments for every shard: {why}")
        s = index_and_publish(run_cfg, store, t, run, lineage=_lineage(found, dec), options=options_of(bcfg))
    out = replace(found, version=s.version, published=True, retrained=dec.retrain, retrain_reason=dec.reason,
                  drift=dec.ratios, build=s)
    return _finish(cfg, store, out, [s.work])


def _run_config(bcfg: BuildConfig, live: Manifest, dec: Decision) -> tuple[BuildConfig, Kept | None]:
    """The config the stages run with, and the live quantizer when it is kept (with its factory and metric)."""
    if dec.retrain:
        return bcfg, None
    kept = Kept(trained=live.path(live.trained.file), auto_reason=live.index.auto_reason, drift=live.drift,
                parent=live.version, sharding=live.sharding, lists=live.index.lists, refine=live.index.refine)
    return bcfg.model_copy(update={"factory": live.index.factory, "metric": live.index.metric}), kept


def _lineage(found: ReindexSummary, dec: Decision, segments: str = "rebuilt") -> Lineage:
    return Lineage(kind="reindex", segments=segments,
                   parent=found.parent, new=found.new, changed=found.changed, deleted=found.deleted,
                   unchanged=found.unchanged, reencoded_all=found.reencoded_all, retrained=dec.retrain,
                   retrain_reason=dec.reason, drift=dec.ratios)


def encode(bcfg: BuildConfig, corpus: Corpus, live: Manifest, store: Store):
    """(part results, encoder info, fingerprint, why every document is encoded or None, the live ids
    of the files that changed or went). A part is named by its source's identity (InputShard.key),
    so an input shard whose file did not change finds the live version's part and keeps it as it
    is, unread (PartResult.kept). The others are read and hashed: each row reuses the vector of its
    id in the live parts of the changed and removed files when the hash matches, and is encoded
    otherwise. Every vector is new when the live ones are gone or the encoder's space changed."""
    with Encoders(bcfg, corpus) as pool:
        fp = short_hash(corpus.columns, pool.info)
        live_parts = set(live.embeddings.parts if live.embeddings else [])
        rel = {s.part: part_rel(fp, s.key or s.part) for s in corpus.shards}
        old = old_ids(store, live, [p for p in sorted(live_parts) if p not in set(rel.values())])
        why_all = old.missing or space_change(pool.info, live.encoder)
        if why_all:
            log(f"reindex: encoding every document: {why_all}")
            old = old_ids(store, live)
        kept = set() if why_all else {s.part for s in corpus.shards if rel[s.part] in live_parts}
        cands = tuple(old.parts)
        reuse = {s.part: Reuse(cands, encode_all=bool(why_all)) for s in corpus.shards if s.part not in kept}
        log(f"reindex: {len(kept):,} of {len(corpus.shards):,} part(s) unchanged (their files are the same), "
            f"{len(reuse):,} to read against {len(cands):,} live part(s)")
        parts = pool.encode(Layout.build(fp), reuse)
        for p in parts:
            p.kept = p.part in kept
        return parts, pool.info, fp, why_all, old


def _same_options(bcfg: BuildConfig, live: Manifest) -> bool:
    opts = dict(live.options or {})
    if live.sharding.mode == "ivf":
        opts.setdefault("ivf_order", live.sharding.order or "kmeans")  # a version from before grouped lists
    return all(opts.get(k) == getattr(bcfg, k) for k in RESULT_OPTIONS if k != "ivf_order" or bcfg.sharding == "ivf")


@dataclass
class Changes:
    """What a reindex found against the live version, for the drift check."""

    old: Old
    emb: list[str]                 # this run's embeddings parts (with rows)
    emb_new: list[int]             # the new and changed rows of each
    diff: Diff
    reencoded_all: str | None      # why every document was encoded again, if it was
    located: list | None = None    # per live shard, (keys, lists) of the gone ids' live entries (deltas.locate)


def _quantizer(cfg: ReindexConfig, bcfg: BuildConfig, store: Store, live: Manifest, c: Changes, *, dim: int,
               metric: str) -> Decision:
    """Reuse the live quantizer, or retrain, and why."""
    if c.reencoded_all:
        return Decision(True, f"every vector is new ({c.reencoded_all})")
    if cfg.retrain:
        return Decision(True, "--retrain")
    if metric != live.index.metric:
        return Decision(True, f"metric changed ({live.index.metric} -> {metric})")
    d = c.diff
    n = d.new + d.changed + d.unchanged
    want = auto_choice(bcfg, n, dim).factory if bcfg.factory == "auto" else bcfg.factory  # as the build chose it
    if want != live.index.factory:
        what = f"--factory auto picks {want} for {n:,} documents" if bcfg.factory == "auto" else f"--factory {want}"
        return Decision(True, f"{what}; the live index is {live.index.factory}")
    if bcfg.sharding == "ivf" and (live.sharding.order or "kmeans") != bcfg.ivf_order and bcfg.shards > 1:
        return Decision(True, f"--ivf-order {bcfg.ivf_order}; the live lists are in {live.sharding.order or 'kmeans'} "
                              f"order (a list's number is fixed by its quantizer)")
    # from here the live quantizer is kept or measured against (drift tasks read it): it must be the one published
    check_info(store, live.dir_of(live.trained), live.trained)
    b = live.drift
    if b is None or (b.error_kind is None and b.imbalance is None):
        return Decision(False, None)  # nothing trained to drift (Flat), or no baseline recorded
    return _drift_check(cfg, store, live, c, b)


def _drift_check(cfg, store: Store, live: Manifest, c: Changes, b) -> Decision:
    trained, kind = live.path(live.trained.file), b.error_kind
    total = max(1, sum(c.emb_new))  # the error over a bounded sample: each part's share of BASELINE_SAMPLE
    added = [delta_task.options(num_cpus=1).remote(store, trained, rel, None, kind, -(-BASELINE_SAMPLE * k // total))
             for rel, k in zip(c.emb, c.emb_new)]
    added = ray_get(added)
    n_new = sum(a["n"] for a in added)
    new_error = sum(a["error_sum"] for a in added) / n_new if n_new and kind else None
    projected = None
    if b.imbalance is not None:
        sizes = _live_sizes(store, live)
        for a in added:
            if a["counts"] is not None:
                sizes = sizes + a["counts"]
        for _, lists in c.located or []:  # the entries that go, in the lists they are in now
            sizes = sizes - np.bincount(lists.astype(np.int64), minlength=len(sizes))
        projected = imbalance(np.maximum(sizes, 0))
    return decide(b.error, new_error, b.imbalance, projected, cfg.drift_error, cfg.drift_imbalance)


def _live_sizes(store: Store, live: Manifest) -> np.ndarray:
    if live.drift and live.drift.lists:
        return load_npy(store, live.path(live.drift.lists))
    from shards.storage.faissio import load_shard

    return sum(list_sizes(load_shard(store, live, s)) for s in live.shards)


def _finish(cfg: ReindexConfig, store: Store, out: ReindexSummary, own_work: list[str]) -> ReindexSummary:
    if cfg.keep:
        out.pruned = prune(store, cfg.keep, cfg.grace_seconds, tuple(own_work))
        log(f"prune: {len(out.pruned.versions)} version(s), {len(out.pruned.work)} work dir(s), "
            f"{len(out.pruned.embeddings)} embeddings dir(s) deleted")
    return out


def as_dict(s: ReindexSummary) -> dict:
    return asdict(s)

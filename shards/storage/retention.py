"""Retention: delete old versions and stale scratch, never CURRENT or the version before it.

What goes, with --keep N:
- versions/<v> outside the N newest, unless it is CURRENT, the version published before CURRENT,
  or CURRENT's parent (the version a reindex started from); age: manifest.age_key;
- versions/<v> without a manifest (a publish that died) older than the grace period;
- work/<run>/ scratch older than the grace period (and the caller's own finished runs at once);
- embeddings/<fp>/ that no kept version uses, older than the grace period; and in the directories
  kept versions use, the files of parts none of them uses (a changed file's old part), as old.

A version's manifest may refer to files outside versions/<v>/ (Manifest.path): another version's
shards, encode's docs parts. No file a kept version refers to is ever deleted: a deleted version's
directory loses all but those, and is then an unfinished one that holds nothing to delete.

The grace period protects a job that is running now: its scratch keeps being written (and the
writer lease, _lease.json at the root, keeps a second writer out). A version is deleted manifest
first, so a half-deleted one is never listed.
"""
from __future__ import annotations

import posixpath
import time
from dataclasses import asdict, dataclass, field

from shards.errors import ConfigError
from shards.storage.lease import hold
from shards.storage.manifest import CURRENT, Manifest, age_key, load_manifest, vdir
from shards.storage.store import Store

MANIFEST = "manifest.json"


@dataclass
class Pruned:
    kept: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)     # deleted (or, dry run, to delete)
    unfinished: list[str] = field(default_factory=list)
    work: list[str] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)        # files of embeddings parts no kept version uses
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False

    def lines(self) -> list[str]:
        verb = "would delete" if self.dry_run else "deleted"
        out = [f"kept         {len(self.kept)} version(s): {', '.join(self.kept) or '-'}"]
        for what, names in (("versions", self.versions), ("unfinished", self.unfinished),
                            ("work", self.work), ("embeddings", self.embeddings)):
            out.append(f"{what:<12} {verb} {len(names)}" + (f": {', '.join(names)}" if names else ""))
        if self.parts:
            out.append(f"{'parts':<12} {verb} {len(self.parts)} file(s) of embeddings parts no kept version uses")
        return out + [f"note         {n}" for n in self.notes]


def versions_to_keep(names: list[str], current: str | None, parent: str | None, keep: int) -> set[str]:
    """names oldest first -> the N newest, CURRENT, the version before it, and its parent."""
    if keep < 1:
        raise ConfigError(f"keep: must be at least 1, got {keep}")
    kept = set(names[-keep:])
    if current in names:
        kept.add(current)
        i = names.index(current)
        if i > 0:
            kept.add(names[i - 1])
    if parent in names:
        kept.add(parent)
    return kept


def stale(store: Store, rel: str, now: float, grace_s: float) -> bool:
    t = store.newest(rel)
    return t is None or now - t >= grace_s


def prune(store: Store, keep: int, grace_s: float, own_work: tuple[str, ...] = (), dry_run: bool = False) -> Pruned:
    """What goes (see above), deleted under the writer lease; a dry run only reads, and takes none."""
    if dry_run:
        return _prune(store, keep, grace_s, own_work, dry_run)
    with hold(store, "shardex prune", make_root=False):  # a reindex's prune re-enters its lease
        return _prune(store, keep, grace_s, own_work, dry_run)


def _prune(store: Store, keep: int, grace_s: float, own_work: tuple[str, ...], dry_run: bool) -> Pruned:
    now = time.time()
    current = store.read_text(CURRENT).strip() if store.exists(CURRENT) else None
    names = store.ls("versions")
    done = [v for v in names if store.exists(f"{vdir(v)}/{MANIFEST}")]
    manifests = {v: load_manifest(store, v) for v in done}
    done.sort(key=lambda v: age_key(v, manifests[v].created))
    parent = manifests[current].lineage.parent if current in manifests and manifests[current].lineage else None
    kept = versions_to_keep(done, current, parent, keep)
    out = Pruned(kept=sorted(kept), dry_run=dry_run)
    out.versions = sorted(set(done) - kept)
    refs = referenced([manifests[v] for v in kept])
    out.unfinished = [v for v in names if v not in manifests and stale(store, vdir(v), now, grace_s)
                      and unreferenced(store, vdir(v), refs)]
    out.work = [w for w in store.ls("work") if f"work/{w}" in own_work or stale(store, f"work/{w}", now, grace_s)]

    used, unknown = {p.split("/")[1] for p in refs if p.startswith("embeddings/")}, []
    names: dict[str, set[str]] = {}  # per used embeddings dir, the part files kept versions use
    for v in kept:
        e = manifests[v].embeddings
        if e is None:
            unknown.append(v)
        else:
            used |= {p.split("/")[1] for p in e.parts}
            for p in e.parts:
                names.setdefault(p.split("/")[1], set()).add(posixpath.basename(p))
    if unknown:
        out.notes.append(f"embeddings/ left alone: {', '.join(sorted(unknown))} do(es) not record which "
                         "embeddings it uses (built before shardex recorded them)")
    else:
        out.embeddings = [fp for fp in store.ls("embeddings")
                          if fp not in used and stale(store, f"embeddings/{fp}", now, grace_s)]
        tfps = {manifests[v].trained.sha256[:16] for v in kept}
        out.parts = [f for fp in sorted(used)
                     for f in stale_parts(store, fp, names.get(fp, set()), refs, now, grace_s, tfps)]
    if dry_run:
        return out
    for v in out.versions:
        store.rm(f"{vdir(v)}/{MANIFEST}")  # first: from here on it is no longer listed
        rm_unreferenced(store, vdir(v), refs)
    for v in out.unfinished:
        rm_unreferenced(store, vdir(v), refs)
    for w in out.work:
        store.rm(f"work/{w}", recursive=True)
    for fp in out.embeddings:
        store.rm(f"embeddings/{fp}", recursive=True)
    for f in out.parts:
        store.rm(f)
    return out


def stale_parts(store: Store, fp: str, kept_names: set[str], refs: set[str], now: float, grace_s: float,
                tfps: set[str] = frozenset()) -> list[str]:
    """The files of embeddings/<fp>/ (a part, its docs, record, rejects and list records) of parts no kept
    version uses, and the list records of a trained index no kept version has (lists-<t>/, t not in tfps),
    older than the grace period: parts are named by their source, so one directory holds the parts of
    every version with the same encoder, and a changed file's old part goes once unused."""
    out = []
    for f in _files(store, f"embeddings/{fp}"):
        base = posixpath.basename(f)
        name = base[:base.index(".parquet") + 8] if ".parquet" in base else base
        other = "/lists-" in f and f.split("/lists-")[1][:16] not in tfps
        if (name not in kept_names or other) and f not in refs and stale(store, f, now, grace_s):
            out.append(f)
    return out


def referenced(kept: list[Manifest]) -> set[str]:
    """Every path under INDEX_ROOT that a kept version's manifest refers to."""
    return {p for m in kept for p, _ in m.listed()}


def _files(store: Store, rel: str) -> list[str]:
    """Paths (under the root) of every file at or under rel."""
    base = store.path().rstrip("/") + "/"
    return [p[len(base):] if p.startswith(base) else p
            for p in store.fs.find(store.path(rel), withdirs=False)]


def unreferenced(store: Store, rel: str, refs: set[str]) -> bool:
    """Whether rel holds anything no kept version refers to."""
    return not any(r.startswith(f"{rel}/") for r in refs) or any(f not in refs for f in _files(store, rel))


def rm_unreferenced(store: Store, rel: str, refs: set[str]) -> None:
    """rel and everything under it, but the files a kept version refers to (one listing when there are some)."""
    if not any(r.startswith(f"{rel}/") for r in refs):
        store.rm(rel, recursive=True)
        return
    for f in _files(store, rel):
        if f not in refs:
            store.rm(f)


def as_dict(p: Pruned) -> dict:
    return asdict(p)

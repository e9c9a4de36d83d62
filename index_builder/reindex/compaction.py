"""`shardex compact INDEX_ROOT`: CURRENT's segmented shards rewritten into new bases, published as a new version.

A reindex compacts a shard by itself when its deltas pass --compact-share or --compact-segments;
this command does the same for CURRENT at any time (a quiet hour, or after a lowered threshold),
or for every segmented shard with --all. Nothing is re-encoded: each shard's live entries keep
their codes (build/compact.py). The other shards, the trained index and the docs are referred to.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from index_builder import progress
from index_builder.build import compact
from index_builder.build.publish import claim_version, publish
from index_builder.pipeline import short_hash
from index_builder.reindex.deltas import compact_shards
from index_builder.workdir import WorkDir
from shards.config import parse_bytes
from shards.errors import ConfigError
from shards.raytools import ensure_ray, log
from shards.storage.lease import hold
from shards.storage.manifest import Lineage, current_version, load_manifest, rebase
from shards.storage.store import Store


@dataclass
class Compacted:
    version: str                 # CURRENT afterwards
    parent: str
    compacted: dict[str, str] = field(default_factory=dict)   # shard -> why

    def lines(self) -> list[str]:
        if not self.compacted:
            return [f"version      {self.version}  (CURRENT, unchanged: no shard is due for compaction)"]
        return [f"version      {self.version}  (CURRENT, compacted from {self.parent})",
                *(f"shard {s:<6} {why}" for s, why in self.compacted.items())]


def compact_root(index_root: str, s3_endpoint: str | None = None, share: float = 0.1, segments: int = 8,
                 everything: bool = False, merge_ram_budget: str = "2G", only: list[int] | None = None) -> Compacted:
    """CURRENT's shards that are due (by share and segments), or every segmented one (everything), or
    those of `only` that are segmented, compacted into a new version that becomes CURRENT."""
    store = Store(index_root, s3_endpoint)
    with hold(store, "shardex compact"), progress.tracking(store, "shardex compact"):
        live = load_manifest(store, current_version(store))
        bad = [s for s in only or [] if not 0 <= s < len(live.shards)]
        if bad:
            raise ConfigError(f"--shard: {live.version} has shards 0..{len(live.shards) - 1}, not {bad[0]}")
        asked = everything or only is not None
        due = {s: ("asked" if asked and sh.segmented and (only is None or s in only)
                   else None if asked else compact.due(sh, share, segments))
               for s, sh in enumerate(live.shards)}
        due = {s: why for s, why in due.items() if why}
        if not due:
            log(f"compact: {live.version}: no shard is due")
            return Compacted(live.version, live.version)
        ensure_ray()
        wd = claim_version(store, WorkDir.of(short_hash("compact", live.version, sorted(due))))
        v = wd.version
        if not store.exists(wd.trained):
            store.copy(live.path(live.trained.file), wd.trained)
        m = rebase(live, v)
        shards = compact_shards(store, wd, m, due, parse_bytes(merge_ram_budget))
        why = {str(s): w for s, w in due.items()}
        lin = Lineage(kind="compact", parent=live.version, unchanged=live.ntotal, retrained=False,
                      segments="compacted", compacted=why)
        publish(store, m.model_copy(update={"shards": shards, "lineage": lin,
                                            "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}))
        log(f"compact: {v}: {len(due)} shard(s) rewritten into new bases")
        return Compacted(v, live.version, why)


def as_dict(c: Compacted) -> dict:
    return asdict(c)

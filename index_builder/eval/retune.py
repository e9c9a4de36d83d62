"""`shardex eval --retune`: a version's search defaults chosen again from eval's measured sweep (on real
queries, when --queries gives them), published as a new CURRENT version that refers to every file of
the one evaluated: nothing is rebuilt, re-encoded or copied.

The new defaults are the sweep's fastest (nprobe, refine factor) reaching --target-recall, by the QPS
eval measured. Under --sharding ivf a ranked routing gap was tuned at the old nprobe only, so the new
version sends each query to every shard it probes (route_gap None); a rebuild tunes the gap again.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

from index_builder.build.publish import publish
from shards.errors import ConfigError
from shards.storage.lease import hold
from shards.storage.manifest import Lineage, Manifest, SearchDefaults, current_version, new_version_name, rebase
from shards.storage.store import Store


def defaults(m: Manifest, report: dict) -> SearchDefaults:
    """m's search defaults with the report's fastest pair reaching its target (k must be 10: tune's measure)."""
    if report["k"] != 10:
        raise ConfigError(f"retune: the search defaults are tuned on recall@10, this eval measured recall@"
                          f"{report['k']}; leave -k out")
    f = report["fastest_reaching_target"]
    if f is None:
        top = max(report["results"], key=lambda r: r["recall"])
        raise ConfigError(f"retune: no setting tried reaches --target-recall {report['target_recall']} on these "
                          f"queries (best: recall@10 {top['recall']:.4f} at nprobe {top['nprobe']}, refine x"
                          f"{top.get('refine') or 0}); lower it, sweep more (--nprobe, --refine) or rebuild "
                          f"with finer codes or --refine fp32")
    return m.search.model_copy(update={
        "nprobe": f["nprobe"], "refine_factor": f.get("refine") if m.index.refine else None,
        "recall_at_10": f["recall"], "eval_queries": report["queries"]["count"],
        "target_recall": report["target_recall"], "route_gap": None, "touched": None, "exact_touched": None,
        "tuned_on": "held-out" if report["queries"]["held_out"] else "queries"})


def retune(store: Store, m: Manifest, report: dict) -> Manifest:
    """Publish m (CURRENT) again as a new version with the report's defaults; CURRENT moves to it."""
    search = defaults(m, report)
    with hold(store, "shardex eval --retune"):
        live = current_version(store)
        if live != m.version:
            raise ConfigError(f"retune: {m.version} is not CURRENT ({live} is), and --retune publishes a new "
                              f"CURRENT; evaluate CURRENT (leave --version out), or roll back first")
        v = new_version_name(uuid.uuid4().hex)
        lin = Lineage(kind="retune", parent=m.version, unchanged=m.ntotal, retrained=False, segments="referenced")
        return publish(store, rebase(m, v).model_copy(update={
            "search": search, "lineage": lin,
            "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}))

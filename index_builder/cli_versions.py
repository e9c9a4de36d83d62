"""The `shardex` commands over an index root's versions: versions, status, rollback, prune, compact."""
from __future__ import annotations

import json


def cmd_prune(args) -> int:
    from shards.config import parse_duration
    from shards.errors import ConfigError
    from shards.storage.retention import as_dict, prune
    from shards.storage.store import Store

    try:
        grace = parse_duration(args.grace)
    except ValueError as e:
        raise ConfigError(f"--grace: {e}") from None
    p = prune(Store(args.index_root, args.s3_endpoint), args.keep, grace, dry_run=args.dry_run)
    print(json.dumps(as_dict(p), indent=2) if args.json else "\n".join(p.lines()))
    return 0


def cmd_versions(args) -> int:
    from shards.errors import IntegrityError
    from shards.storage.manifest import CURRENT, check_root, dangling_current, list_versions
    from shards.storage.store import Store

    store = Store(args.index_root, args.s3_endpoint)
    check_root(store)
    vs = list_versions(store)
    if args.json:
        print(json.dumps(vs, indent=2))
    for v in [] if args.json else vs:
        mark = "*" if v["current"] else " "
        enc = v["encoder"] + (f"@{v['encoder_revision']}" if v.get("encoder_revision") else "")
        print(f"{mark} {v['version']}  {v['created']}  {v['documents']:>10,} docs  {v['shards']} shard(s)  "
              f"{v['factory']}  {enc} d={v['dim']}  {_lineage(v.get('lineage'))}")
    if (live := dangling_current(store, vs)) is not None:  # listed first: the versions to roll back to
        raise IntegrityError(f"{store.uri(CURRENT)}: names version {live!r}, which has no manifest; "
                             "`shardex rollback INDEX_ROOT VERSION` to one listed")
    return 0


def cmd_status(args) -> int:
    from index_builder.progress import status, status_lines
    from shards.storage.manifest import check_root
    from shards.storage.store import Store

    store = Store(args.index_root, args.s3_endpoint)
    check_root(store)
    st = status(store)
    print(json.dumps(st, indent=2) if args.json else "\n".join(status_lines(st)))
    return 0


def _lineage(lin: dict | None) -> str:
    if not lin or lin["kind"] == "build":
        return "build"
    if lin["kind"] == "compact":
        return f"compaction of {lin['parent']}: shard(s) {', '.join(sorted(lin.get('compacted') or {}))} rewritten"
    q = "retrained" if lin["retrained"] else "quantizer reused"
    return (f"reindex of {lin['parent']}: +{lin['new']:,} new ~{lin['changed']:,} changed "
            f"-{lin['deleted']:,} deleted, {q}")


def cmd_rollback(args) -> int:
    from shards.storage.lease import hold
    from shards.storage.manifest import load_manifest, set_current, verify
    from shards.storage.store import Store

    store = Store(args.index_root, args.s3_endpoint)
    with hold(store, "shardex rollback", make_root=False):  # not while a build or prune writes the root
        verify(store, load_manifest(store, args.version))  # a damaged version is refused before CURRENT moves
        set_current(store, args.version)
    print(f"CURRENT -> {args.version}")
    return 0


def cmd_compact(args) -> int:
    from index_builder.reindex.compaction import as_dict, compact_root

    c = compact_root(args.index_root, args.s3_endpoint, args.compact_share, args.compact_segments, args.all,
                     args.merge_ram_budget, args.shard)
    print(json.dumps(as_dict(c), indent=2) if args.json else "\n".join(c.lines()))
    return 0


def add_version_commands(sub) -> None:
    """The subcommands above, on the `shardex` parser's subparsers."""
    from index_builder.config import ReindexConfig
    from shards.config import option_help

    pr = sub.add_parser("prune", help="delete old versions and stale scratch (never CURRENT or the one before it)")
    pr.add_argument("index_root")
    pr.add_argument("--keep", type=int, required=True, help="keep the N newest versions")
    pr.add_argument("--grace", default="1h", help=option_help(ReindexConfig, "grace"))
    pr.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--s3-endpoint", default=None)
    pr.set_defaults(fn=cmd_prune)

    v = sub.add_parser("versions", help="list the versions and which one is CURRENT")
    v.add_argument("index_root")
    v.add_argument("--json", action="store_true")
    v.add_argument("--s3-endpoint", default=None)
    v.set_defaults(fn=cmd_versions)

    st = sub.add_parser("status", help="a running, stopped or finished build's progress: stage, units done "
                        "of total, rate and ETA, from the index root's records")
    st.add_argument("index_root")
    st.add_argument("--json", action="store_true")
    st.add_argument("--s3-endpoint", default=None)
    st.set_defaults(fn=cmd_status)

    r = sub.add_parser("rollback", help="make an earlier version CURRENT")
    r.add_argument("index_root")
    r.add_argument("version")
    r.add_argument("--s3-endpoint", default=None)
    r.set_defaults(fn=cmd_rollback)

    c = sub.add_parser("compact", help="rewrite CURRENT's segmented shards (a reindex's delta segments and "
                       "deleted entries) into new bases, as a new version")
    c.add_argument("index_root")
    c.add_argument("--compact-share", type=float, default=0.1,
                   help=option_help(ReindexConfig, "compact_share"))
    c.add_argument("--compact-segments", type=int, default=8,
                   help=option_help(ReindexConfig, "compact_segments"))
    c.add_argument("--all", action="store_true", help="compact every shard that has delta segments or a dead set")
    c.add_argument("--shard", type=int, action="append", help="compact this shard (repeat for more), due or not")
    c.add_argument("--merge-ram-budget", default="2G", help="a shard bigger than this is merged on disk")
    c.add_argument("--address", default=None, help="Ray cluster to join: host:port, ray://host:port or auto "
                   "(default: $RAY_ADDRESS; else a local cluster of this command's own)")
    c.add_argument("--json", action="store_true")
    c.add_argument("--s3-endpoint", default=None)
    c.set_defaults(fn=cmd_compact)

"""The `shardex` command. Build options come from BuildConfig, so flags and YAML keys never drift apart."""
from __future__ import annotations

import argparse
import json
import os
import sys
import typing

from shards.errors import ShardexError, is_storage_failure, storage_message

HELP = {
    "id_column": "int64 ids, or strings (mapped to stable int64 ids, kept in docs/)",
    "text_column": "encode this column",
    "vector_column": "take precomputed vectors from this column (no encoding)",
    "dim": "expected vector dimension for --vector-column (default: the column's first vector)",
    "fields": "comma-separated stored fields returned with results (default: the text column)",
    "model": "sentence-transformers model name or path (default: bundled all-MiniLM-L6-v2, offline)",
    "query_prefix": "prefix for queries, for instruction models (e.g. 'query: '; default: the model's own query prompt)",
    "document_prefix": "prefix for documents (e.g. 'passage: '; default: the model's own document prompt)",
    "factory": "faiss index_factory string, or auto to choose from N, d and --memory-budget",
    "memory_budget": "budget for the served index, used by --factory auto (e.g. 512M, 4G)",
    "shards": "number of serving shards",
    "sharding": "hash: ids spread evenly, every query goes to every shard; ivf: each shard owns a "
                "contiguous range of IVF lists (balanced by vectors), a query needs only the shards it probes",
    "actors": "encoder actors (default: one per GPU, or sized to the CPUs)",
    "gpus_per_actor": "GPUs per encoder actor (default: 1 when the cluster has GPUs, else 0)",
    "batch_size": "encoder batch size",
    "bad_rows": "error: stop at the first bad row; skip: quarantine it with a reason and go on",
    "metric": "ip or l2 (default: ip for normalised encoders, l2 otherwise)",
    "s3_endpoint": "S3 endpoint URL (also read from AWS_ENDPOINT_URL)",
    "part_rows": "documents per input shard: the unit of encode and add work",
    "target_recall": "the default nprobe is the smallest that reaches this recall@10",
    "seed": "seed for sampling",
    "max_seq_length": "tokens per text, longer ones are truncated (default: the model's limit)",
    "dtype": "encoder precision; fp16/bf16 need a GPU",
    "retrain": "train a new quantizer even when the drift check passes",
    "drift_error": "retrain when the new vectors' mean quantization error passes this multiple of the baseline",
    "drift_imbalance": "retrain when the IVF lists' imbalance after the reindex passes this multiple of the baseline",
    "keep": "after publishing, delete all but the N newest versions (never CURRENT or the one before it) "
            "and stale scratch",
    "grace": "scratch and unfinished versions modified within this long are left alone (a job may own them)",
    "merge_ram_budget": "a serving shard bigger than this is merged into on-disk inverted lists (mmapped when "
                        "served); auto: half the memory of the smallest Ray node",
}


def _add_build_options(p: argparse.ArgumentParser, model: str = "BuildConfig") -> None:
    from index_builder import config

    p.set_defaults(config_model=model)
    inherits = model == "ReindexConfig"  # reindex: build options left out are the live version's
    for name, f in getattr(config, model).model_fields.items():
        if name in ("source", "index_root"):
            continue
        flag = "--" + name.replace("_", "-")
        if f.annotation is bool:
            p.add_argument(flag, dest=name, action="store_true", default=None, help=HELP.get(name, ""))
            continue
        args = typing.get_args(f.annotation)
        typ = next((a for a in (int, float) if a is f.annotation or a in args), str)
        choices = next((typing.get_args(a) for a in (f.annotation, *args) if typing.get_origin(a) is typing.Literal),
                       None)
        dflt = f"the live version's, else {f.default}" if inherits and name in config.BuildConfig.model_fields \
            else f.default
        p.add_argument(flag, dest=name, type=typ, choices=choices, default=None,
                       help=f"{HELP.get(name, '')} (default: {dflt})")


def config_model(name: str):
    """A command's config model by name (the parser's config_model default): what its YAML is parsed into."""
    if name == "ServeConfig":
        from shards.config import ServeConfig

        return ServeConfig
    if name == "EvalConfig":
        from index_builder.eval.evaluate import EvalConfig

        return EvalConfig
    from index_builder import config

    return getattr(config, name)


def _config_from(args) -> "object":
    """The typed config of a command: its --config YAML, overridden by the flags given."""
    from index_builder.config import make

    model = config_model(getattr(args, "config_model", "BuildConfig"))
    opts = {k: v for k, v in vars(args).items() if k in model.model_fields and v is not None}
    if args.config:
        return model.from_yaml(args.config, **opts)
    return make(model, opts, where=f"shardex {args.cmd}")


def cmd_build(args) -> int:
    from index_builder.pipeline import as_dict, build

    s = build(_config_from(args))
    print(json.dumps(as_dict(s), indent=2) if args.json else "\n".join(s.lines()))
    return 0


def cmd_encode(args) -> int:
    from index_builder.encode.encode_only import as_dict, encode

    args.index_root = args.embeddings_uri
    s = encode(_config_from(args))
    print(json.dumps(as_dict(s), indent=2) if args.json else "\n".join(s.lines()))
    return 0


def cmd_reindex(args) -> int:
    from index_builder.reindex.incremental import as_dict, reindex

    s = reindex(_config_from(args))
    print(json.dumps(as_dict(s), indent=2, default=str) if args.json else "\n".join(s.lines()))
    return 0


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


def cmd_search(args) -> int:
    import numpy as np

    from shards.search.router import Router

    if not args.query and not args.vectors:
        raise ShardexError("search: give one or more QUERY strings, or --vectors FILE.npy")
    r = Router(args.index_root, s3_endpoint=args.s3_endpoint, backend="local" if args.local else "ray")
    q = np.load(args.vectors) if args.vectors else args.query
    hits = r.search(q, k=args.k, nprobe=args.nprobe)
    if args.json:
        print(json.dumps({"version": r.version, "results": [[h.as_dict() for h in hs] for hs in hits]}))
        return 0
    for text, hs in zip(args.query or [f"vector {i}" for i in range(len(q))], hits):
        print(f"\n{text}")
        for h in hs:
            print(f"  {h.score:8.4f}  {h.id}  {_snippet(h.fields)}")
    return 0


def _snippet(fields: dict, width: int = 90) -> str:
    text = " ".join(str(v) for v in fields.values() if v is not None)
    return text if len(text) <= width else text[: width - 3] + "..."


def cmd_versions(args) -> int:
    from shards.storage.manifest import list_versions
    from shards.storage.store import Store

    vs = list_versions(Store(args.index_root, args.s3_endpoint))
    if args.json:
        print(json.dumps(vs, indent=2))
        return 0
    for v in vs:
        mark = "*" if v["current"] else " "
        enc = v["encoder"] + (f"@{v['encoder_revision']}" if v.get("encoder_revision") else "")
        print(f"{mark} {v['version']}  {v['created']}  {v['documents']:>10,} docs  {v['shards']} shard(s)  "
              f"{v['factory']}  {enc} d={v['dim']}  {_lineage(v.get('lineage'))}")
    return 0


def _lineage(lin: dict | None) -> str:
    if not lin or lin["kind"] == "build":
        return "build"
    q = "retrained" if lin["retrained"] else "quantizer reused"
    return (f"reindex of {lin['parent']}: +{lin['new']:,} new ~{lin['changed']:,} changed "
            f"-{lin['deleted']:,} deleted, {q}")


def cmd_rollback(args) -> int:
    from shards.storage.manifest import set_current
    from shards.storage.store import Store

    set_current(Store(args.index_root, args.s3_endpoint), args.version)
    print(f"CURRENT -> {args.version}")
    return 0


SERVE_HELP = {
    "host": "address to bind; 127.0.0.1 keeps it on this machine",
    "port": "HTTP port",
    "replicas": "replicas of each shard deployment",
    "token": "bearer token clients must send (also read from $SHARDEX_TOKEN); none: open",
    "require_all_shards": "answer 503 when a shard is missing, instead of a partial answer that says so",
    "shard_timeout": "seconds a shard may take before it counts as missing",
    "poll_seconds": "how often CURRENT is read to swap versions; 0: only POST /admin/reload",
    "s3_endpoint": "S3 endpoint URL (also read from AWS_ENDPOINT_URL)",
    "filter_fields": "comma-separated stored fields held per shard for filters (default: the numeric and "
                     "boolean ones)",
    "max_queries": "queries in one request (larger: 413); also the largest server-side batch",
    "batch_wait_ms": "how long a server batch (search fan-out, text encoder) waits for concurrent requests to join it",
    "encoder_replicas": "replicas of the text encoder deployment",
    "shard_cpus": "Ray CPUs reserved per shard replica (default: room for two versions side by side)",
    "threads": "faiss threads per shard replica (default: the cluster's CPUs over the replicas)",
    "name": "Serve application name (version apps are NAME--VERSION)",
    "route_prefix": "where the HTTP API is mounted",
    "load_timeout": "seconds a version may take to come up",
    "detach": "return once serving, leaving the app on the cluster (for `ray job submit` / RAY_ADDRESS)",
}


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    from shards.config import ServeConfig

    p.set_defaults(config_model="ServeConfig")
    for name, f in ServeConfig.model_fields.items():
        if name == "index_root":
            continue
        flag = "--" + name.replace("_", "-")
        if f.annotation is bool:
            p.add_argument(flag, dest=name, action="store_true", default=None, help=SERVE_HELP.get(name))
            continue
        args = typing.get_args(f.annotation)
        typ = next((a for a in (int, float) if a is f.annotation or a in args), str)
        default = "" if f.default is None else f" (default: {f.default})"
        p.add_argument(flag, dest=name, type=typ, default=None, help=f"{SERVE_HELP.get(name, '')}{default}")


def cmd_serve(args) -> int:
    import signal
    import time

    from shards.storage.manifest import current_version, load_manifest
    from shards.storage.store import Store

    from shards.raytools import ensure_ray, log

    cfg = _config_from(args)
    store = Store(cfg.index_root, cfg.s3_endpoint)
    load_manifest(store, current_version(store))  # a missing or unreadable index fails here, before Ray starts
    ensure_ray()
    from ray import serve

    from shards.serve import deployments as sv

    # Serve holds the port from here on; SIGTERM (ray job stop, kill) cleans up like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        handle = sv.start(cfg)
        version = sv.wait_ready(handle, cfg.load_timeout)
        url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
        print(f"serving {version} of {cfg.index_root} at {url}  (POST /search, GET /health, GET /version, "
              f"GET /docs)", flush=True)
        if cfg.detach:
            return 0
        log("Ctrl-C stops it")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("stopping")
        sv.stop(cfg)
        if not serve.status().applications:
            serve.shutdown()
        return 0
    except BaseException:
        sv.stop(cfg)
        raise


EVAL_HELP = {
    "version": "the version to evaluate (default: CURRENT)",
    "queries": "query file: .npy vectors, .parquet with a 'vector' or 'text' column, or text, one query a line "
               "(default: stored vectors, each left out of its own search)",
    "k": "recall@k and the k searched",
    "nprobe": "comma-separated nprobe values (default: 1, 2, 4, ... nlist)",
    "num_queries": "how many stored vectors to sample as queries (without --queries)",
    "latency_queries": "how many queries to time one at a time for latency",
    "target_recall": "report the smallest nprobe reaching this recall@k",
    "out": "directory (or s3:// prefix) for eval.json and eval.png (default: ./shardex-eval-<version>)",
    "threads": "faiss threads (default: all cores)",
    "seed": "seed for sampling queries",
    "s3_endpoint": "S3 endpoint URL (also read from AWS_ENDPOINT_URL)",
}


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    from index_builder.eval.evaluate import EvalConfig

    p.set_defaults(config_model="EvalConfig")
    for name, f in EvalConfig.model_fields.items():
        if name == "index_root":
            continue
        typ = int if name in ("k", "num_queries", "latency_queries", "threads", "seed") else (
            float if name == "target_recall" else str)
        flag = ["-k"] if name == "k" else ["--" + name.replace("_", "-")]
        h = EVAL_HELP.get(name, "")
        p.add_argument(*flag, dest=name, type=typ, default=None,
                       help=h if "default" in h else f"{h} (default: {f.default})")


def cmd_eval(args) -> int:
    from index_builder.eval.evaluate import evaluate, lines, write_report

    cfg = _config_from(args)
    report = evaluate(cfg)
    js, png = write_report(report, cfg.out, cfg.s3_endpoint)
    if args.json:
        print(json.dumps({**report, "files": [js, png]}, indent=2))
        return 0
    print("\n".join(lines(report)))
    print(f"wrote        {js}\n             {png}")
    return 0


def cmd_demo(args) -> int:
    from index_builder.demo.run import run_demo

    return run_demo(args.out, args.limit, args.shards)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardex", description="Distributed batch indexing on Ray: "
                                "Parquet corpus -> sharded IVF-PQ index -> exact top-k router.")
    p.add_argument("--debug", action="store_true", help="print the full traceback on errors")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build and publish a new index version from a Parquet corpus")
    b.add_argument("source", nargs="?", help="Parquet file, directory or glob (local or s3://)")
    b.add_argument("index_root", nargs="?", help="index root (local path or s3://)")
    b.add_argument("--config", help="YAML file with the same keys (CLI options override it)")
    b.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_build_options(b)
    b.set_defaults(fn=cmd_build)

    e = sub.add_parser("encode", help="only the encode stage: Parquet parts (id, vector, fields) that "
                       "`build --vector-column vector` takes")
    e.add_argument("source", help="Parquet file, directory or glob (local or s3://)")
    e.add_argument("embeddings_uri", help="output directory (local path or s3://); a re-run resumes it")
    e.add_argument("--config", help="YAML file with build's keys (CLI options override it)")
    e.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_build_options(e)
    e.set_defaults(fn=cmd_encode)

    ri = sub.add_parser("reindex", help="incremental: encode only new or changed documents, publish a new version")
    ri.add_argument("source", nargs="?", help="Parquet file, directory or glob (local or s3://): the whole corpus now")
    ri.add_argument("index_root", nargs="?", help="index root with a live version (local path or s3://)")
    ri.add_argument("--config", help="YAML file with the same keys (CLI options override it)")
    ri.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_build_options(ri, "ReindexConfig")
    ri.set_defaults(fn=cmd_reindex)

    pr = sub.add_parser("prune", help="delete old versions and stale scratch (never CURRENT or the one before it)")
    pr.add_argument("index_root")
    pr.add_argument("--keep", type=int, required=True, help="keep the N newest versions")
    pr.add_argument("--grace", default="1h", help=HELP["grace"] + " (default: 1h)")
    pr.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--s3-endpoint", default=None)
    pr.set_defaults(fn=cmd_prune)

    s = sub.add_parser("search", help="search the CURRENT version")
    s.add_argument("index_root")
    s.add_argument("query", nargs="*", help="text queries, encoded with the index's own encoder")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--nprobe", type=int, default=None, help="default: the one stored at publish")
    s.add_argument("--vectors", help="a .npy file of query vectors [nq, d]")
    s.add_argument("--json", action="store_true")
    s.add_argument("--local", action="store_true", help="search in this process, without Ray actors")
    s.add_argument("--s3-endpoint", default=None)
    s.set_defaults(fn=cmd_search)

    ev = sub.add_parser("eval", help="recall@k against exact search, QPS and latency per nprobe; JSON and a plot")
    ev.add_argument("index_root", nargs="?", help="index root (local path or s3://)")
    ev.add_argument("--config", help="YAML file with the same keys (CLI options override it)")
    ev.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_eval_options(ev)
    ev.set_defaults(fn=cmd_eval)

    v = sub.add_parser("versions", help="list the versions and which one is CURRENT")
    v.add_argument("index_root")
    v.add_argument("--json", action="store_true")
    v.add_argument("--s3-endpoint", default=None)
    v.set_defaults(fn=cmd_versions)

    r = sub.add_parser("rollback", help="make an earlier version CURRENT")
    r.add_argument("index_root")
    r.add_argument("version")
    r.add_argument("--s3-endpoint", default=None)
    r.set_defaults(fn=cmd_rollback)

    sv = sub.add_parser("serve", help="serve the CURRENT version over HTTP: a Ray Serve app with a router and "
                        "one deployment per shard; follows CURRENT as it moves")
    sv.add_argument("index_root", nargs="?", help="index root (local path or s3://)")
    sv.add_argument("--config", help="YAML file with the same keys (CLI options override it)")
    _add_serve_options(sv)
    sv.set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo", help="build and query a 2-shard index of the Python standard library's docstrings")
    d.add_argument("--out", default="data/demo", help="where the corpus and index go")
    d.add_argument("--limit", type=int, default=5000, help="documents")
    d.add_argument("--shards", type=int, default=2)
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cmd in ("build", "reindex") and not args.config and not (args.source and args.index_root):
        parser().error(f"{args.cmd}: give SOURCE and INDEX_ROOT, or --config FILE.yaml")
    if args.cmd in ("eval", "serve") and not args.config and not args.index_root:
        parser().error(f"{args.cmd}: give INDEX_ROOT, or --config FILE.yaml")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return args.fn(args)
    except (ShardexError, FileNotFoundError, PermissionError) as e:
        if args.debug:
            raise
        print(f"shardex: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shardex: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug or not is_storage_failure(e):
            raise
        # Raised by a worker or the driver while reading or writing the corpus or the index root.
        print(f"shardex: error: storage: {storage_message(e)}; check the endpoint, credentials and paths "
              f"(--debug shows where)", file=sys.stderr)
        return 1
    finally:
        stop_ray()


def stop_ray() -> None:
    """Stop the local Ray this command started (or leave the cluster it joined) now, rather than in
    Ray's exit hook, which first sleeps half a second for worker logs that have already arrived."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())

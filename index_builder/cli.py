"""The `shardex` command. Options come from the config models (their fields, types, defaults and
descriptions), so flags, help and YAML keys never drift apart."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys

from index_builder.cli_versions import add_version_commands
from shards.errors import ShardexError, is_local, is_storage_failure, storage_fix, storage_message


def _add_options(p: argparse.ArgumentParser, model: str, inherits: bool = False) -> None:
    """A command's options from its config model, the one its YAML is parsed into (help: the fields'
    descriptions). inherits: build options left out are the live version's (reindex)."""
    from index_builder.config import BuildConfig
    from shards.config import add_options

    p.set_defaults(config_model=model)
    add_options(p, config_model(model), skip=("source", "index_root"),
                inherited=BuildConfig.model_fields if inherits else ())


def _about(model: str, name: str) -> str:
    """The help of a field given as a positional argument: its description."""
    return config_model(model).model_fields[name].description


ADDRESS_HELP = ("Ray cluster to join: host:port, ray://host:port or auto (default: $RAY_ADDRESS, which a Ray "
                "job sets; else a local cluster of this command's own)")


def _address_option(p: argparse.ArgumentParser) -> None:
    """--address, on the commands that use Ray: joining a cluster is asked for, never found."""
    p.add_argument("--address", default=None, help=ADDRESS_HELP)


def config_model(name: str):
    """A command's config model by name (the parser's config_model default): what its YAML is parsed into."""
    if name == "ServeConfig":
        from shards.config import ServeConfig

        return ServeConfig
    from index_builder import config

    return getattr(config, name)


def _config_from(args) -> object:
    """The typed config of a command: its --config YAML, overridden by the flags given."""
    from index_builder.config import make

    model = config_model(getattr(args, "config_model", "BuildConfig"))
    opts = {k: v for k, v in vars(args).items() if k in model.model_fields and v is not None}
    if args.config:
        return model.from_yaml(args.config, **opts)
    return make(model, opts, where=f"shardex {args.cmd}")


def cmd_build(args) -> int:
    from index_builder.pipeline import build
    from index_builder.summary import as_dict

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


def cmd_search(args) -> int:
    from index_builder.plan.corpus import load_npy
    from shards.search.router import Router

    if not args.query and not args.vectors:
        raise ShardexError("search: give one or more QUERY strings, or --vectors FILE.npy")
    q = load_npy(args.vectors, "--vectors") if args.vectors else args.query  # a bad file fails before Ray starts
    r = Router(args.index_root, s3_endpoint=args.s3_endpoint, backend="local" if args.local else "ray")
    if args.vectors:
        q = r.view.vectors(q, where=f"--vectors {args.vectors}")  # its dimension is the index's
    hits = r.search(q, k=args.k, nprobe=args.nprobe)
    version = r.version
    del r
    # The docs store's Arrow scanner threads are freed now, while Arrow is alive: left to the
    # interpreter's final teardown they can abort the process (apache/arrow#34314) after the answer.
    gc.collect()
    if args.json:
        print(json.dumps({"version": version, "results": [[h.as_dict() for h in hs] for hs in hits]}))
        return 0
    for text, hs in zip(args.query or [f"vector {i}" for i in range(len(q))], hits):
        print(f"\n{text}")
        for h in hs:
            print(f"  {h.score:8.4f}  {h.id}  {_snippet(h.fields)}")
    return 0


def _snippet(fields: dict, width: int = 90) -> str:
    text = " ".join(str(v) for v in fields.values() if v is not None)
    return text if len(text) <= width else text[: width - 3] + "..."


def cmd_serve(args) -> int:
    import signal
    import time

    from shards.raytools import ensure_ray, log
    from shards.storage.manifest import current_version, load_manifest
    from shards.storage.store import Store

    cfg = _config_from(args)
    store = Store(cfg.index_root, cfg.s3_endpoint)
    load_manifest(store, current_version(store))  # a missing or unreadable index fails here, before Ray starts
    ensure_ray()
    from ray import serve

    from shards.serve import lifecycle as sv

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


def cmd_plan(args) -> int:
    from index_builder.plan.capacity import from_options

    c = from_options(args)
    print(json.dumps(c.as_dict(), indent=2) if args.json else "\n".join(c.lines()))
    return 0


def parser() -> argparse.ArgumentParser:

    p = argparse.ArgumentParser(prog="shardex", description="Distributed batch indexing on Ray: "
                                "Parquet corpus -> sharded IVF-PQ index -> exact top-k router.")
    p.add_argument("--debug", action="store_true", help="print the full traceback on errors")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build and publish a new index version from a Parquet corpus")
    b.add_argument("source", nargs="?", help=_about("BuildConfig", "source"))
    b.add_argument("index_root", nargs="?", help=_about("BuildConfig", "index_root"))
    b.add_argument("--config", help="YAML file with the same keys (CLI options override it)")
    b.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_options(b, "BuildConfig")
    _address_option(b)
    b.set_defaults(fn=cmd_build)

    e = sub.add_parser("encode", help="only the encode stage: Parquet parts (id, vector, fields) that "
                       "`build --vector-column vector` takes")
    e.add_argument("source", help=_about("BuildConfig", "source"))
    e.add_argument("embeddings_uri", help="output directory (local path or s3://); a re-run resumes it")
    e.add_argument("--config", help="YAML file with build's keys (CLI options override it)")
    e.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_options(e, "BuildConfig")
    _address_option(e)
    e.set_defaults(fn=cmd_encode)

    ri = sub.add_parser("reindex", help="incremental: encode only new or changed documents, publish a new version")
    ri.add_argument("source", nargs="?", help=_about("ReindexConfig", "source"))
    ri.add_argument("index_root", nargs="?", help=_about("ReindexConfig", "index_root"))
    ri.add_argument("--config", help="YAML file with the same keys (CLI options override it)")
    ri.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_options(ri, "ReindexConfig", inherits=True)
    _address_option(ri)
    ri.set_defaults(fn=cmd_reindex)

    add_version_commands(sub)

    s = sub.add_parser("search", help="search the CURRENT version")
    s.add_argument("index_root")
    s.add_argument("query", nargs="*", help="text queries, encoded with the index's own encoder")
    s.add_argument("-k", type=int, default=10, help="results per query (default: 10)")
    s.add_argument("--nprobe", type=int, default=None, help="default: the one stored at publish")
    s.add_argument("--vectors", help="a .npy file of query vectors [nq, d]")
    s.add_argument("--json", action="store_true", help="print {\"version\", \"results\": [[{\"id\", \"score\", "
                   "\"fields\"}]]} as one JSON line")
    s.add_argument("--local", action="store_true", help="load the shards and search them in this process, without "
                   "Ray (no cluster started or joined; quickest for a few queries on a small index)")
    s.add_argument("--s3-endpoint", default=None)
    _address_option(s)
    s.set_defaults(fn=cmd_search)

    ev = sub.add_parser("eval", help="recall@k against exact search, QPS and latency per nprobe; JSON and a plot")
    ev.add_argument("index_root", nargs="?", help=_about("EvalConfig", "index_root"))
    ev.add_argument("--config", help="YAML file with the same keys (CLI options override it)")
    ev.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_options(ev, "EvalConfig")
    ev.set_defaults(fn=cmd_eval)

    sv = sub.add_parser("serve", help="serve the CURRENT version over HTTP: a Ray Serve app with a router and "
                        "one deployment per shard; follows CURRENT as it moves")
    sv.add_argument("index_root", nargs="?", help=_about("ServeConfig", "index_root"))
    sv.add_argument("--config", help="YAML file with the same keys (CLI options override it)")
    _add_options(sv, "ServeConfig")
    _address_option(sv)
    sv.set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo", help="build and query a 2-shard index of the Python standard library's docstrings")
    d.add_argument("--out", default="data/demo", help="where the corpus and index go")
    d.add_argument("--limit", type=int, default=5000, help="documents")
    d.add_argument("--shards", type=int, default=2)
    _address_option(d)
    d.set_defaults(fn=cmd_demo)

    pl = sub.add_parser("plan", help="capacity plan from measured costs: factory, shards, RAM/disk per shard, "
                        "bytes and time per stage (no Ray, nothing read)")
    pl.add_argument("n", metavar="N", help="documents, e.g. 1000000000 or 1e9")
    pl.add_argument("--dim", type=int, help="vector dimension (default: the model's)")
    pl.add_argument("--model", help="encoder whose measured docs/s the plan uses (default: all-MiniLM-L6-v2)")
    pl.add_argument("--vectors", action="store_true", help="a vector source (--vector-column): copied, not encoded")
    pl.add_argument("--encode-rate", type=float, help="docs/s per GPU (per core without GPUs), for a model the "
                    "cost table has not measured")
    pl.add_argument("--memory-budget", help="RAM for the whole served index, all shards together, as build's "
                    "--memory-budget (default: half the cluster's memory, nodes x node-memory / 2)")
    pl.add_argument("--nodes", type=int, default=1, help="nodes in the cluster (default: 1)")
    pl.add_argument("--cpus-per-node", type=int, default=16, help="CPU cores a node (default: 16)")
    pl.add_argument("--gpus-per-node", type=int, default=0, help="GPUs a node (default: 0)")
    pl.add_argument("--node-memory", default="64G", help="memory of a node (default: 64G); a shard gets half")
    pl.add_argument("--factory", help="faiss index_factory string (default: what --factory auto picks)")
    pl.add_argument("--shards", type=int, help="serving shards (default: the fewest that fit half a node each)")
    pl.add_argument("--json", action="store_true", help="print the plan, with the cost table, as JSON")
    pl.set_defaults(fn=cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as a killed-by-SIGPIPE tool does
        # The recipe of Python's signal docs: point stdout at devnull, so the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    if args.cmd in ("build", "reindex") and not args.config and not (args.source and args.index_root):
        parser().error(f"{args.cmd}: give SOURCE and INDEX_ROOT, or --config FILE.yaml")
    if args.cmd in ("eval", "serve") and not args.config and not args.index_root:
        parser().error(f"{args.cmd}: give INDEX_ROOT, or --config FILE.yaml")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if getattr(args, "address", None):
        os.environ["RAY_ADDRESS"] = args.address   # what ensure_ray joins, wherever the command calls it
    ours = not ray_running()  # a Ray already up (a notebook's, a test session's) is the caller's to stop
    try:
        return args.fn(args)
    except BrokenPipeError:
        raise
    except (ShardexError, FileNotFoundError, PermissionError) as e:
        if args.debug:
            raise
        print(f"shardex: error: {e}" + (f"; {storage_fix(e)}" if is_local(e) else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shardex: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug or not is_storage_failure(e):
            raise
        # Raised by a worker or the driver while reading or writing the corpus or the index root.
        print(f"shardex: error: storage: {storage_message(e)}; {storage_fix(e)} (--debug shows where)",
              file=sys.stderr)
        return 1
    finally:
        if ours:
            stop_ray()


def ray_running() -> bool:
    ray = sys.modules.get("ray")  # never imported: not running, and no need to import it to know
    return ray is not None and ray.is_initialized()


def stop_ray() -> None:
    """Stop the local Ray this command started (or leave the cluster it joined) now, rather than in
    Ray's exit hook, which first sleeps half a second for worker logs that have already arrived."""
    if ray_running():
        sys.modules["ray"].shutdown()


if __name__ == "__main__":
    sys.exit(main())

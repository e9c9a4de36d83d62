"""`shardex serve` as a Serve import path: for Serve config files and KubeRay's RayService.

    applications:
      - name: shardex                      # = args.name: the version apps are shardex--<version>
        import_path: shards.serve_app:app
        route_prefix: /
        args: {index_root: s3://bucket/indexes/wiki, name: shardex, poll_seconds: 30}

`args` takes `shardex serve`'s option names with underscores (as jobs.serve's YAML does).
The app is the same router as `shardex serve` starts (shards/serve/lifecycle.py): it loads CURRENT
itself, deploys each version beside the one it serves and swaps, so the config names only
the router. A declarative re-apply of the config (KubeRay does one after a restart of its
operator) leaves the version apps alone: Serve deletes only the declarative apps missing
from the config, and the router deploys its versions imperatively.
"""
from __future__ import annotations

from shards.config import ServeConfig, make
from shards.errors import ConfigError

# Set by the config file itself, not by args: the HTTP proxy's address, the app's route and lifetime.
NOT_ARGS = {"host": "http_options.host", "port": "http_options.port", "route_prefix": "the app's route_prefix",
            "detach": "nothing (a config-file app stays until the config drops it)",
            "proxy_location": "the file's proxy_location"}
WHERE = "serve config args"


def config(args: dict) -> ServeConfig:
    """The ServeConfig of a config file's args, refusing the keys the file sets elsewhere."""
    for k, where in NOT_ARGS.items():
        if k in args:
            raise ConfigError(f"{WHERE}: {k}: set by {where} in a Serve config file; remove it from args")
    if "token" in args:  # Serve logs the args it builds an app with
        raise ConfigError(f"{WHERE}: token: would be logged; give it as $SHARDEX_TOKEN in the pods' environment")
    return make(ServeConfig, dict(args), where=WHERE)


def app(args: dict):
    """The application builder Serve calls with the config's args."""
    from shards.serve.lifecycle import router_app

    return router_app(config(args))

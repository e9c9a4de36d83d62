"""`shards.serve_app:app`, the Serve import path RayService configs name: the app lives in shards.serve.app."""
from shards.serve.app import app, config

__all__ = ["app", "config"]

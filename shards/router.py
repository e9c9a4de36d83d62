"""The Python API's entry point, kept where the README has it: the router lives in shards.search.router."""
from shards.search.router import Hit, Router

__all__ = ["Hit", "Router"]

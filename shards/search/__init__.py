"""Searching a version: one shard's searcher, filters, which shards a query needs, the router's merge."""

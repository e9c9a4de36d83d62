"""shardex's index on storage and its serving: store + manifest, shard searcher, router."""

"""The encode stage: input shards to embeddings parts (id, vector, hash, stored fields)."""

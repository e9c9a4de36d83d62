"""The index on storage: the store (any fsspec URI), manifests and versions, faiss I/O, stored fields."""

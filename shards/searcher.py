"""One serving shard: load it (checked against the manifest) and answer top-k searches."""
from __future__ import annotations

import os
import tempfile

import numpy as np

from .faissio import faiss, load_shard, set_nprobe
from .manifest import FileInfo
from .store import Store


class ShardSearcher:
    def __init__(self, store: Store, version: str, shard: FileInfo, threads: int | None = None):
        if threads:
            faiss().omp_set_num_threads(threads)
        self.index = load_shard(store, version, shard)  # checks ntotal; mmaps a shard merged on disk
        self.name = shard.file

    def search(self, xq: np.ndarray, k: int, nprobe: int | None = None):
        set_nprobe(self.index, nprobe)
        return self.index.search(np.ascontiguousarray(xq, dtype=np.float32), k)

    def ntotal(self) -> int:
        return int(self.index.ntotal)


def scratch_dir() -> str:
    d = os.path.join(tempfile.gettempdir(), "shardex-cache")
    os.makedirs(d, exist_ok=True)
    return d

"""One serving shard: load it (checked against the manifest) and answer top-k searches."""
from __future__ import annotations

import os
import tempfile

import numpy as np

from .errors import IntegrityError
from .faissio import faiss, read_index, set_nprobe
from .manifest import FileInfo, vdir
from .store import Store


class ShardSearcher:
    def __init__(self, store: Store, version: str, shard: FileInfo, threads: int | None = None):
        rel = f"{vdir(version)}/{shard.file}"
        if threads:
            faiss().omp_set_num_threads(threads)
        if store.local:
            self.index = faiss().read_index(store.path(rel))
        else:
            self.index = read_index(store, rel)
        if self.index.ntotal != shard.ntotal:
            raise IntegrityError(f"{store.uri(rel)}: holds {self.index.ntotal} vectors, "
                                 f"the manifest says {shard.ntotal}")
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

"""The router: encode text queries, send them to every shard, merge the top-k exactly, attach fields.

Shard searchers are Ray actors (one per shard) or, for a quick local search,
in-process objects; the merge is the same either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .docstore import DocStore
from .errors import SearchError
from .manifest import Manifest, current_version, load_manifest
from .searcher import ShardSearcher
from .store import Store
from .topk import merge_topk

K_MAX = 1000


@dataclass
class Hit:
    id: object
    score: float
    fields: dict

    def as_dict(self) -> dict:
        return {"id": self.id, "score": self.score, "fields": self.fields}


class Router:
    def __init__(self, index_root: str, version: str | None = None, s3_endpoint: str | None = None,
                 backend: str = "ray", threads: int | None = None):
        self.store = Store(index_root, s3_endpoint)
        self.version = version or current_version(self.store)
        self.manifest: Manifest = load_manifest(self.store, self.version)
        self.backend = backend
        self.shards = [self._start(s, threads) for s in self.manifest.shards]
        self.docs = DocStore(self.store, self.manifest)
        self._encoder = None

    def _start(self, shard, threads):
        if self.backend == "local":
            return ShardSearcher(self.store, self.version, shard, threads)
        import ray

        from index_builder.raytools import ensure_ray

        ensure_ray()
        actor = ray.remote(ShardSearcher).options(num_cpus=0.5).remote(self.store, self.version, shard, threads)
        return actor

    @property
    def metric(self) -> str:
        return self.manifest.index.metric

    @property
    def dim(self) -> int:
        return self.manifest.encoder.dim

    def encoder(self):
        """The index's own encoder, loaded on first use (the only import of the builder here)."""
        if self._encoder is None:
            from index_builder.encoder import Encoder

            self._encoder = Encoder.for_index(self.manifest.encoder)
        return self._encoder

    def encode(self, queries: list[str]) -> np.ndarray:
        if not queries:
            raise SearchError("queries: empty; give at least one query")
        return self.encoder().encode_queries(list(queries))

    def search_vectors(self, xq: np.ndarray, k: int = 10, nprobe: int | None = None):
        """(D, I): the exact merge of every shard's top-k for each query."""
        xq = np.ascontiguousarray(np.atleast_2d(np.asarray(xq, dtype=np.float32)))
        if xq.shape[1] != self.dim:
            raise SearchError(f"vectors: dimension {xq.shape[1]}, this index has {self.dim}")
        if not 1 <= k <= K_MAX:
            raise SearchError(f"k: {k} is outside 1..{K_MAX}")
        nprobe = nprobe or self.manifest.search.nprobe
        if self.backend == "local":
            res = [s.search(xq, k, nprobe) for s in self.shards]
        else:
            import ray

            res = ray.get([s.search.remote(xq, k, nprobe) for s in self.shards])
        return merge_topk(res, k, self.metric)

    def search(self, queries, k: int = 10, nprobe: int | None = None, fields: list[str] | None = None):
        """Text queries (list of str) or vectors -> per query, a list of Hit with stored fields."""
        if isinstance(queries, (list, tuple)) and queries and isinstance(queries[0], str):
            xq = self.encode(list(queries))
        else:
            xq = np.asarray(queries, dtype=np.float32)
        D, I = self.search_vectors(xq, k, nprobe)
        unknown = set(fields or []) - set(self.manifest.docs.fields)
        if unknown:
            raise SearchError(f"fields: unknown {sorted(unknown)}; stored fields are {self.manifest.docs.fields}")
        docs = self.docs.lookup(I.ravel(), fields)
        return [[Hit(docs[i]["id"], float(d), docs[i]["fields"]) for d, i in zip(dr, ir) if i in docs]
                for dr, ir in zip(D, I)]

    def close(self) -> None:
        if self.backend != "local":
            import ray

            for a in self.shards:
                ray.kill(a)
        self.shards = []

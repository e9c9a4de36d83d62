"""`shardex encode SOURCE EMBEDDINGS_URI`: the encode stage alone, as a directory of Parquet parts.

Each part-N.parquet holds (id, vector float32[d], stored fields), with the source's own ids,
so `shardex build EMBEDDINGS_URI ... --vector-column vector` takes it as a corpus. The
encoder's identity goes into _shardex_encoder.json, which build reads back: an index built
from these vectors still answers text queries with the same encoder.

A re-run skips the parts already committed. A directory that holds the embeddings of another
corpus or encoder is refused rather than mixed.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from index_builder.config import BuildConfig
from index_builder.encode.parts import Layout
from index_builder.encode.pool import ENCODER_FILE, Encoders
from index_builder.pipeline import short_hash, with_endpoint
from index_builder.plan.corpus import plan_corpus
from shards.errors import ConfigError
from shards.raytools import ensure_ray, log
from shards.storage.store import Store

RUN_FILE = "_shardex_encode.json"  # the fingerprint of what this directory holds


@dataclass
class EncodeSummary:
    uri: str
    documents: int
    rejected: int
    parts: int
    reused_parts: int
    seconds: float
    docs_per_s: float
    encoder: dict
    tokens: int
    padded: int
    padded_unsorted: int

    def lines(self) -> list[str]:
        e = self.encoder
        out = [f"embeddings   {self.uri}: {self.parts} part(s), {self.reused_parts} reused",
               f"documents    {self.documents:,} encoded, {self.rejected:,} rejected",
               f"encoder      {e['name']} d={e['dim']} {e['dtype']} normalize={e['normalize']}",
               f"speed        {self.seconds:.1f} s, {self.docs_per_s:,.1f} docs/s"]
        if self.padded_unsorted:
            out.append(f"padding      {self.padded:,} tokens computed for {self.tokens:,} real "
                       f"({1 - self.padded / self.padded_unsorted:.0%} fewer than unsorted batches)")
        return out


def encode(cfg: BuildConfig) -> EncodeSummary:
    """cfg.index_root is EMBEDDINGS_URI here."""
    cfg = with_endpoint(cfg)
    if cfg.vector_column:
        raise ConfigError("vector_column: `shardex encode` encodes text; the vectors are already there")
    store = Store(cfg.index_root, cfg.s3_endpoint)
    corpus = plan_corpus(cfg)
    ensure_ray()
    log(f"plan: {len(corpus.files)} file(s), {corpus.total_rows:,} rows, {len(corpus.shards)} part(s)")
    t0 = time.time()
    with Encoders(cfg, corpus) as pool:
        info = pool.info
        _claim(store, short_hash(corpus.fingerprint, info, cfg.stored_fields))
        parts = pool.encode(Layout.flat())
    secs = time.time() - t0
    store.write_text(ENCODER_FILE, info.model_dump_json(indent=2))  # last: the directory is complete
    n = sum(p.rows for p in parts)
    return EncodeSummary(uri=cfg.index_root, documents=n, rejected=sum(p.rejected for p in parts),
                         parts=len(parts), reused_parts=sum(p.reused for p in parts), seconds=round(secs, 2),
                         docs_per_s=round(n / max(secs, 1e-9), 1), encoder=info.model_dump(),
                         tokens=sum(p.tokens for p in parts), padded=sum(p.padded for p in parts),
                         padded_unsorted=sum(p.padded_unsorted for p in parts))


def _claim(store: Store, fp: str) -> None:
    """Mark the directory as holding fp's embeddings; refuse one that holds another's."""
    if store.exists(RUN_FILE):
        have = json.loads(store.read_text(RUN_FILE))["fingerprint"]
        if have != fp:
            raise ConfigError(f"{store.root}: holds embeddings of another corpus, encoder or field list "
                              f"(fingerprint {have[:12]}, this run {fp[:12]}); give a new EMBEDDINGS_URI or delete it")
        return
    names = store.ls("")
    if names:
        raise ConfigError(f"{store.root}: not empty and not written by `shardex encode` ({names[0]}, ...); "
                          "give a new or empty EMBEDDINGS_URI")
    store.write_text(RUN_FILE, json.dumps({"fingerprint": fp}))


def as_dict(s: EncodeSummary) -> dict:
    return asdict(s)

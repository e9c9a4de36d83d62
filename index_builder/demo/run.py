"""`shardex demo`: the main job on an embedded default, on any machine, offline.

Local Ray on the CPU, the bundled all-MiniLM-L6-v2 encoder, and a real corpus:
the docstrings of this Python's standard library, written to Parquet first.
"""
from __future__ import annotations

import os
import time

from index_builder.config import BuildConfig
from index_builder.demo.textcorpus import example_queries, write_corpus
from index_builder.pipeline import build
from shards.raytools import log


def run_demo(out: str, limit: int, shards: int) -> int:
    t0 = time.time()
    corpus, index = os.path.join(out, "corpus"), os.path.join(out, "index")
    info = write_corpus(corpus, limit=limit)
    log(f"demo: wrote {info['documents']:,} standard-library docstrings to {corpus}")
    cfg = BuildConfig(source=corpus, index_root=index, id_column="id", text_column="text",
                      fields=["title", "text"], shards=shards, part_rows=1000)
    s = build(cfg)
    print("\n== build summary ==")
    print("\n".join(s.lines()))

    from shards.search.router import Router

    r = Router(index)
    print("\n== example queries (top 5) ==")
    for q, hits in zip(example_queries(), r.search(example_queries(), k=5)):
        print(f"\n> {q}")
        for h in hits:
            print(f"  {h.score:6.3f}  {h.id:<50.50}  {_snip(h.fields)}")
    r.close()
    print(f"\ndemo finished in {time.time() - t0:.0f} s; try: shardex search {index} \"read a csv file\"")
    return 0


def _snip(f: dict, width: int = 70) -> str:
    s = f.get("title") or f.get("text") or ""
    return s if len(s) <= width else s[: width - 3] + "..."

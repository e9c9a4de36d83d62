"""Reindex with the real encoder over real text (standard-library docstrings).

Only new and changed documents go through the encoder; unchanged ones keep their stored
vectors bit for bit. A reindex with another encoder encodes everything and never mixes the
two vector spaces.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index_builder.config import ReindexConfig
from index_builder.demo.textcorpus import SCHEMA, stdlib_docstrings
from index_builder.reindex.incremental import reindex
from shards.search.router import Router
from shards.storage.manifest import current_version, load_manifest
from shards.storage.store import Store

from helpers import build

pytestmark = pytest.mark.slow
V1_DOCS, K = 128, 8


def write(path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


def vectors(root, version: str) -> dict[str, np.ndarray]:
    """Source id -> the vector the version's embeddings hold (ids are strings here)."""
    store = Store(str(root))
    m = load_manifest(store, version)
    docs = {}
    for f in m.docs.files:
        t = store.read_table(m.path(f), columns=["id", "source_id"])
        docs.update(zip(t.column("id").to_pylist(), t.column("source_id").to_pylist()))
    out = {}
    for rel in m.embeddings.parts:
        t = store.read_table(rel)
        x = t.column("vector").combine_chunks().values.to_numpy().reshape(-1, m.encoder.dim)
        out.update((docs[i], v) for i, v in zip(t.column("id").to_pylist(), x))
    return out


@pytest.fixture(scope="module")
def text(ray_session, tmp_path_factory):
    """v1 over 128 docstrings; v2 a reindex after deleting, changing and adding 8 each."""
    tmp = tmp_path_factory.mktemp("text-reindex")
    src, root = tmp / "corpus", tmp / "index"
    src.mkdir()
    recs = stdlib_docstrings(limit=V1_DOCS + K)
    first, fresh = recs[:V1_DOCS], recs[V1_DOCS:]
    write(src / "part-0.parquet", first[:64])
    write(src / "part-1.parquet", first[64:])
    v1 = build(ray_session, source=str(src), index_root=str(root), fields=["title", "text"], shards=1,
               part_rows=64)

    rows = first[64:]
    gone, changed = rows[:K], rows[K:2 * K]
    for r in changed:
        r["text"] = f"Revised: {r['text']} It also reports progress while it works."
        r["title"] = f"(revised) {r['title']}"
    write(src / "part-1.parquet", rows[K:])
    write(src / "part-2.parquet", fresh)
    v2 = reindex(ReindexConfig(source=str(src), index_root=str(root)))
    return dict(src=src, root=root, v1=v1, v2=v2, gone=gone, changed=changed, fresh=fresh,
                all=first[:64] + rows[K:] + fresh)


def test_only_new_and_changed_documents_are_encoded(text):
    v2 = text["v2"]
    assert (v2.new, v2.changed, v2.deleted, v2.unchanged) == (K, K, K, V1_DOCS - 2 * K)
    assert v2.encoded == 2 * K and v2.reencoded_all is None
    assert v2.build.seconds["encode"] > 0 and not v2.retrained

    before, after = vectors(text["root"], text["v1"].version), vectors(text["root"], v2.version)
    touched = {r["id"] for r in text["changed"]} | {r["id"] for r in text["gone"]}
    kept = set(before) - touched
    assert len(kept) == V1_DOCS - 2 * K
    assert all(np.array_equal(before[i], after[i]) for i in kept)       # reused, bit for bit
    assert not {r["id"] for r in text["gone"]} & set(after)
    assert all(not np.allclose(before[r["id"]], after[r["id"]]) for r in text["changed"])


def test_changed_documents_answer_with_new_text_and_fields(text):
    r = Router(str(text["root"]), backend="local")
    assert r.version == text["v2"].version
    probes = text["changed"][:3] + text["fresh"][:3]
    hits = r.search([p["text"] for p in probes], k=1)
    assert [h[0].id for h in hits] == [p["id"] for p in probes]
    assert all(h[0].score > 0.99 for h in hits)
    assert hits[0][0].fields["title"].startswith("(revised) ")
    got = np.concatenate([s.ids() for s in r.shards])
    assert len(got) == len(np.unique(got)) == V1_DOCS                   # -8 +8: every id once


def test_another_encoder_reencodes_everything(text, tmp_path, capsys):
    """Same weights, CLS pooling instead of mean: another vector space, so nothing is reused."""
    from index_builder.cli import main
    from shards.encoder import resolve_model

    model = tmp_path / "minilm-cls"
    base = resolve_model(None)
    for dp, _, files in os.walk(base):
        out = model / os.path.relpath(dp, base)
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            os.symlink(os.path.join(dp, f), out / f)
    pool = model / "1_Pooling" / "config.json"
    cfg = json.loads(pool.read_text())
    pool.unlink()
    pool.write_text(json.dumps({**cfg, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))

    s = reindex(ReindexConfig(source=str(text["src"]), index_root=str(text["root"]), model=str(model)))
    assert s.published and s.encoded == V1_DOCS and "name" in s.reencoded_all
    assert s.retrained and "every vector is new" in s.retrain_reason
    assert (s.new, s.changed, s.deleted) == (0, 0, 0)                  # the documents did not change

    store = Store(str(text["root"]))
    m2, m3 = load_manifest(store, text["v2"].version), load_manifest(store, s.version)
    assert m3.encoder.name == str(model) != m2.encoder.name
    assert m3.lineage.reencoded_all == s.reencoded_all
    # every stored vector is the new encoder's: each document is its own best match under it
    r = Router(str(text["root"]), backend="local")
    assert current_version(store) == r.version == s.version
    hits = r.search([d["text"] for d in text["all"]], k=1)
    assert [h[0].id for h in hits] == [d["id"] for d in text["all"]]
    assert min(h[0].score for h in hits) > 0.99

    assert main(["versions", str(text["root"])]) == 0
    out = capsys.readouterr().out
    assert str(model) in out and "sentence-transformers/all-MiniLM-L6-v2" in out

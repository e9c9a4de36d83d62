"""The encode stage: the length-sorted loop equals sentence-transformers, `shardex encode`
round-trips through `build --vector-column`, and a killed encoder actor loses no part and
duplicates none."""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import pyarrow.dataset as ds
import pytest

from index_builder.config import BuildConfig
from index_builder.demo.textcorpus import stdlib_docstrings, write_corpus
from shards.encoder import Encoder
from shards.errors import ConfigError
from shards.search.router import Router
from shards.tokens import cuts, padding_of

from helpers import build, wait_until

TEXTS = ["short", "a sentence of middling length about files", "word " * 400, "", "ünïcödé text",
         "read a csv file", "x " * 30] * 10


@pytest.fixture(scope="module")
def enc():
    return Encoder(threads=2)


# ---------------------------------------------------------------- the encoder

def test_sorted_loop_equals_sentence_transformers(enc):
    x = enc.encode_documents(TEXTS)
    ref = enc.model.encode(TEXTS, batch_size=64, convert_to_numpy=True)
    assert x.shape == (len(TEXTS), 384) and x.dtype == np.float32
    np.testing.assert_allclose(x, ref, atol=2e-5)


@pytest.mark.parametrize("prefix,limit", [("passage: ", None), ("", 8), ("query: ", 16)])
def test_prefix_and_max_seq_length(prefix, limit):
    e = Encoder(threads=2, document_prefix=prefix, query_prefix="q: ", max_seq_length=limit)
    ref = e.model.encode([prefix + t for t in TEXTS], batch_size=64, convert_to_numpy=True)
    np.testing.assert_allclose(e.encode_documents(TEXTS), ref, atol=2e-5)
    np.testing.assert_allclose(e.encode_queries(TEXTS[:3]), e.model.encode(["q: " + t for t in TEXTS[:3]]),
                               atol=2e-5)
    info = e.info()
    assert (info.document_prefix, info.query_prefix, info.dtype) == (prefix, "q: ", "fp32")
    assert info.max_seq_length == (limit or 256)
    if limit:  # truncation really happened: a long text equals its own first tokens
        long = "word " * 400
        np.testing.assert_allclose(e.encode_documents([long]), e.encode_documents(["word " * 100]), atol=2e-5)


def test_normalisation_is_the_models(enc):
    x = enc.encode_documents(TEXTS[:5])
    assert enc.normalize and enc.metric == "ip"
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_half_precision_needs_a_gpu():
    with pytest.raises(ConfigError, match="dtype: fp16 needs a CUDA device"):
        Encoder(device="cpu", dtype="fp16")


# (lengths in input order, token budget) -> the batches cut longest first, and the padding
@pytest.mark.parametrize("lens,budget,spans,tokens,padded,unsorted", [
    ([5], 20, [(0, 1)], 5, 5, 5),
    ([1, 9, 1, 9], 18, [(0, 2), (2, 4)], 20, 20, 36),   # sorted: (9,9)(1,1); input order: (1,9)(1,9)
    ([3, 3, 3], 6, [(0, 2), (2, 3)], 9, 9, 9),
    ([10, 1, 2, 3, 4, 5], 30, [(0, 3), (3, 6)], 25, 10 * 3 + 3 * 3, 10 * 3 + 5 * 3),
    ([300, 5, 5], 256, [(0, 1), (1, 3)], 310, 310, 300 + 10),  # longer than the budget: alone
    ([40] * 10 + [4] * 40, 400, [(0, 10), (10, 50)], 560, 560, 560),  # short texts: wider batches
    ([], 64, [], 0, 0, 0),
])
def test_token_budget_batches(lens, budget, spans, tokens, padded, unsorted):
    lens = np.array(lens, dtype=np.int64)
    order = np.argsort(-lens, kind="stable")
    assert cuts(lens[order], budget) == spans
    for a, b in spans:
        assert (b - a) * lens[order][a:b].max() <= budget or b - a == 1
    p = padding_of(lens, order, budget)
    assert (p.tokens, p.padded, p.padded_unsorted) == (tokens, padded, unsorted)


def test_length_sorting_saves_padding_on_real_docstrings(enc):
    texts = [r["text"] for r in stdlib_docstrings(limit=300)]
    b = enc.tokenize(texts)
    assert sorted(np.concatenate([idx for idx, _ in b.items]).tolist()) == list(range(len(texts)))
    assert all(f["input_ids"].size <= enc.batch_tokens or len(idx) == 1 for idx, f in b.items)
    assert len({len(idx) for idx, _ in b.items}) > 1  # shorter texts, wider batches
    p = padding_of(b.lens, np.argsort(-b.lens, kind="stable"), enc.batch_tokens)
    assert p.tokens <= p.padded < p.padded_unsorted


@pytest.mark.parametrize("budget", [1, 300, 5000])
def test_any_token_budget_gives_the_same_vectors(enc, budget):
    e = Encoder(threads=2, batch_tokens=budget)
    np.testing.assert_allclose(e.encode_documents(TEXTS), enc.encode_documents(TEXTS), atol=2e-5)


def test_refuses_an_index_whose_encoder_it_cannot_load(enc):
    info = enc.info().model_copy(update={"revision": "0" * 64})
    with pytest.raises(ConfigError, match="weights .* differ"):
        Encoder.for_index(info)
    with pytest.raises(ConfigError, match="cannot load it"):
        Encoder.for_index(info.model_copy(update={"name": "/no/such/model", "revision": None}))


# ---------------------------------------------------------------- another model, by local path

@pytest.fixture(scope="module")
def e5_like(tmp_path_factory):
    """A second sentence-transformers model saved to a local path, unlike the default in every way
    the encoder must honour: e5-style prompts, pooling that leaves the prompt's tokens out, no
    Normalize module, a 128-token limit. (No second model can be downloaded here.)"""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from shards.encoder import resolve_model

    base = SentenceTransformer(resolve_model(None), device="cpu")
    m = SentenceTransformer(modules=[base[0], Pooling(384, pooling_mode="mean", include_prompt=False)],
                            prompts={"query": "query: ", "document": "passage: "}, device="cpu")
    m.max_seq_length = 128
    path = str(tmp_path_factory.mktemp("models") / "e5-like")
    m.save(path)
    return path, SentenceTransformer(path, device="cpu")


def test_a_local_model_keeps_its_pooling_prompts_and_limit(e5_like, enc):
    path, ref = e5_like
    e = Encoder(path, threads=2)
    info = e.info()
    assert (info.name, info.dim, info.normalize, info.metric) == (path, 384, False, "l2")
    assert (info.query_prefix, info.document_prefix, info.max_seq_length) == ("query: ", "passage: ", 128)
    # the same weights as the default model, told apart by the modules around them
    assert info.revision == enc.revision and info.modules != enc.info().modules
    np.testing.assert_allclose(e.encode_documents(TEXTS), ref.encode_document(TEXTS), atol=2e-5)
    np.testing.assert_allclose(e.encode_queries(TEXTS[:7]), ref.encode_query(TEXTS[:7]), atol=2e-5)
    assert not np.allclose(np.linalg.norm(e.encode_documents(TEXTS[:3]), axis=1), 1.0)
    # a prompt given explicitly wins over the model's own
    assert Encoder(path, threads=2, query_prefix="").query_prefix == ""


def test_router_refuses_other_modules_around_the_same_weights(e5_like, enc):
    """An index built with the e5-like model names a path that now holds the default model."""
    path, _ = e5_like
    info = Encoder(path, threads=2).info().model_copy(update={"name": enc.name})
    with pytest.raises(ConfigError, match="its modules .* differ"):
        Encoder.for_index(info)


def test_build_and_search_with_a_local_model(ray_session, e5_like, docs, tmp_path):
    path, ref = e5_like
    src, rows = docs
    root = str(tmp_path / "index")
    build(ray_session, source=src, index_root=root, model=path, fields=["title"], part_rows=120)
    r = Router(root, backend="local")
    e = r.manifest.encoder
    assert (e.name, e.normalize, e.metric, e.query_prefix, e.document_prefix) == \
        (path, False, "l2", "query: ", "passage: ")
    assert r.manifest.index.metric == "l2"
    hit = r.search([rows[11]["text"]], k=1)[0][0]
    assert hit.id == rows[11]["id"]
    np.testing.assert_allclose(r.encode(["read a file"]), ref.encode_query(["read a file"]), atol=2e-5)


# ---------------------------------------------------------------- `shardex encode` and the pool

@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    src = str(tmp_path_factory.mktemp("enc") / "corpus")
    write_corpus(src, limit=240, files=2, row_group_rows=30)
    return src, ds.dataset(src).to_table().to_pylist()


def test_encode_writes_parts_build_takes(ray_session, docs, tmp_path, enc):
    from index_builder.encode.encode_only import encode

    src, rows = docs
    out = str(tmp_path / "emb")
    s = encode(BuildConfig(source=src, index_root=out, fields=["title", "text"], part_rows=60))
    assert (s.documents, s.rejected, s.parts, s.reused_parts) == (len(rows), 0, 4, 0)
    t = ds.dataset(out).to_table()  # pyarrow skips the _-prefixed files, as build does
    assert sorted(t.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    assert t.schema.field("vector").type.list_size == 384 and t.column_names == ["id", "vector", "title", "text"]
    by_id = {r["id"]: r["text"] for r in rows}
    some = t.slice(0, 5).to_pylist()
    np.testing.assert_allclose(np.array([r["vector"] for r in some]),
                               enc.encode_documents([by_id[r["id"]] for r in some]), atol=2e-5)
    assert json.load(open(os.path.join(out, "_shardex_encoder.json")))["revision"] == enc.revision

    again = encode(BuildConfig(source=src, index_root=out, fields=["title", "text"], part_rows=60))
    assert again.reused_parts == 4 and again.documents == len(rows)

    # build from the embeddings: the encoder travels, so text queries work on the result
    root = str(tmp_path / "index")
    build(ray_session, source=out, index_root=root, vector_column="vector", fields=["title"], part_rows=1000)
    r = Router(root, backend="local")
    hit = r.search([rows[7]["text"]], k=1)[0][0]
    assert hit.id == rows[7]["id"] and hit.fields == {"title": rows[7]["title"]}
    assert r.manifest.encoder.revision == enc.revision


def test_encode_refuses_a_directory_of_other_embeddings(ray_session, docs, tmp_path, enc, capfd):
    """(Its first encode hands the tokenizing to a process of the actor's own, as on a GPU node:
    the same vectors.) A second encode with another prefix is refused."""
    from index_builder.encode.encode_only import encode

    src, rows = docs
    out = str(tmp_path / "emb")
    encode(BuildConfig(source=src, index_root=out, fields=["title"], part_rows=120, tokenizer_workers=1,
                       batch_tokens=2000))
    assert "1 thread(s) + 1 tokenizer process(es) on CPU" in capfd.readouterr().err
    t = ds.dataset(out).to_table(columns=["id", "vector"]).slice(0, 30).to_pylist()
    by_id = {r["id"]: r["text"] for r in rows}
    np.testing.assert_allclose(np.array([r["vector"] for r in t]),
                               enc.encode_documents([by_id[r["id"]] for r in t]), atol=2e-5)
    with pytest.raises(ConfigError, match="holds embeddings of another"):
        encode(BuildConfig(source=src, index_root=out, fields=["title"], part_rows=120, document_prefix="p: "))


@pytest.mark.slow
def test_killed_encoder_actor_part_is_redone_once(ray_session, docs, tmp_path, capfd):
    """Kill one of two actors (for good) once parts are flowing: its parts go to the other,
    and every id is in the output exactly once."""
    import ray

    from index_builder.encode.encode_only import encode

    src, rows = docs
    out = str(tmp_path / "emb")
    res = {}
    th = threading.Thread(target=lambda: res.update(s=encode(BuildConfig(
        source=src, index_root=out, fields=["title"], part_rows=20, actors=2))))
    th.start()
    victim = _wait_for_busy_actor(out, ray)
    ray.kill(ray.get_actor(victim), no_restart=True)
    th.join(timeout=600)
    assert "s" in res, "encode did not finish"
    ids = ds.dataset(out).to_table(columns=["id"]).column(0).to_pylist()
    assert len(ids) == len(set(ids)) == len(rows)
    assert set(ids) == {r["id"] for r in rows}
    assert res["s"].documents == len(rows)
    assert "goes to another worker" in capfd.readouterr().err  # the kill landed mid-run


def _wait_for_busy_actor(out: str, ray, timeout: float = 300) -> str:
    """The name of an encoder actor, once at least one part is committed (so the pool is mid-run)."""
    from index_builder.encode.pool import ACTOR_PREFIX

    def busy():
        names = [n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX)]
        done = [f for f in os.listdir(out) if f.startswith("part-")] if os.path.isdir(out) else []
        return sorted(names)[0] if names and done else None

    return wait_until(busy, timeout, 0.1, what="an encoder actor with a part committed")


def test_fast_tokenizer_gives_the_models_own_features(enc):
    """The hand-padded Rust tokenizer is used for the default model, and matches its preprocessing."""
    texts = [r["text"] for r in stdlib_docstrings(limit=200)] + TEXTS
    assert enc.fast is not None
    a, b = enc.fast(texts), enc._preprocess(texts)
    for k in enc.fast.names:
        assert a[k].shape == tuple(b[k].shape) and bool((a[k] == b[k].numpy()).all()), k

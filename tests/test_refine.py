"""The refine store and two-step search (shards/storage/refine.py, build/fields.py, build/tune.py): each
shard's vectors by id on disk, its k x factor candidates reranked by exact distance. With a factor that
holds every scanned candidate the answer is exact search over the lists scanned; the router's merge of
the shards' reranked answers is exact; a delta reindex adds a generation whose vectors stand."""
from __future__ import annotations

import numpy as np
import pytest

from index_builder.build.tune import cheapest
from shards.errors import IntegrityError, QueryError
from shards.search.router import Router
from shards.search.topk import merge_topk
from shards.storage import refine
from shards.storage.faissio import faiss, load_shard, read_index, set_nprobe
from shards.storage.manifest import FieldsInfo, current_version, load_manifest, verify
from shards.storage.store import Store

from helpers import assert_same_topk, build, build_config, clustered, mutate, write_vector_corpus

N, D, K = 4000, 32, 10


def store_of(tmp_path, gens: list[tuple[np.ndarray, np.ndarray]], dtype: str = "fp32") -> refine.RefineStore:
    """A refine store of one file per generation (ids, x), written as the build writes them."""
    st, files = Store(str(tmp_path)), []
    for g, (ids, x) in enumerate(gens):
        o = np.argsort(ids)
        w = st.write_bytes(f"r-{g}.vec", refine.to_bytes(ids[o], x[o], dtype))
        files.append((f"r-{g}.vec", FieldsInfo(file=f"r-{g}.vec", sha256=w.sha256, bytes=w.bytes, ntotal=len(ids),
                                              lo=int(ids.min()), hi=int(ids.max()), gen=g)))
    return refine.RefineStore(st, files, "shard 0")


def test_newest_generation_stands_and_a_missing_id_is_named(tmp_path):
    x0, x1 = clustered(100, 8, seed=1), clustered(10, 8, seed=2)
    rs = store_of(tmp_path, [(np.arange(100, dtype=np.int64) * 2, x0), (np.arange(10, dtype=np.int64) * 2, x1)])
    np.testing.assert_array_equal(rs.vectors(np.array([0, 18, 20, 198])), np.stack([x1[0], x1[9], x0[10], x0[99]]))
    with pytest.raises(IntegrityError, match="shard 0: .* no vector for id 3"):
        rs.vectors(np.array([2, 3]))


def test_ranges_are_appended_into_one_file_read_back_by_id(tmp_path):
    from helpers import vector_table

    st, x = Store(str(tmp_path)), clustered(300, 8, seed=5)
    ids = np.arange(300, dtype=np.int64) * 3
    f = refine.write_ranges(st, "v/shard-0.refine-0.vec", (vector_table(ids[a:a + 100], x[a:a + 100])
                                                           for a in (0, 100, 200)), 0, "fp32")
    assert (f.ntotal, f.lo, f.hi, f.bytes) == (300, 0, 897, refine.HEAD + 300 * (8 + 8 * 4))
    assert f.sha256 == st.sha256("v/shard-0.refine-0.vec") and not list((tmp_path / "v").glob(".refine-*"))
    rs = refine.RefineStore(st, [("v/shard-0.refine-0.vec", f)], "shard 0")
    np.testing.assert_array_equal(rs.vectors(np.array([897, 3, 3, 450])), x[[299, 1, 1, 150]])
    assert refine.write_ranges(st, "v/empty.vec", iter([]), 0, "fp32") is None


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("fp16", 2e-2)])
def test_rerank_orders_candidates_by_exact_distance(tmp_path, metric, dtype, tol):
    ids, x = np.arange(300, dtype=np.int64) + 7, clustered(300, 16, seed=3)
    rs = store_of(tmp_path, [(ids, x)], dtype)
    xq = clustered(5, 16, seed=4)
    rng = np.random.default_rng(0)
    cand = np.stack([rng.choice(ids, 40, replace=False) for _ in xq])
    cand[0, 30:] = -1                                       # a short answer's pads stay pads
    D, I = rs.rerank(xq, cand, K, metric)
    for q in range(len(xq)):
        c = cand[q][cand[q] >= 0]
        v = x[c - 7]
        d = v @ xq[q] if metric == "ip" else ((v - xq[q]) ** 2).sum(1)
        o = np.argsort(-d if metric == "ip" else d, kind="stable")[:K]
        np.testing.assert_allclose(D[q], d[o], rtol=tol, atol=tol)
        assert set(I[q]) == set(c[o]) or dtype == "fp16"
    D, I = rs.rerank(xq[:1], np.full((1, 4), -1), K, metric)   # nothing to rerank: pads only
    assert (I == -1).all() and D.shape == (1, K)


@pytest.mark.parametrize("tries,target,want", [
    ([{"refine": 0, "recall": 0.96, "us_per_query": 50}, {"refine": 8, "recall": 0.97, "us_per_query": 20}], 0.95, 8),
    ([{"refine": 0, "recall": 0.96, "us_per_query": 10}, {"refine": 8, "recall": 0.97, "us_per_query": 20}], 0.95, 0),
    ([{"refine": 0, "recall": 0.90, "us_per_query": 10}, {"refine": 8, "recall": 0.97, "us_per_query": 90}], 0.95, 8),
    # none reaches it: the cheapest near the best recall
    ([{"refine": 0, "recall": 0.80, "us_per_query": 10}, {"refine": 8, "recall": 0.931, "us_per_query": 90},
      {"refine": 16, "recall": 0.934, "us_per_query": 95}], 0.95, 8),
    ([{"refine": 0, "recall": 0.9}], 0.95, 0),
])
def test_cheapest_pair_reaching_the_target(tries, target, want):
    assert cheapest(tries, target)["refine"] == want


# ---------------------------------------------------------------- built through the pipeline

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    src = tmp_path_factory.mktemp("refine") / "corpus"
    ids, x = write_vector_corpus(str(src), n=N, d=D, files=3, seed=5)
    return src, ids, x


def scanned_exact(root: str, ids, x, xq, nprobe: int, metric: str):
    """Exact top-K of each query among the vectors in the lists it probes (the trained quantizer's)."""
    store = Store(root)
    m = load_manifest(store, current_version(store))
    t = read_index(store, m.path(m.trained.file))
    iv = faiss().extract_index_ivf(t)
    _, own = iv.quantizer.search(x, 1)
    _, probe = iv.quantizer.search(xq, nprobe)
    out = []
    for q in range(len(xq)):
        v = np.flatnonzero(np.isin(own[:, 0], probe[q]))
        d = x[v] @ xq[q] if metric == "ip" else ((x[v] - xq[q]) ** 2).sum(1)
        out.append(set(ids[v[np.argsort(-d if metric == "ip" else d)[:K]]]))
    return out


def shard_reference(root: str, x_of, xq, nprobe: int, factor: int, metric: str):
    """Each shard searched alone with faiss for K x factor, reranked from the corpus vectors, merged."""
    store = Store(root)
    m = load_manifest(store, current_version(store))
    got = []
    for sh in m.shards:
        index = load_shard(store, m, sh)
        set_nprobe(index, nprobe)
        _, I = index.search(xq, K * factor)
        Dr = np.stack([[(x_of(i) @ q if metric == "ip" else ((x_of(i) - q) ** 2).sum()) if i >= 0 else
                        (-np.inf if metric == "ip" else np.inf) for i in row] for row, q in zip(I, xq)])
        o = np.argsort(-Dr if metric == "ip" else Dr, axis=1, kind="stable")[:, :K]
        got.append((np.take_along_axis(Dr, o, 1).astype(np.float32), np.take_along_axis(I, o, 1)))
    return merge_topk(got, K, metric)


@pytest.mark.parametrize("sharding,ram,dtype", [("hash", "auto", "fp32"), ("ivf", "0", "fp32"),
                                                ("hash", "0", "fp16")])
def test_two_step_search_is_exact_where_it_must_be(ray_session, corpus, tmp_path, sharding, ram, dtype):
    src, ids, x = corpus
    root = str(tmp_path / "index")
    s = build(ray_session, source=str(src), index_root=root, vector_column="vector", factory="IVF32,PQ4", shards=2,
              sharding=sharding, merge_ram_budget=ram, metric="l2", route="all", refine=dtype)
    store = Store(root)
    m = load_manifest(store, current_version(store))
    # the summary says both: RAM for the codes, disk for the refine store, and the tuned pair
    assert s.refine_bytes == sum(sh.refine_bytes for sh in m.shards) > N * 32 * (2 if dtype == "fp16" else 4)
    assert f"on disk ({dtype})" in s.lines()[2] and f"refine x{m.search.refine_factor}:" in s.lines()[3]
    verify(store, m)                                     # refine files listed, checked like the rest
    assert m.index.refine == dtype and m.search.refine_factor in (0, 2, 4, 8, 16, 32)
    assert all(sum(f.ntotal for f in sh.refine) == sh.ntotal for sh in m.shards)
    assert all(bool(sh.ivfdata) == (ram == "0") for sh in m.shards)
    r = Router(root, backend="local")
    xq = x[::97] + 0.05
    # a factor holding every scanned candidate: exact search over the lists scanned
    _, I = r.search_vectors(xq, k=K, nprobe=4, refine=1000)
    want = scanned_exact(root, ids, x, xq, 4, "l2")
    same = np.mean([len(set(a) & w) / K for a, w in zip(I, want)])
    assert same >= (1.0 if dtype == "fp32" else 0.98)
    if dtype == "fp32":
        # a small factor: each shard's K x 4 best by its codes, reranked, merged exactly
        D, I = r.search_vectors(xq, k=K, nprobe=8, refine=4)
        pos = {int(i): n for n, i in enumerate(ids)}
        assert_same_topk(D, I, *shard_reference(root, lambda i: x[pos[int(i)]], xq, 8, 4, "l2"))
        D0, I0 = r.search_vectors(xq, k=K, nprobe=8, refine=0)   # 0: the codes' own top-k and distances
        assert not np.allclose(D0, D)
    r.close()


def test_delta_reindex_adds_a_generation_whose_vectors_stand(ray_session, tmp_path):
    from index_builder.config import ReindexConfig
    from index_builder.reindex.compaction import compact_root
    from index_builder.reindex.incremental import reindex

    src = tmp_path / "corpus"
    write_vector_corpus(str(src), n=N, d=D, files=2, seed=6)
    root = str(tmp_path / "index")
    build(ray_session, source=str(src), index_root=root, vector_column="vector", factory="IVF32,PQ4", shards=2,
          metric="l2", refine="fp32")
    ch = mutate(src)
    reindex(ReindexConfig(source=str(src), index_root=root, drift_error=100))  # the quantizer kept: deltas
    store = Store(root)
    m = load_manifest(store, current_version(store))
    assert m.lineage.segments == "delta" and {f.gen for sh in m.shards for f in sh.refine} == {0, 1}
    r = Router(root, backend="local")
    for xs, want in ((ch["changed_x"], ch["changed"]), (ch["new_x"], ch["new"])):
        Dq, I = r.search_vectors(xs[:20], k=K, nprobe=32, refine=8)
        np.testing.assert_array_equal(I[:, 0], want[:20])       # each found by its new vector, at distance 0
        np.testing.assert_allclose(Dq[:, 0], 0, atol=1e-4)
    _, I = r.search_vectors(clustered(50, D, seed=6), k=K, nprobe=32, refine=8)
    assert not np.isin(I, ch["gone"]).any()
    r.close()
    compact_root(root, only=[0, 1])             # new bases: the refine files are referred to, and still stand
    m = load_manifest(store, current_version(store))
    assert m.lineage.kind == "compact" and not any(sh.deltas for sh in m.shards)
    assert {f.gen for sh in m.shards for f in sh.refine} == {0, 1}
    r = Router(root, backend="local")
    Dq, I = r.search_vectors(ch["changed_x"][:20], k=K, nprobe=32, refine=8)
    np.testing.assert_array_equal(I[:, 0], ch["changed"][:20])
    np.testing.assert_allclose(Dq[:, 0], 0, atol=1e-4)
    r.close()


def test_tuned_on_real_queries_and_retuned_by_eval(ray_session, corpus, tmp_path):
    from index_builder.config import EvalConfig
    from index_builder.eval.evaluate import evaluate, lines, write_report

    src, ids, x = corpus
    xq = (x[::40] + clustered(len(x[::40]), D, seed=9) * 0.3).astype(np.float32)   # not stored vectors
    qf = tmp_path / "queries.npy"
    np.save(qf, xq)
    root = str(tmp_path / "index")
    build(ray_session, source=str(src), index_root=root, vector_column="vector", factory="IVF32,PQ4", shards=2,
          metric="l2", refine="fp32", tune_queries=str(qf))
    store = Store(root)
    m = load_manifest(store, current_version(store))
    assert m.search.tuned_on == "queries" and m.search.eval_queries == len(xq)
    # eval on the same file measures what the tune published, at the published pair
    rep = evaluate(EvalConfig(index_root=root, queries=str(qf), latency_queries=0, nprobe=[m.search.nprobe],
                              refine=[m.search.refine_factor]))
    assert rep["results"][0]["recall"] == pytest.approx(m.search.recall_at_10, abs=1e-4)
    # a sweep of both knobs, re-tuned to a lower target: a new CURRENT referring to the same files
    rep = evaluate(EvalConfig(index_root=root, queries=str(qf), latency_queries=0, nprobe=[1, 4, 32],
                              refine=[0, 4], target_recall=0.9, retune=True))
    assert {(r["nprobe"], r["refine"]) for r in rep["results"]} == {(p, R) for p in (1, 4, 32) for R in (0, 4)}
    fast = rep["fastest_reaching_target"]
    assert fast["qps"] == max(r["qps"] for r in rep["results"] if r["recall"] >= 0.9)
    new = load_manifest(store, current_version(store))
    assert new.version == rep["retuned"]["version"] != m.version and new.lineage.kind == "retune"
    assert (new.search.nprobe, new.search.refine_factor) == (fast["nprobe"], fast["refine"])
    assert new.search.tuned_on == "queries" and new.search.target_recall == 0.9
    assert [new.path(sh.file) for sh in new.shards] == [m.path(sh.file) for sh in m.shards]
    assert [new.path(f.file) for sh in new.shards for f in sh.refine] == \
        [m.path(f.file) for sh in m.shards for f in sh.refine]
    verify(store, new)
    assert any(line.startswith("retuned") for line in lines(rep))
    js, png = write_report(rep, str(tmp_path / "eval"))
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 0
    r = Router(root, backend="local")
    _, I = r.search_vectors(xq[:5], k=K)            # the new defaults serve
    assert (I >= 0).all()
    r.close()


def test_bad_tune_queries_are_named(ray_session, corpus, tmp_path):
    from shards.errors import ConfigError

    src, _, _ = corpus
    qf = tmp_path / "q.npy"
    np.save(qf, np.ones((5, D + 1), np.float32))
    with pytest.raises(ConfigError, match=rf"^tune_queries: {qf} holds vectors of dimension {D + 1}, the index "
                                          rf"has {D}"):
        build(ray_session, source=str(src), index_root=str(tmp_path / "i"), vector_column="vector",
              factory="IVF16,Flat", tune_queries=str(qf))
    (tmp_path / "q.txt").write_text("a query\n")
    with pytest.raises(ConfigError, match="holds text, but this index was built from precomputed vectors"):
        build(ray_session, source=str(src), index_root=str(tmp_path / "j"), vector_column="vector",
              factory="IVF16,Flat", tune_queries=str(tmp_path / "q.txt"))


def test_auto_picks_fast_scan_and_refine_and_reaches_the_target(ray_session, tmp_path):
    """--factory auto at a budget where PQ codes alone cap recall under the target: fast-scan codes in
    the same bytes, a refine store, and the tuned pair reaches the target."""
    src = tmp_path / "corpus"
    write_vector_corpus(str(src), n=60_000, d=D, files=2, seed=8)
    root = str(tmp_path / "index")
    s = build(ray_session, source=str(src), index_root=root, vector_column="vector", memory_budget="1M",
              metric="l2")
    m = load_manifest(Store(root), current_version(Store(root)))
    assert m.index.factory.endswith("x4fs") and m.index.refine == "fp32", m.index.auto_reason
    assert "refine store" in m.index.auto_reason
    assert m.search.refine_factor and s.recall_at_10 >= 0.95
    r = Router(root, backend="local")
    _, I = r.search_vectors(clustered(5, D, seed=1), k=K, refine=0)   # 0: the codes alone, no rerank
    assert (I >= 0).all()
    r.close()
    from index_builder.pipeline import auto_choice

    plain = auto_choice(build_config(source=str(src), memory_budget="1M", refine="none"), 60_000, D)
    assert "x4fs" not in plain.factory and plain.refine is None    # --refine none: the codes alone, as before


def test_refine_asked_of_a_version_without_a_store(ray_session, tmp_path):
    src = tmp_path / "corpus"
    _, x = write_vector_corpus(str(src), n=1000, d=D, files=1, seed=2)
    root = str(tmp_path / "index")
    build(ray_session, source=str(src), index_root=root, vector_column="vector", factory="IVF8,Flat")
    r = Router(root, backend="local")
    with pytest.raises(QueryError, match="refine: 4, but version .* keeps no refine store"):
        r.search_vectors(x[:2], k=K, refine=4)
    r.close()

"""Incremental reindex on precomputed vectors: the diff, the drift check, retention, and crashes.

One build (v1) per module; each test reindexes its own copy of the corpus and index. The
crash tests run `shardex reindex` as a real process that kills itself (SIGKILL) at a chosen
write (shards/storage/store.py, SHARDEX_CRASH_AT), joined to this session's Ray cluster.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from index_builder.config import ReindexConfig
from index_builder.reindex.drift import decide, imbalance
from index_builder.reindex.incremental import reindex, space_change
from shards.search.router import Router
from shards.storage.manifest import EncoderInfo, current_version, list_versions, load_manifest, vdir
from shards.storage.retention import versions_to_keep
from shards.storage.store import Store

from helpers import build, mutate, read_part, vector_table, write_vector_corpus

N, D = 3000, 32
SHARDEX = os.path.join(os.path.dirname(sys.executable), "shardex")


# ---------------------------------------------------------------- pure rules, as tables

# (names oldest first, CURRENT, CURRENT's parent, keep, kept)
KEEP_ROWS = [
    (["v1", "v2", "v3", "v4"], "v4", None, 1, {"v3", "v4"}),          # the one before CURRENT stays
    (["v1", "v2", "v3", "v4"], "v4", None, 2, {"v3", "v4"}),
    (["v1", "v2", "v3", "v4"], "v4", None, 3, {"v2", "v3", "v4"}),
    (["v1", "v2", "v3", "v4"], "v2", None, 1, {"v1", "v2", "v4"}),    # after a rollback: newest, CURRENT, before
    (["v1", "v2", "v3", "v4"], "v1", None, 1, {"v1", "v4"}),          # nothing before the first
    (["v1", "v2", "v3", "v4"], "v4", "v1", 1, {"v1", "v3", "v4"}),    # CURRENT's parent stays too
    (["v1", "v2", "v3", "v4"], None, None, 2, {"v3", "v4"}),          # no CURRENT
    (["v1"], "v1", None, 5, {"v1"}),
    (["v3", "v1", "v2"], "v2", None, 1, {"v1", "v2"}),                # given in time order, names aside
]


@pytest.mark.parametrize("names,current,parent,keep,kept", KEEP_ROWS)
def test_versions_to_keep(names, current, parent, keep, kept):
    assert versions_to_keep(names, current, parent, keep) == kept


# (baseline error, new error, baseline imbalance, projected imbalance, retrain?, reason contains)
DRIFT_ROWS = [
    (1.0, 1.2, 1.1, 1.1, False, None),
    (1.0, 2.5, 1.1, 1.1, True, "quantization error"),
    (1.0, 1.0, 1.1, 1.8, True, "imbalance"),
    (1.0, 3.0, 1.0, 2.0, True, "quantization error"),                  # both: both named
    (None, 9.0, None, 9.0, False, None),                               # no baseline: nothing to check
    (1.0, None, 1.1, None, False, None),                               # nothing new measured
    (1.0, 2.0, 1.0, 1.5, False, None),                                 # at the threshold: still fine
]


@pytest.mark.parametrize("factory", ["IVF16,PQ8x4fs", "OPQ8_32,IVF16,PQ8x4fs", "IVF16,PQ8"])
def test_codec_error_of_an_index_read_back(factory):
    """The drift's codec error of a trained index read from bytes (as the build's baseline reads it) is
    the sa_encode/sa_decode error of the same index in memory; fast-scan's sa_decode crashes once read."""
    from index_builder.reindex.drift import codec_error
    from index_builder.train.quantizer import make_index
    from shards.storage.faissio import from_bytes, to_bytes

    x = np.random.default_rng(3).standard_normal((3000, 32)).astype(np.float32)
    index = make_index(factory, 32, "l2")
    index.train(x)
    want = ((x[:500] - index.sa_decode(index.sa_encode(x[:500]))) ** 2).sum(1)
    got = codec_error(from_bytes(to_bytes(index)), x[:500])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("be,ne,bi,pi,retrain,why", DRIFT_ROWS)
def test_drift_decision(be, ne, bi, pi, retrain, why):
    d = decide(be, ne, bi, pi, max_error=2.0, max_imbalance=1.5)
    assert d.retrain is retrain
    assert (why in d.reason) if why else d.reason is None


@pytest.mark.parametrize("sizes,want", [([5, 5, 5, 5], 1.0), ([20, 0, 0, 0], 4.0), ([10, 10, 0, 0], 2.0),
                                        ([0, 0], None)])
def test_imbalance(sizes, want):
    assert imbalance(np.array(sizes)) == want


ENC = dict(name="m", revision="abc", dim=384, normalize=True, metric="ip")


@pytest.mark.parametrize("change,differs", [
    ({}, None), ({"query_prefix": "query: "}, None), ({"dtype": "fp16"}, None), ({"metric": "l2"}, None),
    ({"name": "other"}, "name"), ({"revision": "def"}, "revision"), ({"modules": "cls-pooling"}, "modules"),
    ({"dim": 768}, "dim"),
    ({"document_prefix": "passage: "}, "document_prefix"), ({"max_seq_length": 128}, "max_seq_length"),
    ({"normalize": False}, "normalize"),
])
def test_space_change(change, differs):
    why = space_change(EncoderInfo(**{**ENC, **change}), EncoderInfo(**ENC))
    assert (differs in why) if differs else why is None


# ---------------------------------------------------------------- one build, copied per test

@pytest.fixture(scope="module")
def v1(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reindex")
    src, root = tmp / "corpus", tmp / "index"
    ids, x = write_vector_corpus(str(src), n=N, d=D, files=2, seed=1)
    s = build(ray_session, source=str(src), index_root=str(root), vector_column="vector", fields=["title"],
              factory="IVF32,Flat", shards=2, part_rows=500)
    return {"src": src, "root": root, "ids": ids, "x": x, "version": s.version}


@pytest.fixture
def case(v1, tmp_path):
    """A private copy of v1's corpus and index."""
    src, root = tmp_path / "corpus", tmp_path / "index"
    shutil.copytree(v1["src"], src)
    shutil.copytree(v1["root"], root)
    return {**v1, "src": src, "root": root}


def stored_vectors(root, version: str) -> dict[int, np.ndarray]:
    """id -> the vector a version's embeddings hold for it."""
    store = Store(str(root))
    out = {}
    for rel in load_manifest(store, version).embeddings.parts:
        t = store.read_table(rel)
        x = t.column("vector").combine_chunks().values.to_numpy().reshape(-1, D)
        out.update(zip(t.column("id").to_numpy().tolist(), x))
    return out


def test_reindex_applies_new_changed_and_deleted(case, capsys):
    m = mutate(case["src"])
    s = reindex(ReindexConfig(source=str(case["src"]), index_root=str(case["root"])))
    assert s.published and s.parent == case["version"]
    assert (s.new, s.changed, s.deleted, s.unchanged) == (100, 100, 100, N - 200)
    assert not s.retrained and s.retrain_reason is None and s.drift["imbalance"] < 1.5

    store = Store(str(case["root"]))
    assert current_version(store) == s.version != case["version"]
    man = load_manifest(store, s.version)
    assert man.lineage.kind == "reindex" and man.lineage.parent == case["version"]
    assert man.docs.fields == ["title"] and len(man.shards) == 2      # the live version's options
    assert man.trained.sha256 == load_manifest(store, case["version"]).trained.sha256  # quantizer reused

    # every id exactly once: old minus deleted, plus new
    want = np.sort(np.concatenate([np.setdiff1d(case["ids"], m["gone"]), m["new"]]))
    r = Router(str(case["root"]), backend="local")
    got = np.concatenate([sh.ids() for sh in r.shards])
    np.testing.assert_array_equal(np.sort(got), want)
    sizes = np.load(io.BytesIO(store.read_bytes(man.path(man.drift.lists))))   # after the deltas, in the manifest
    li = man.index.lists
    assert sizes.sum() == len(want) and (li.largest, li.mean) == (sizes.max(), round(sizes.mean(), 1))
    assert li.imbalance == pytest.approx(imbalance(sizes)) and li.cap == 4.0
    docs = r.docs.dataset.to_table(columns=["id"]).column("id").to_numpy()
    np.testing.assert_array_equal(np.sort(docs), want)

    # changed and new documents: their new vector is their own nearest neighbour, with their new fields
    probe = np.concatenate([m["changed_x"][:5], m["new_x"][:5]])
    hits = r.search(probe, k=1, nprobe=32)
    assert [h[0].id for h in hits] == [*m["changed"][:5].tolist(), *m["new"][:5].tolist()]
    assert [h[0].fields["title"] for h in hits[:5]] == [f"changed {i}" for i in m["changed"][:5]]
    assert all(h[0].score < 1e-4 for h in hits)

    # unchanged documents keep the very vector v1 stored; deleted ones are nowhere
    before, after = stored_vectors(case["root"], case["version"]), stored_vectors(case["root"], s.version)
    kept = np.setdiff1d(case["ids"], np.concatenate([m["gone"], m["changed"]]))
    assert all(np.array_equal(before[i], after[i]) for i in kept.tolist())
    assert not set(m["gone"].tolist()) & set(after)

    # `shardex versions` tells them apart: counts, encoder, lineage
    from index_builder.cli import main

    assert main(["versions", str(case["root"]), "--json"]) == 0
    vs = json.loads(capsys.readouterr().out)
    assert [v["current"] for v in vs] == [False, True] and vs[1]["documents"] == N
    assert vs[1]["lineage"]["new"] == 100 and vs[1]["lineage"]["parent"] == case["version"]
    assert main(["versions", str(case["root"])]) == 0
    text = capsys.readouterr().out
    assert "reindex of" in text and "+100 new ~100 changed -100 deleted, quantizer reused" in text


def test_unchanged_corpus_publishes_nothing(case):
    s = reindex(ReindexConfig(source=str(case["src"]), index_root=str(case["root"])))
    assert not s.published and s.version == case["version"] and s.unchanged == N
    store = Store(str(case["root"]))
    assert current_version(store) == case["version"]
    assert [v["version"] for v in list_versions(store)] == [case["version"]]
    assert len(store.ls("embeddings")) == 1  # the run's own copy of the vectors went


def test_drifted_vectors_retrain(case):
    mutate(case["src"], shift=4.0)  # new and changed vectors far from every centroid
    s = reindex(ReindexConfig(source=str(case["src"]), index_root=str(case["root"])))
    assert s.retrained and "quantization error" in s.retrain_reason and s.drift["error"] > 2.0
    store = Store(str(case["root"]))
    man = load_manifest(store, s.version)
    assert man.lineage.retrained and man.drift.trained_in == s.version
    assert man.trained.sha256 != load_manifest(store, case["version"]).trained.sha256


def test_piled_up_lists_retrain(case):
    """New vectors right on one centroid: no error to speak of, but one list takes them all."""
    store = Store(str(case["root"]))
    from shards.storage.faissio import ivf, read_index

    trained = read_index(store, f"{vdir(case['version'])}/trained.index")  # held: the quantizer lives in it
    c = ivf(trained).quantizer.reconstruct(0)
    rng = np.random.default_rng(0)
    x = (c + rng.normal(0, 1e-3, (N, D))).astype(np.float32)
    new = np.arange(N, dtype=np.int64) * 3 + 10**7
    pq.write_table(vector_table(new, x, title=[f"pile {i}" for i in new]), case["src"] / "part-2.parquet")
    s = reindex(ReindexConfig(source=str(case["src"]), index_root=str(case["root"])))
    assert s.new == N and s.retrained and "imbalance" in s.retrain_reason
    assert s.drift["error"] < 1.0 and s.drift["imbalance"] > 1.5


def test_retrain_flag_forces_a_new_quantizer(case):
    mutate(case["src"])
    s = reindex(ReindexConfig(source=str(case["src"]), index_root=str(case["root"]), retrain=True))
    assert s.retrained and s.retrain_reason == "--retrain"


def test_keep_prunes_old_versions_and_scratch(case):
    """Three reindexes with --keep 1, a rollback, an unfinished version, then `shardex prune`."""
    from index_builder.cli import main

    root, store = str(case["root"]), Store(str(case["root"]))
    made = [case["version"]]
    for i in range(3):
        ids, x, titles = read_part(case["src"], 0)
        titles[i] = f"edited {i}"
        x[i] += 0.01
        pq.write_table(vector_table(ids, x, title=titles), case["src"] / "part-0.parquet")
        s = reindex(ReindexConfig(source=str(case["src"]), index_root=root, keep=1, grace="0"))
        made.append(s.version)
        assert s.pruned is not None and s.pruned.work  # its own scratch went at once
    # v1 v2 v3 v4 were made; each prune kept the newest and the one before it
    assert [v["version"] for v in list_versions(store)] == made[-2:]
    assert store.ls("work") == []
    used = {p.split("/")[1] for v in made[-2:] for p in load_manifest(store, v).embeddings.parts}
    assert set(store.ls("embeddings")) == used

    # roll back, leave a dead publish behind, then prune from the CLI
    assert main(["rollback", root, made[-2]]) == 0
    store.write_text("versions/v99999999-000000-dead00-0000/shard-0.index", "half a publish")
    assert main(["prune", root, "--keep", "1", "--grace", "0", "--dry-run"]) == 0
    assert "v99999999-000000-dead00-0000" in store.ls("versions")
    assert main(["prune", root, "--keep", "1", "--grace", "0"]) == 0
    assert {v["version"] for v in list_versions(store)} == set(made[-2:])  # newest, and CURRENT (rolled back to)
    # what is left of the deleted versions' directories is only what the kept ones refer to (delta versions
    # keep their parents' segments), and no version directory is left without anything in it
    refd = {p for v in made[-2:] for p, _ in load_manifest(store, v).listed()}
    for v in set(store.ls("versions")) - set(made[-2:]):
        assert {f"versions/{v}/{n}" for n in store.ls(f"versions/{v}")} <= refd, v
    assert current_version(store) == made[-2]
    assert main(["prune", root, "--keep", "0"]) == 1  # refused, one line


# ---------------------------------------------------------------- crashes: a real process, killed

def run_killed(case, ray_session, crash_at: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "SHARDEX_CRASH_AT": crash_at}
    return subprocess.run([SHARDEX, "reindex", str(case["src"]), str(case["root"])], env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("crash_at,when", [
    ("work/*/trained.index", "before publish: the live quantizer is being put in place"),
    ("work/*/version.json", "before the index stages: the run's version is being named"),
    ("versions/*/manifest.json", "during publish: every file copied, no manifest"),
    ("CURRENT", "during publish: manifest written and verified, CURRENT not moved"),
])
def test_crash_leaves_previous_version_current(case, ray_session, crash_at, when):
    m = mutate(case["src"])
    p = run_killed(case, ray_session, crash_at)
    assert p.returncode == -9, f"{when}: not killed\n{p.stderr[-3000:]}"

    store = Store(str(case["root"]))
    assert current_version(store) == case["version"], when
    live = [v["version"] for v in list_versions(store) if v["current"]]
    assert live == [case["version"]]
    r = Router(str(case["root"]), backend="local")  # a fresh reader serves v1, whole
    assert r.version == case["version"] and r.manifest.ntotal == N
    assert r.search(case["x"][:3], k=1, nprobe=32)[0][0].id == case["ids"][0]

    # run again: it finishes what the killed run started, and publishes the right thing
    s = reindex(ReindexConfig(source=str(case["src"]), index_root=str(case["root"])))
    assert s.published and current_version(store) == s.version
    assert (s.new, s.changed, s.deleted) == (100, 100, 100)
    got = np.concatenate([sh.ids() for sh in Router(str(case["root"]), backend="local").shards])
    assert len(got) == len(np.unique(got)) == N and not set(m["gone"].tolist()) & set(got.tolist())


def test_reindex_of_an_ivf_sharded_index_merged_on_disk(ray_session, tmp_path):
    """The reindex runs the build's own index stages: --sharding ivf and on-disk merges compose with it."""
    src, root = tmp_path / "corpus", tmp_path / "index"
    ids, _ = write_vector_corpus(str(src), n=N, d=D, files=2, seed=2)
    v1 = build(ray_session, source=str(src), index_root=str(root), vector_column="vector", fields=["title"],
               factory="IVF32,Flat", shards=3, sharding="ivf", merge_ram_budget="1K", part_rows=500)
    m = mutate(src)
    s = reindex(ReindexConfig(source=str(src), index_root=str(root)))
    assert s.published and not s.retrained and (s.new, s.changed, s.deleted) == (100, 100, 100)
    man = load_manifest(Store(str(root)), s.version)
    assert man.sharding.mode == "ivf" and all(sh.ivfdata for sh in man.shards) and man.lineage.parent == v1.version
    first = load_manifest(Store(str(root)), v1.version).sharding
    assert man.sharding.order == first.order == "grouped" and man.sharding.ranges == first.ranges  # the groups stay
    r = Router(str(root), backend="local")
    got = np.concatenate([sh.ids() for sh in r.shards])
    want = np.sort(np.concatenate([np.setdiff1d(ids, m["gone"]), m["new"]]))
    np.testing.assert_array_equal(np.sort(got), want)
    hits = r.search(m["changed_x"][:3], k=1, nprobe=32)
    assert [h[0].id for h in hits] == m["changed"][:3].tolist()


def test_another_list_order_retrains(ray_session, tmp_path):
    """A list's number is fixed by its quantizer: a reindex asked for k-means' order over grouped lists
    trains a new one, and its ranges are cut by vectors."""
    src, root = tmp_path / "corpus", tmp_path / "index"
    write_vector_corpus(str(src), n=N, d=D, files=2, seed=3)
    build(ray_session, source=str(src), index_root=str(root), vector_column="vector", factory="IVF32,Flat",
          shards=2, sharding="ivf", part_rows=500)
    s = reindex(ReindexConfig(source=str(src), index_root=str(root), ivf_order="kmeans"))
    assert s.retrained and "--ivf-order kmeans" in s.retrain_reason
    assert load_manifest(Store(str(root)), s.version).sharding.order == "kmeans"


def test_the_id_check_reads_unchanged_files_only_where_a_changed_one_meets_their_ids(ray_session, tmp_path):
    """An unchanged file was checked by the live version: the reindex's id check reads its row groups
    only where a changed file's id range meets theirs, and still names a repeat of one of its ids."""
    from index_builder.plan.corpus import plan_corpus
    from index_builder.reindex.incremental import checked_keys, effective_config
    from shards.errors import CorpusError

    src, root = tmp_path / "corpus", tmp_path / "index"  # its own build: a part's key holds its file's path
    write_vector_corpus(str(src), n=N, d=D, files=2, seed=1)
    v = build(ray_session, source=str(src), index_root=str(root), vector_column="vector", factory="Flat",
              part_rows=500)
    live = load_manifest(Store(str(root)), v.version)
    bcfg = effective_config(ReindexConfig(source=str(src), index_root=str(root)), live)
    keys = checked_keys(live, bcfg)
    mutate(src)  # file 1 changed, file 2 new (ids above all), file 0 as it was (the lowest ids)
    c = plan_corpus(bcfg, keys)
    rows = c.rows
    assert c.ids_read == rows[1] + rows[2] and plan_corpus(bcfg).ids_read == sum(rows)

    ids0, x0, _ = read_part(src, 0)  # a new file repeats two of file 0's ids: rows 7 and 600
    pq.write_table(vector_table(ids0[[7, 600]], x0[:2], title=["a", "b"]), src / "part-3.parquet")
    with pytest.raises(CorpusError, match=rf"part-3.parquet row 0: duplicate id {ids0[7]}, first at "
                                          r"\S*part-0.parquet row 7 "):
        plan_corpus(bcfg, keys)
    c = plan_corpus(bcfg.model_copy(update={"bad_rows": "skip"}), keys)
    assert c.rejected_ids == 2 and c.ids_read == rows[1] + rows[2] + 2 + 1000  # file 0's first 2 row groups
    assert [s.drops for s in c.shards if s.file.endswith("part-3.parquet")][0][1][0] == 1

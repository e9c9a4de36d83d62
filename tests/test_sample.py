"""The training sample read in proportion to its size (whole row groups of bounded embeddings parts),
row ranges of a part, and the metric a vector corpus gets without --metric."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from index_builder.encode.parts import ROW_GROUP_BYTES, group_rows, read_vectors, vectors_table
from index_builder.train.quantizer import draw_jobs, joined, sample, sample_parallel
from shards.storage.store import Store

from helpers import build, build_config, clustered, write_vector_corpus


def _parts(store: Store, sizes, d: int, group: int | None, seed: int = 0):
    """Embeddings parts of clustered vectors, ids 10_000 * part + row, in row groups of `group`."""
    x = clustered(sum(sizes), d, seed=seed)
    parts, at = [], 0
    for p, n in enumerate(sizes):
        rel = f"emb/part-{p:05d}.parquet"
        store.write_table(rel, vectors_table(np.arange(n, dtype=np.int64) + 10_000 * p, x[at:at + n]),
                          row_group_size=group)
        parts.append((rel, n))
        at += n
    return parts, x


def test_group_rows_keep_a_group_near_a_mib():
    assert [group_rows(d) for d in (768, 384, 96, 32)] == [256, 512, 2048, 8192]
    assert group_rows(4096) == group_rows(100_000) == 64  # never under 64 rows
    for d in (100, 768, 1000):
        r = group_rows(d)
        assert r & (r - 1) == 0 and ROW_GROUP_BYTES / 2 < r * 4 * d <= ROW_GROUP_BYTES


def test_read_vectors_reads_only_the_groups_of_its_rows(tmp_path):
    """Rows [start, stop) of a 5-group part, across group edges; a damaged last group is never
    touched by a range before it (a real fault: its column data overwritten on disk)."""
    store = Store(str(tmp_path))
    d = 1024
    (rel, n), = _parts(store, [1100], d, group_rows(d))[0]
    ids, x = read_vectors(store, rel)
    md = pq.ParquetFile(tmp_path / rel).metadata
    assert md.num_row_groups == 5 and len(ids) == n == 1100 and x.shape == (1100, d) and x.dtype == np.float32
    for a, b in [(0, 10), (250, 260), (255, 770), (1023, 1100), (500, 5000), (7, 7), (300, 200)]:
        i, v = read_vectors(store, rel, a, b)
        assert i.dtype == np.int64 and v.shape == (len(i), d) and v.flags.c_contiguous
        np.testing.assert_array_equal(i, ids[a:b])
        np.testing.assert_array_equal(v, x[a:b])
    last = md.row_group(4).column(1)
    with open(tmp_path / rel, "r+b") as f:
        f.seek(last.data_page_offset)
        f.write(b"\0" * last.total_compressed_size)
    np.testing.assert_array_equal(read_vectors(store, rel, 100, 1000)[1], x[100:1000])
    with pytest.raises(OSError):
        read_vectors(store, rel, 1000, 1100)


def test_prepare_writes_parts_in_bounded_row_groups(tmp_path):
    from index_builder.encode.parts import Layout, prepare
    from index_builder.plan.corpus import InputShard

    d = 512
    write_vector_corpus(str(tmp_path / "corpus"), n=1500, d=d, files=1)
    cfg = build_config(source=str(tmp_path / "corpus"), index_root=str(tmp_path / "index"), vector_column="vector")
    src = str(tmp_path / "corpus" / "part-0.parquet")
    r = prepare(InputShard(0, src, 0, 1500), cfg, Layout.build("fp"), d, "int")
    md = pq.ParquetFile(tmp_path / "index" / "embeddings/fp/part-00000.parquet").metadata
    assert r.rows == 1500 and md.num_row_groups == 3
    assert [md.row_group(g).num_rows for g in range(3)] == [group_rows(d)] * 2 + [1500 - 2 * group_rows(d)]


def test_sample_reads_about_its_own_bytes_and_repeats_for_a_seed(tmp_path):
    """30 parts of 10 row groups: the sample reads at most twice its bytes, from many parts, the
    same rows for the same seed and other rows for another."""
    store = Store(str(tmp_path))
    parts, x = _parts(store, [1000] * 30, 16, 100)
    s = sample(store, parts, 3000, seed=1, queries=200)
    assert s.xt.shape == (3000, 16) and s.xq.shape == (200, 16) and len(s.qids) == 200
    assert 0 < s.bytes_read <= 2 * s.xt.nbytes
    again = sample(store, parts, 3000, seed=1, queries=200)
    for a, b in [(s.xt, again.xt), (s.xq, again.xq), (s.qids, again.qids)]:
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(sample(store, parts, 3000, seed=2).xt, s.xt)
    rows = s.qids // 10_000 * 1000 + s.qids % 10_000  # each query is the corpus row its id names
    np.testing.assert_array_equal(s.xq, x[rows])
    jobs = draw_jobs(store, parts, 3000, 1)
    assert len(jobs) >= 15 and sum(len(r) for _, r in jobs) == int(np.ceil(3000 * 9 / 8 / 100))
    # drawn across the whole corpus: every third of it gives about a third of the sample
    thirds = np.bincount(np.searchsorted(np.arange(1, 3) * len(x) // 3, _rows_of(s.xt, x), "right"), minlength=3)
    assert thirds.min() > 700


def _rows_of(xt, x):
    pos = {v.tobytes(): i for i, v in enumerate(x)}
    return np.array([pos[v.tobytes()] for v in xt])


def test_sample_of_old_single_group_parts_and_of_a_small_corpus(tmp_path):
    """Parts written before bounded row groups are read whole and still sampled; a corpus not much
    bigger than the sample is read whole; an empty sample reads nothing."""
    store = Store(str(tmp_path))
    parts, x = _parts(store, [700, 0, 1300, 500, 900, 1100, 800, 600, 1000, 1200] * 4, 8, None)
    s = sample(store, parts, 2000, seed=0, queries=50)
    assert s.xt.shape == (2000, 8) and len(s.qids) == 50
    assert s.bytes_read < x.nbytes  # only some parts were read
    small = sample(store, parts[:3], 1000, seed=0)
    assert len(small.xt) == 1000 and small.bytes_read >= 2000 * 8 * 4 * 0.8  # all of 2,000 rows read
    assert len(sample(store, parts, 5000, seed=3).xt) == 5000 and len(sample(store, parts[:3], 10**6, 3).xt) == 2000
    none = sample(store, parts, 0, seed=0)
    assert len(none.xt) == 0 and none.bytes_read == 0


def test_sample_and_row_ranges_on_s3_read_what_they_read_locally(tmp_path, s3):
    """On S3 the part is opened without s3fs's read-ahead; the rows and the bytes counted are the same."""
    local, remote = Store(str(tmp_path)), Store("s3://indexes/sample", s3)
    parts, x = _parts(local, [1000] * 12, 16, 100)
    for rel, _ in parts:
        remote.write_bytes(rel, local.read_bytes(rel))
    a, b = sample(local, parts, 1000, seed=4, queries=20), sample(remote, parts, 1000, seed=4, queries=20)
    np.testing.assert_array_equal(a.xt, b.xt)
    np.testing.assert_array_equal(a.qids, b.qids)
    assert a.bytes_read == b.bytes_read <= 2 * a.xt.nbytes
    np.testing.assert_array_equal(read_vectors(remote, parts[5][0], 250, 420)[1], x[5250:5420])


def test_parallel_sample_draws_the_same_rows_as_the_sequential_one(tmp_path, ray_session):
    """One Ray task per part (what the build runs) draws exactly what sample() draws in process."""
    store = Store(str(tmp_path))
    parts, _ = _parts(store, [500, 1500, 1000, 2000] * 3, 8, 64)
    want = sample(store, parts, 900, seed=7, queries=30)
    got = joined(sample_parallel(store, parts, 900, 7, 30))
    for a, b in [(want.xt, got.xt), (want.xq, got.xq), (want.qids, got.qids)]:
        np.testing.assert_array_equal(a, b)
    assert got.bytes_read == want.bytes_read and len(got.xt) == 900 and len(got.qids) == 30


def test_train_task_records_the_bytes_it_read(tmp_path, ray_session):
    import ray

    from index_builder.train.quantizer import train_args, train_task
    from index_builder.workdir import WorkDir

    store, wd = Store(str(tmp_path)), WorkDir.of("run")
    parts, _ = _parts(store, [1000] * 40, 16, 100)
    drawn = sample_parallel(store, parts, 4000, 0, 100)
    ray.get(train_task.remote(store, wd, *train_args(drawn), factory="IVF16,Flat", d=16, metric="l2", seed=0,
                              threads=1))
    tr = json.loads(store.read_text(wd.train_record))
    assert tr["train_vectors"] == 4000 and tr["sample_bytes"] == 4000 * 16 * 4
    assert 0 < tr["sample_bytes_read"] <= 2 * tr["sample_bytes"]
    q = np.load(store.path(wd.queries))
    assert len(q["ids"]) == 100 and q["xq"].shape == (100, 16)


# ---------------------------------------------------------------- the metric of a vector corpus

def _unit_corpus(path, n=3000, d=32, files=3):
    """write_vector_corpus's files with every vector scaled to unit norm."""
    write_vector_corpus(str(path), n=n, d=d, files=files)
    for f in sorted(path.glob("*.parquet")):
        t = pq.read_table(f)
        ids, x = read_vectors(Store(str(path)), f.name)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        pq.write_table(t.set_column(1, "vector", vectors_table(ids, x).column("vector")), f, row_group_size=500)


def _planned_metric(src, **kw) -> str:
    from index_builder.encode.pool import precomputed_encoder
    from index_builder.plan.corpus import plan_corpus

    cfg = build_config(source=str(src), index_root=str(src.parent / "index"), vector_column="vector", **kw)
    return precomputed_encoder(cfg, plan_corpus(cfg)).metric


def test_vector_corpus_metric_follows_the_norms_unless_given(tmp_path, capsys):
    unit, plain = tmp_path / "unit", tmp_path / "plain"
    _unit_corpus(unit)
    write_vector_corpus(str(plain))
    assert _planned_metric(unit) == "ip"
    assert "metric: ip: every sampled vector has unit norm" in capsys.readouterr().err
    assert _planned_metric(plain) == "l2"
    err = capsys.readouterr().err
    assert "metric: l2: " in err and "are not unit norm" in err and "give --metric ip" in err
    assert _planned_metric(unit, metric="l2") == "l2" and _planned_metric(plain, metric="ip") == "ip"
    assert "metric:" not in capsys.readouterr().err  # an explicit --metric needs no reason


def test_a_unit_vector_corpus_builds_under_ip(tmp_path, ray_session):
    from shards.storage.manifest import current_version, load_manifest

    _unit_corpus(tmp_path / "corpus")
    build(ray_session, source=str(tmp_path / "corpus"), index_root=str(tmp_path / "index"),
          vector_column="vector", factory="IVF16,Flat", shards=2)
    store = Store(str(tmp_path / "index"))
    m = load_manifest(store, current_version(store))
    assert m.index.metric == "ip" and m.encoder.metric == "ip"

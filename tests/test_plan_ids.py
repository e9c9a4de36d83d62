"""index_builder/plan/ids.py and the plan's Ray path: null, out-of-range and duplicate ids found over
hash buckets, on Ray tasks above the local threshold and in process below it, with the same error
and the same --bad-rows skip drops either way, checked against a brute-force walk of the corpus."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index_builder.plan import corpus as corpus_mod
from index_builder.plan import ids as ids_mod
from index_builder.plan.corpus import int_ids, plan_corpus
from shards.errors import ConfigError, CorpusError

from helpers import build_config

RAW = "(or a hash collision of two string ids)"


def expected(files: list[str], cols: list[list], kind: str) -> list[tuple[str, int, str]]:
    """The rejects in today's order, by brute force: per file its nulls, then its out-of-range ids;
    then every repeat of an id in id order, naming the first occurrence in (file, row) order."""
    bad, seen, reps = [], {}, []
    for f, col in zip(files, cols):
        bad += [(f, r, "null id") for r, v in enumerate(col) if v is None]
        bad += [(f, r, ids_mod.range_why(v)) for r, v in enumerate(col) if kind == "int" and v is not None and v < 0]
        for r, v in enumerate(col):
            if v is None or (kind == "int" and v < 0):
                continue
            x = int(int_ids(pa.array([v]), kind)[0])
            if x in seen:
                what = "duplicate id" if kind == "int" else f"duplicate id {RAW}"
                reps.append((x, f, r, f"{what} {x}, first at {seen[x][0]} row {seen[x][1]}"))
            else:
                seen[x] = (f, r)
    order = {f: i for i, f in enumerate(files)}
    return bad + [(f, r, w) for _, f, r, w in sorted(reps, key=lambda t: (t[0], order[t[1]], t[2]))]


def write(src, cols: list[list], kind: str = "int") -> list[str]:
    src.mkdir(exist_ok=True)
    typ = pa.int64() if kind == "int" else pa.string()
    for i, col in enumerate(cols):
        t = pa.table({"id": pa.array(col, typ), "text": [f"t{i}-{r}" for r in range(len(col))]})
        pq.write_table(t, src / f"f{i:02d}.parquet", row_group_size=7)
    return [str(src / f"f{i:02d}.parquet") for i in range(len(cols))]


def messy(kind: str = "int") -> list[list]:
    """8 files of 20 rows: ids 0..159 with repeats across files (one id in 3 files), within a file,
    nulls and negative ids."""
    cols = [list(range(20 * i, 20 * i + 20)) for i in range(8)]
    for f, r, v in [(1, 3, 5), (4, 0, 5), (2, 7, 33), (7, 19, 33), (3, 2, 61), (6, 11, 140), (6, 12, 140),
                    (5, 5, 7), (0, 9, None), (5, 0, None), (2, 15, -1), (7, 1, -(2**63))]:
        cols[f][r] = v
    if kind == "str":
        cols = [[None if v is None else f"doc-{abs(v)}" for v in c] for c in cols]
    return cols


@pytest.fixture
def on_ray(monkeypatch, ray_session):
    """Force the Ray path at test size: every file and row over the local limit, buckets of 40 ids
    (4 buckets for 160 rows), scan tasks of about 50 rows and footer tasks of 3 files."""
    monkeypatch.setenv("SHARDEX_PLAN_LOCAL_FILES", "0")
    monkeypatch.setattr(ids_mod, "BUCKET_IDS", 40)
    monkeypatch.setattr(ids_mod, "SCAN_ROWS", 50)
    monkeypatch.setattr(corpus_mod, "FOOTER_FILES", 3)
    return ray_session


def drops_of(corpus) -> list[tuple[str, int, str]]:
    return [(s.file, r, w) for s in corpus.shards for r, w in s.drops]


def shape(corpus):
    return corpus.files, corpus.rows, corpus.id_kind, corpus.dim, corpus.fingerprint, corpus.rejected_ids, \
        [(s.part, s.file, s.start, s.stop, s.drops) for s in corpus.shards]


@pytest.mark.parametrize("kind", ["int", "str"])
def test_ray_path_drops_what_the_local_path_drops(tmp_path, monkeypatch, ray_session, kind):
    cols = messy(kind)
    files = write(tmp_path / "corpus", cols, kind)
    cfg = build_config(source=str(tmp_path / "corpus"), part_rows=6, bad_rows="skip")
    assert not corpus_mod.on_ray(len(files), 160)
    local = plan_corpus(cfg)
    want = expected(files, cols, kind)
    for s in local.shards:  # each part's drops: the corpus's, in today's order, that fall in its rows
        assert list(s.drops) == [(r, w) for f, r, w in want if f == s.file and s.start <= r < s.stop]
    assert local.rejected_ids == len(want) == len(drops_of(local))
    with monkeypatch.context() as m:
        m.setenv("SHARDEX_PLAN_LOCAL_FILES", "0")
        m.setattr(ids_mod, "BUCKET_IDS", 40)
        m.setattr(ids_mod, "SCAN_ROWS", 50)
        m.setattr(corpus_mod, "FOOTER_FILES", 3)
        assert corpus_mod.on_ray(len(files), 160) and ids_mod.buckets_for(160) == 4
        assert len(ids_mod.batches(local.rows)) == 3  # scan tasks of 3, 3 and 2 files
        remote = plan_corpus(cfg)
    assert shape(remote) == shape(local)
    dup = [int(int_ids(pa.array([v]), kind)[0]) for v in (cols[1][3], cols[2][7], cols[3][2], cols[6][11])]
    assert len(set(ids_mod.bucket_of(np.array(dup), 4).tolist())) > 1  # the repeats span several buckets
    three = [w for f, r, w in drops_of(remote) if f == files[4] and r == 0]
    assert three and three[0].endswith(f"first at {files[0]} row 5")  # id 5 in files 0, 1, 4: the first is named


@pytest.mark.parametrize("where,want", [
    ({(5, 0): None, (2, 15): -1}, "f02.parquet row 15: id -1 out of range"),    # first bad row in file order
    ({(3, 9): None, (3, 4): -7}, "f03.parquet row 9: null id"),                 # a file's nulls before its -ids
    ({(6, 4): 150, (7, 3): 150, (1, 0): 99}, "f04.parquet row 19: duplicate id 99, first at "),  # smallest id
    ({(2, 2): 51, (0, 0): 51, (6, 6): 140}, "f02.parquet row 2: duplicate id 51, first at "),
])
def test_ray_path_raises_what_the_local_path_raises(tmp_path, monkeypatch, ray_session, where, want):
    cols = [list(range(20 * i, 20 * i + 20)) for i in range(8)]
    for (f, r), v in where.items():
        cols[f][r] = v
    files = write(tmp_path / "corpus", cols)
    cfg = build_config(source=str(tmp_path / "corpus"), part_rows=6)
    with pytest.raises(CorpusError) as local:
        plan_corpus(cfg)
    monkeypatch.setenv("SHARDEX_PLAN_LOCAL_FILES", "0")
    monkeypatch.setattr(ids_mod, "BUCKET_IDS", 40)
    monkeypatch.setattr(ids_mod, "SCAN_ROWS", 30)
    with pytest.raises(CorpusError) as remote:
        plan_corpus(cfg)
    assert str(remote.value) == str(local.value)
    msg = str(local.value)
    assert want in msg and msg.endswith("(column 'id'); fix the row, or pass --bad-rows skip to quarantine it")
    first = expected(files, cols, "int")[0]
    assert msg.startswith(f"{first[0]} row {first[1]}: {first[2]} ")


def test_ray_path_names_the_first_bad_file(tmp_path, on_ray):
    cols = [list(range(10 * i, 10 * i + 10)) for i in range(7)]
    write(tmp_path / "corpus", cols)
    for i in (4, 6):  # in the second and third footer tasks: the first in file order is named
        pq.write_table(pa.table({"id": pa.array(cols[i], pa.float64()), "text": ["x"] * 10}),
                       tmp_path / "corpus" / f"f{i:02d}.parquet")
    (tmp_path / "corpus" / "f05.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CorpusError, match=r"f04\.parquet: id column 'id' has type double"):
        plan_corpus(build_config(source=str(tmp_path / "corpus")))


@pytest.mark.s3
def test_ray_path_on_s3(tmp_path, on_ray, s3):
    import s3fs

    cols = messy()
    local = write(tmp_path / "corpus", cols)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3}, key="testing", secret="testing")
    for f in local:
        fs.put_file(f, f"corpus/ids/{os.path.basename(f)}")
    c = plan_corpus(build_config(source="s3://corpus/ids", s3_endpoint=s3, part_rows=6, bad_rows="skip"))
    want = expected([f"s3://corpus/ids/{os.path.basename(f)}" for f in local], cols, "int")
    assert sorted(drops_of(c)) == sorted(want) and c.rows == [20] * 8 and c.rejected_ids == len(want)


def test_repeats_names_the_first_occurrence():
    a = np.array([[9, 2, 5], [4, 0, 1], [9, 0, 3]], np.int64)
    b = np.array([[9, 1, 0], [4, 3, 3], [2, 5, 5]], np.int64)
    got = ids_mod.repeats(False, b, a).tolist()
    assert got == [[4, 3, 3, 0, 1], [9, 1, 0, 0, 3], [9, 2, 5, 0, 3]]
    assert ids_mod.repeats(True, a, b).tolist() == [[4, 3, 3, 0, 1]]
    assert ids_mod.repeats(False, np.empty((0, 3), np.int64)).shape == (0, 5)


def test_scan_partitions_every_good_row_once(tmp_path):
    cols = messy()
    files = write(tmp_path / "corpus", cols)
    cfg = build_config(source=str(tmp_path / "corpus"), bad_rows="skip")
    bad, *parts = ids_mod.scan([(i, f, None) for i, f in enumerate(files)], cfg, "int", 5, False, corpus_mod.id_column)
    assert [(files[f], r, w) for f, r, w in bad] == expected(files, cols, "int")[:4]
    rec = np.concatenate(parts)
    good = [(v, f, r) for f, c in enumerate(cols) for r, v in enumerate(c) if v is not None and v >= 0]
    assert sorted(map(tuple, rec.tolist())) == sorted(good)
    assert all((ids_mod.bucket_of(p[:, 0], 5) == k).all() for k, p in enumerate(parts))
    assert sum(len(p) > 0 for p in parts) == 5


@pytest.mark.parametrize("rows,scan,want", [([5, 5, 5], 10, [[0, 1], [2]]), ([30, 1], 10, [[0], [1]]),
                                            ([0, 0], 10, [[0, 1]]), ([10], 10, [[0]])])
def test_batches(monkeypatch, rows, scan, want):
    monkeypatch.setattr(ids_mod, "SCAN_ROWS", scan)
    assert ids_mod.batches(rows) == want


def test_bad_threshold_is_one_line(monkeypatch):
    monkeypatch.setenv("SHARDEX_PLAN_LOCAL_ROWS", "lots")
    with pytest.raises(ConfigError, match=r"^\$SHARDEX_PLAN_LOCAL_ROWS='lots': not a whole number"):
        corpus_mod.on_ray(1, 1)


def test_small_corpus_is_planned_without_importing_ray(tmp_path):
    cols = messy()
    n = len(expected(write(tmp_path / "corpus", cols), cols, "int"))
    code = ("import sys; from index_builder.plan.corpus import plan_corpus; from helpers import build_config; "
            f"c = plan_corpus(build_config(source={str(tmp_path / 'corpus')!r}, bad_rows='skip')); "
            f"assert c.rejected_ids == {n}, c.rejected_ids; assert 'ray' not in sys.modules, 'ray imported'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.path.join(os.getcwd(), "tests")])}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("ranges,same,want", [
    ([[(5, 0, 9), (5, 10, 19)], [(5, 12, 14)]], [True, False], {0: [1]}),          # only the group it meets
    ([[(5, 0, 9), (5, 10, 19)], [(5, 30, 40)]], [True, False], {0: []}),           # ids beyond: nothing read
    ([[(5, 0, 9), (5, 20, 29)], [(5, 9, 9), (5, 20, 20)]], [True, False], {0: [0, 1]}),  # ends touch
    ([[(5, 0, 9), (5, None, None)], [(5, 50, 60)]], [True, False], {0: [1]}),      # no statistics: read
    ([[(5, 0, 9)], [(5, None, None)]], [True, False], {}),                         # a changed one without: all
    ([[(5, "a", "c")], [(5, "b", "b")], [(5, "x", "z")]], [True, False, True], {0: [0], 2: []}),  # string ids
    ([[(5, 0, 9)], [(0, None, None)]], [True, False], {0: []}),                    # an empty group is no range
])
def test_the_row_groups_an_unchanged_file_is_read_for(ranges, same, want):
    from index_builder.plan.known import to_read

    assert to_read(ranges, same) == want

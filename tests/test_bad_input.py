"""Bad input: one clear line naming the file and row (or the column), a non-zero exit; or, with
--bad-rows skip, the rejected rows in a quarantine Parquet with a reason, and the build goes on.

Plan-level problems (schema, ids, empty or corrupt files) fail before Ray starts, so they are
checked through the real console script in a subprocess: that is what a user sees, tracebacks
and all. Row-level problems (text, vectors) are found inside Ray workers and are checked
in-process with the shared local Ray, plus one subprocess run to prove no worker traceback
leaks to the terminal.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index_builder.cli import main
from shards.search.router import Router
from shards.storage.manifest import current_version, load_manifest
from shards.storage.store import Store

from helpers import FIX, build, clustered, good_texts, list_vectors, main_error, run_cli, text_table, write, write_vec

# ---------------------------------------------- 1. schema: missing columns (before Ray)

def test_missing_id_column(tmp_path):
    f = write(pa.table({"doc_id": [1, 2, 3], "text": ["a", "b", "c"]}), tmp_path / "c" / "one.parquet")
    rc, line = run_cli("build", f, str(tmp_path / "idx"))
    assert rc != 0
    assert f in line and "'id'" in line and "--id-column" in line
    assert "doc_id" in line  # the columns it does have, so the fix is obvious


def test_missing_text_column(tmp_path):
    f = write(pa.table({"id": [1, 2, 3], "body": ["a", "b", "c"]}), tmp_path / "c" / "one.parquet")
    rc, line = run_cli("build", f, str(tmp_path / "idx"))
    assert f in line and "'text'" in line and "--text-column" in line and "body" in line


def test_missing_vector_column(tmp_path):
    f = write(text_table([1, 2], ["a", "b"]), tmp_path / "c" / "one.parquet")
    rc, line = run_cli("build", f, str(tmp_path / "idx"), "--vector-column", "emb")
    assert f in line and "'emb'" in line and "--vector-column" in line


def test_missing_column_in_second_file_names_that_file(tmp_path):
    src = tmp_path / "c"
    write(text_table([1, 2], ["a", "b"]), src / "a.parquet")
    bad = write(pa.table({"id": [3, 4], "txt": ["c", "d"]}), src / "b.parquet")
    rc, line = run_cli("build", str(src), str(tmp_path / "idx"))
    assert bad in line and "'text'" in line and "--text-column" in line


# ------------------------------------- 2. ids: null, duplicate, out of range (before Ray)

def test_null_id(tmp_path):
    src = tmp_path / "c"
    write(text_table(range(10), good_texts(10)), src / "a.parquet")
    ids = list(range(10, 20))
    ids[6] = None
    bad = write(text_table(ids, good_texts(10, 10)), src / "b.parquet")
    rc, line = run_cli("build", str(src), str(tmp_path / "idx"))
    assert f"{bad} row 6:" in line and "null id" in line and "'id'" in line and FIX in line


def test_duplicate_id_across_files(tmp_path):
    src = tmp_path / "c"
    first = write(text_table(range(10), good_texts(10)), src / "a.parquet")
    ids = list(range(10, 20))
    ids[4] = 3  # a.parquet row 3 has id 3 already
    second = write(text_table(ids, good_texts(10, 10)), src / "b.parquet")
    rc, line = run_cli("build", str(src), str(tmp_path / "idx"))
    assert f"{second} row 4:" in line and "duplicate id 3" in line
    assert f"first at {first} row 3" in line and FIX in line


def test_duplicate_string_id_within_a_file(tmp_path):
    f = write(pa.table({"id": ["a", "b", "c", "b"], "text": ["w", "x", "y", "z"]}), tmp_path / "c" / "s.parquet")
    rc, line = run_cli("build", f, str(tmp_path / "idx"))
    assert f"{f} row 3:" in line and f"first at {f} row 1" in line and "duplicate id" in line


def test_negative_id(tmp_path):
    """faiss answers -1 for "no result": a negative id would be indexed and never found."""
    ids = list(range(10))
    ids[7] = -3
    bad = write(text_table(ids, good_texts(10)), tmp_path / "c" / "a.parquet")
    rc, line = run_cli("build", bad, str(tmp_path / "idx"))
    assert f"{bad} row 7:" in line and "id -3 out of range" in line and "string ids" in line and FIX in line
    assert not (tmp_path / "idx" / "CURRENT").exists()


def test_uint64_id_above_int64(tmp_path):
    t = pa.table({"id": pa.array([1, 2, 2**63 + 5, 4], pa.uint64()), "text": good_texts(4)})
    bad = write(t, tmp_path / "c" / "u.parquet")
    rc, line = run_cli("build", bad, str(tmp_path / "idx"))
    assert f"{bad} row 2:" in line and f"id {2**63 + 5} out of range" in line and FIX in line


# ----------------------------------------------------------- 4. empty corpus (before Ray)

def test_directory_without_parquet_files(tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    (src / "notes.txt").write_text("not a corpus")
    rc, line = run_cli("build", str(src), str(tmp_path / "idx"))
    assert str(src) in line and "empty corpus" in line and "no Parquet files" in line


def test_missing_source(tmp_path):
    src = tmp_path / "nowhere"
    rc, line = run_cli("build", str(src), str(tmp_path / "idx"))
    assert str(src) in line and "no such file or directory" in line


def test_parquet_file_with_zero_rows(tmp_path):
    f = write(text_table([], []), tmp_path / "c" / "zero.parquet")
    rc, line = run_cli("build", f, str(tmp_path / "idx"))
    assert f in line and "empty corpus" in line and "0 rows" in line


# -------------------------------------------------------- 5. corrupt files (before Ray)

def test_random_bytes_parquet(tmp_path):
    src = tmp_path / "c"
    write(text_table(range(5), good_texts(5)), src / "a.parquet")
    bad = src / "b.parquet"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    rc, line = run_cli("build", str(src), str(tmp_path / "idx"))
    assert str(bad) in line and "not a readable Parquet file" in line


def test_truncated_parquet(tmp_path):
    f = Path(write(text_table(range(500), good_texts(500)), tmp_path / "c" / "t.parquet"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    rc, line = run_cli("build", str(f), str(tmp_path / "idx"))
    assert str(f) in line and "not a readable Parquet file" in line


def test_corrupt_data_pages_with_intact_footer(tmp_path):
    """The footer reads, the id column's pages do not: still one line naming the file."""
    f = Path(write(pa.table({"id": pa.array(np.arange(5000), pa.int64()),
                             "text": good_texts(5000)}), tmp_path / "c" / "p.parquet", row_group=5000))
    md = pq.ParquetFile(str(f)).metadata.row_group(0).column(0)
    start = md.dictionary_page_offset or md.data_page_offset
    data = bytearray(f.read_bytes())
    data[start: start + md.total_compressed_size] = np.random.default_rng(1).bytes(md.total_compressed_size)
    f.write_bytes(bytes(data))
    rc, line = run_cli("build", str(f), str(tmp_path / "idx"))
    assert str(f) in line


# ---------------------------------------------- 6. vectors: wrong dim, NaN, inf (in Ray tasks)

def test_vector_wrong_dimension(ray_session, vec_corpus, capsys):
    src, ids, x = vec_corpus
    write_vec(src, ids, x, fixed=False, wrong_dim={107: 15})  # b.parquet row 7
    line = main_error(capsys, str(src), str(src.parent / "idx"), "--vector-column", "vector",
                      "--factory", "Flat", "--part-rows", "50")
    assert f"{src / 'b.parquet'} row 7:" in line and "15 values, expected 16" in line
    assert "'vector'" in line and FIX in line


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_vector_nan_or_inf(ray_session, vec_corpus, capsys, value):
    src, ids, x = vec_corpus
    x = x.copy()
    x[42, 5] = value  # a.parquet row 42
    write_vec(src, ids, x)
    line = main_error(capsys, str(src), str(src.parent / "idx"), "--vector-column", "vector",
                      "--factory", "Flat", "--part-rows", "50")
    assert f"{src / 'a.parquet'} row 42:" in line and "NaN or inf" in line and "'vector'" in line


def test_vector_null(ray_session, tmp_path, capsys):
    x = clustered(60, 8, seed=4)
    vec = pa.array([list(map(float, v)) if i != 33 else None for i, v in enumerate(x)], pa.list_(pa.float32()))
    f = write(pa.table({"id": pa.array(range(60), pa.int64()), "vector": vec}), tmp_path / "c" / "v.parquet")
    line = main_error(capsys, f, str(tmp_path / "idx"), "--vector-column", "vector", "--factory", "Flat")
    assert f"{f} row 33:" in line and "null vector" in line


def test_row_error_from_ray_worker_is_one_line_in_a_terminal(vec_corpus):
    """The same row-level error through the console script: its own Ray, several parts in
    flight when one fails; no worker traceback or 'unhandled error' may reach stderr."""
    src, ids, x = vec_corpus
    write_vec(src, ids, x, fixed=False, wrong_dim={150: 20})  # b.parquet row 50
    rc, line = run_cli("build", str(src), str(src.parent / "idx"), "--vector-column", "vector",
                       "--factory", "Flat", "--part-rows", "25", timeout=180)
    assert f"{src / 'b.parquet'} row 50:" in line and "20 values, expected 16" in line


# -------------------------------------------------- 3. text: null, empty (in encoder actors)

@pytest.mark.slow
def test_text_null_and_empty(ray_session, tmp_path, capsys):
    """One corpus per problem, each the only bad row, so each message is checked exactly; each
    build loads the real encoder once."""
    texts = good_texts(40)
    texts[17] = None
    f = write(text_table(range(40), texts), tmp_path / "null" / "t.parquet")
    line = main_error(capsys, f, str(tmp_path / "idx1"), "--factory", "Flat")
    assert f"{f} row 17:" in line and "null text" in line and "'text'" in line and FIX in line

    texts = good_texts(40)
    texts[23] = " \t \n "
    f = write(text_table(range(40), texts), tmp_path / "empty" / "t.parquet")
    line = main_error(capsys, f, str(tmp_path / "idx2"), "--factory", "Flat")
    assert f"{f} row 23:" in line and "empty text" in line and "'text'" in line


# ------------------------------------------------------------------- 7. --bad-rows skip

def test_skip_quarantines_bad_vector_rows_and_indexes_the_rest(ray_session, tmp_path):
    n, d = 2000, 16
    x = clustered(n, d, seed=5)
    x[1300, 2] = np.nan                         # b.parquet row 300: NaN
    ids = (np.arange(n) * 7 + 11).astype(object)
    ids[10] = None                               # a.parquet row 10: null id
    ids[1200] = ids[5]                           # b.parquet row 200: duplicate of a.parquet row 5
    t = pa.table({"id": pa.array(list(ids), pa.int64()), "vector": list_vectors(x, {40: d - 1})})
    src = tmp_path / "corpus"
    a = write(t.slice(0, 1000), src / "a.parquet", row_group=250)
    b = write(t.slice(1000, 1000), src / "b.parquet", row_group=250)
    root = str(tmp_path / "idx")

    s = build(ray_session, source=str(src), index_root=root, vector_column="vector", factory="IVF16,Flat",
              shards=2, bad_rows="skip", part_rows=400)

    bad = {10, 40, 1200, 1300}
    valid = sorted(int(ids[i]) for i in range(n) if i not in bad)
    assert s.rejected == 4 and s.documents == n - 4 == len(valid)
    assert any("1,996 indexed, 4 rejected" in ln and s.quarantine in ln for ln in s.lines())

    store = Store(root)
    m = load_manifest(store, current_version(store))
    assert m.source.rejected == 4 and m.source.documents == n - 4
    assert s.quarantine == f"{root}/versions/{m.version}/{m.source.quarantine}"

    q = pq.read_table(s.quarantine)
    assert q.column_names == ["file", "row", "id", "reason"] and q.num_rows == 4
    got = {(r["file"], r["row"]): r for r in q.to_pylist()}
    assert set(got) == {(a, 10), (a, 40), (b, 200), (b, 300)}
    assert got[a, 10]["id"] is None and got[a, 10]["reason"] == "null id"
    assert got[a, 40]["id"] == str(ids[40]) and got[a, 40]["reason"] == f"vector has {d - 1} values, expected {d}"
    assert got[b, 200]["id"] == str(ids[5])
    assert got[b, 200]["reason"].startswith(f"duplicate id {ids[5]}") and f"first at {a} row 5" in got[b, 200]["reason"]
    assert got[b, 300]["id"] == str(ids[1300]) and "NaN or inf" in got[b, 300]["reason"]

    r = Router(root, backend="local")
    held = np.concatenate([sh.ids() for sh in r.shards])
    assert sum(sh.ntotal() for sh in r.shards) == m.ntotal == n - 4
    assert len(held) == len(set(held.tolist())), "an id is in the index twice"
    assert sorted(held.tolist()) == valid


@pytest.mark.slow
def test_skip_quarantines_bad_text_rows(ray_session, tmp_path, capsys):
    texts = good_texts(60)
    texts[8] = None
    texts[51] = "   "
    src = tmp_path / "corpus"
    a = write(text_table(range(30), texts[:30]), src / "a.parquet")
    b = write(text_table(range(30, 60), texts[30:]), src / "b.parquet")
    root = str(tmp_path / "idx")
    capsys.readouterr()
    assert main(["build", str(src), root, "--bad-rows", "skip", "--factory", "Flat", "--part-rows", "20"]) == 0
    out = capsys.readouterr().out
    assert "58 indexed, 2 rejected" in out and "quarantine.parquet" in out  # the counts are reported

    store = Store(root)
    m = load_manifest(store, current_version(store))
    assert m.source.documents == 58 and m.source.rejected == 2 and m.docs.fields == ["text"]
    q = pq.read_table(f"{root}/versions/{m.version}/{m.source.quarantine}").to_pylist()
    assert sorted((r["file"], r["row"], r["id"], r["reason"]) for r in q) == [
        (a, 8, "8", "null text"), (b, 21, "51", "empty text")]
    r = Router(root, backend="local")
    held = sorted(np.concatenate([sh.ids() for sh in r.shards]).tolist())
    assert held == [i for i in range(60) if i not in (8, 51)]


# ------------------------------------------------------- 8. a missing or broken index root

@pytest.mark.parametrize("root, expect", [
    ("missing", "no such index root"),
    ("a-file", "is a file, not an index root"),
    ("dangling", "CURRENT: names version 'v-gone', which has no manifest; `shardex rollback"),
])
def test_versions_on_a_missing_or_broken_root(tmp_path, root, expect):
    (tmp_path / "a-file").write_text("not an index")
    (tmp_path / "dangling" / "versions").mkdir(parents=True)
    (tmp_path / "dangling" / "CURRENT").write_text("v-gone\n")
    rc, line = run_cli("versions", str(tmp_path / root))
    assert str(tmp_path / root) in line and expect in line

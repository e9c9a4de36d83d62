"""index_builder/plan/corpus.py: rows split into parts, string and int ids, the schema check, and
the corpus plan over real Parquet files (every row in one part, dropped rows in theirs)."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index_builder.plan.corpus import ID_MASK, InputShard, _check_schema, int_ids, plan_corpus, split_rows, string_ids
from shards.errors import CorpusError

from helpers import build_config


@pytest.mark.parametrize("n,part_rows,parts", [
    (0, 10, []),
    (1, 1000, [(0, 1)]),
    (10, 10, [(0, 10)]),
    (11, 10, [(0, 6), (6, 11)]),
    (10, 3, [(0, 2), (2, 5), (5, 8), (8, 10)]),
    (7, 1, [(i, i + 1) for i in range(7)]),
    (3000, 1000, [(0, 1000), (1000, 2000), (2000, 3000)]),
    (3001, 1000, [(0, 750), (750, 1500), (1500, 2251), (2251, 3001)]),
])
def test_split_rows(n, part_rows, parts):
    assert split_rows(n, part_rows) == parts


@pytest.mark.parametrize("n,part_rows", [(1, 1), (2, 3), (999, 1000), (1001, 1000), (12_345, 678),
                                         (100_000, 20_000), (100_001, 20_000), (1_000_003, 7_919)])
def test_split_rows_covers_every_row_once(n, part_rows):
    parts = split_rows(n, part_rows)
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))    # contiguous: no gap, no overlap
    sizes = [b - a for a, b in parts]
    assert len(parts) == -(-n // part_rows)                        # as few parts as part_rows allows
    assert max(sizes) <= part_rows and max(sizes) - min(sizes) <= 1
    assert all(isinstance(x, int) for p in parts for x in p)


def _blake_id(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


@pytest.mark.parametrize("values", [[], ["a"], ["doc-1", "doc-2", "doc-1"], ["", " ", "ünï©ødé", "x" * 10_000],
                                    ["os.path:join", "os.path:join "]])
def test_string_ids_table(values):
    ids = string_ids(values)
    assert ids.dtype == np.int64 and ids.shape == (len(values),)
    assert ids.tolist() == [_blake_id(v) for v in values]          # stable: defined by the string alone
    assert np.array_equal(ids, string_ids(list(values)))
    assert (ids >= 0).all() and (ids <= ID_MASK).all()


def test_string_ids_distinct_on_100k():
    values = [f"doc-{i}" for i in range(60_000)] + [f"https://example.org/{i:x}" for i in range(40_000)]
    ids = string_ids(values)
    assert len(np.unique(ids)) == len(values)
    assert (ids >= 0).all()
    assert ids[ids > 2**62].size > 0                               # the high half is used too


@pytest.mark.parametrize("col,kind,want", [
    (pa.array([3, 1, 2], pa.int32()), "int", [3, 1, 2]),
    (pa.array([2**40, 0], pa.uint64()), "int", [2**40, 0]),
    (pa.chunked_array([[1, 2], [3]], pa.int16()), "int", [1, 2, 3]),
    (pa.array(["a", "b"]), "str", [_blake_id("a"), _blake_id("b")]),
    (pa.chunked_array([["a"], ["b"]], pa.large_string()), "str", [_blake_id("a"), _blake_id("b")]),
])
def test_int_ids(col, kind, want):
    got = int_ids(col, kind)
    assert got.dtype == np.int64 and got.tolist() == want


VEC = pa.list_(pa.float32())


# (schema fields, config overrides, the id kind, or a CorpusError fragment)
SCHEMA_ROWS = [
    ([("id", pa.int64()), ("text", pa.string())], {}, "int"),
    ([("id", pa.int32()), ("text", pa.large_string())], {}, "int"),
    ([("id", pa.string()), ("text", pa.string())], {}, "str"),
    ([("doc", pa.large_string()), ("body", pa.string())], {"id_column": "doc", "text_column": "body"}, "str"),
    ([("id", pa.int64()), ("vec", VEC)], {"vector_column": "vec"}, "int"),
    ([("id", pa.int64()), ("vec", pa.list_(pa.float16(), 8))], {"vector_column": "vec"}, "int"),
    ([("id", pa.int64()), ("vec", pa.large_list(pa.int8()))], {"vector_column": "vec"}, "int"),
    ([("id", pa.int64()), ("text", pa.string()), ("title", pa.string())], {"fields": ["title"]}, "int"),
    ([("text", pa.string())], {}, "no column 'id' (columns: text); set --id-column"),
    ([("id", pa.int64())], {}, "no column 'text' (columns: id); set --text-column"),
    ([("id", pa.int64())], {"vector_column": "vec"}, "no column 'vec' (columns: id); set --vector-column"),
    ([("id", pa.int64()), ("text", pa.string())], {"fields": ["url"]}, "no column 'url'"),
    ([("id", pa.float64()), ("text", pa.string())], {}, "id column 'id' has type double"),
    ([("id", pa.int64()), ("text", pa.binary())], {}, "text column 'text' has type binary"),
    ([("id", pa.int64()), ("vec", pa.string())], {"vector_column": "vec"}, "vector column 'vec' has type string"),
    ([("id", pa.int64()), ("vec", pa.list_(pa.string()))], {"vector_column": "vec"}, "expected list<float>"),
]


@pytest.mark.parametrize("fields,overrides,want", SCHEMA_ROWS)
def test_check_schema(fields, overrides, want):
    schema = pa.schema(fields)
    c = build_config(**overrides)
    if want in ("int", "str"):
        assert _check_schema("f.parquet", schema, c) == want
    else:
        with pytest.raises(CorpusError) as e:
            _check_schema("f.parquet", schema, c)
        assert str(e.value).startswith("f.parquet: ") and want in str(e.value)


@pytest.mark.parametrize("rows,part_rows,row_group", [((10,), 3, 4), ((1000, 1, 250), 100, 64), ((0, 7), 7, 3)])
def test_plan_parts_cover_every_file_row_once(tmp_path, rows, part_rows, row_group):
    src = tmp_path / "corpus"
    src.mkdir()
    start = 0
    for f, n in enumerate(rows):
        t = pa.table({"id": pa.array(range(start, start + n), pa.int64()),
                      "text": pa.array([f"t{i}" for i in range(n)], pa.string())})
        pq.write_table(t, src / f"f{f}.parquet", row_group_size=row_group)
        start += n
    corpus = plan_corpus(build_config(source=str(src), part_rows=part_rows))
    assert corpus.rows == list(rows) and corpus.total_rows == sum(rows) and corpus.id_kind == "int"
    assert [s.part for s in corpus.shards] == list(range(len(corpus.shards)))
    for f, n in zip(corpus.files, rows):
        mine = [(s.start, s.stop) for s in corpus.shards if s.file == f]
        assert mine == split_rows(n, part_rows)
    assert sum(s.rows for s in corpus.shards) == sum(rows)
    assert all(not s.drops for s in corpus.shards)


def test_plan_skip_puts_drops_in_their_part(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    pq.write_table(pa.table({"id": pa.array([1, 2, None, 4, 2, 6], pa.int64()), "text": list("abcdef")}),
                   src / "a.parquet")
    pq.write_table(pa.table({"id": pa.array([7, 1], pa.int64()), "text": list("gh")}), src / "b.parquet")
    with pytest.raises(CorpusError, match=r"a\.parquet row 2: null id .*--bad-rows skip"):
        plan_corpus(build_config(source=str(src), part_rows=3))
    corpus = plan_corpus(build_config(source=str(src), part_rows=3, bad_rows="skip"))
    assert corpus.rejected_ids == 3
    drops = {(os.path.basename(s.file), s.start): [r for r, _ in s.drops] for s in corpus.shards}
    assert drops == {("a.parquet", 0): [2], ("a.parquet", 3): [4], ("b.parquet", 0): [1]}
    why = {r: w for s in corpus.shards for r, w in s.drops}
    assert "first at" in why[4] and "row 1" in why[4]


@pytest.mark.parametrize("typ, values, bad", [
    (pa.int64(), [5, -1, 7, -(2**63), 0], {1: -1, 3: -(2**63)}),     # faiss's -1 means "no result"
    (pa.int32(), [3, -4, None, 9, 1], {1: -4}),
    (pa.uint64(), [1, 2**63 + 5, 2**63 - 1, None, 2**64 - 1], {1: 2**63 + 5, 4: 2**64 - 1}),
    (pa.uint32(), [1, 2**32 - 1, 3, 4, 5], {}),
])
def test_plan_refuses_ids_faiss_cannot_hold(tmp_path, typ, values, bad):
    src = tmp_path / "corpus"
    src.mkdir()
    pq.write_table(pa.table({"id": pa.array(values, typ), "text": list("abcde")}), src / "a.parquet")
    nulls = sum(v is None for v in values)
    if bad and not nulls:  # (a null id is reported first)
        r = min(bad)
        with pytest.raises(CorpusError, match=rf"a\.parquet row {r}: id {bad[r]} out of range: .* string ids "
                                              r"\(column 'id'\); fix the row, or pass --bad-rows skip"):
            plan_corpus(build_config(source=str(src)))
    corpus = plan_corpus(build_config(source=str(src), bad_rows="skip"))
    why = {r: w for s in corpus.shards for r, w in s.drops}
    assert {r for r, w in why.items() if "out of range" in w} == set(bad)
    assert corpus.rejected_ids == len(bad) + nulls
    ids = [int(v) for i, v in enumerate(values) if v is not None and i not in bad]
    assert ids == int_ids(pa.array(ids, typ), "int").tolist()  # what stays converts to int64 unchanged


def test_input_shard_rows():
    assert InputShard(0, "f", 10, 25).rows == 15

"""Bad corpora, files and rows: each maker writes its input under its own directory d and returns
the `shardex` arguments; root is a copy of one good published index (two versions)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def vecs(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype("float32")


def vec_array(x: np.ndarray, fixed: bool = True) -> pa.Array:
    if fixed:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    return pa.array([list(map(float, v)) for v in x], pa.list_(pa.float32()))


def put(t: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, str(path), row_group_size=100)
    return path


def vectors_corpus(src: Path, n: int = 200, d: int = 16, x: np.ndarray | None = None, ids=None) -> Path:
    x = vecs(n, d) if x is None else x
    ids = pa.array(np.arange(len(x)) if ids is None else ids, pa.int64())
    t = pa.table({"id": ids, "vector": vec_array(x)})
    put(t.slice(0, len(x) // 2), src / "a.parquet")
    put(t.slice(len(x) // 2), src / "b.parquet")
    return src


def texts(n: int) -> list[str]:
    return [f"document number {i} about topic {i % 7}" for i in range(n)]


def build(src: Path, root: Path, *extra: str) -> list[str]:
    return ["build", str(src), str(root), "--vector-column", "vector", "--factory", "Flat", *extra]


def text_build(f: Path, root: Path, *extra: str) -> list[str]:
    return ["build", str(f), str(root), "--factory", "Flat", *extra]


# ---------------------------------------------------------------- corpus files and their schema

def missing_column(col: str):
    def make(d, root):
        t = {"id": pa.array(range(50), pa.int64()), "text": texts(50), "vector": vec_array(vecs(50, 16))}
        t.pop(col)
        f = put(pa.table(t), d / "c" / "a.parquet")
        return build(f, root) if col != "text" else text_build(f, root)
    return make


def second_file_missing_id(d, root):
    vectors_corpus(d / "c")
    put(pa.table({"vector": vec_array(vecs(10, 16))}), d / "c" / "z.parquet")
    return build(d / "c", root)


def with_ids(ids):
    def make(d, root):
        x = vecs(len(ids), 16)
        put(pa.table({"id": pa.array(ids, pa.uint64() if max(i or 0 for i in ids) > 2**63 else pa.int64()),
                      "vector": vec_array(x)}), d / "c" / "a.parquet")
        return build(d / "c" / "a.parquet", root)
    return make


def duplicate_across_files(d, root):
    vectors_corpus(d / "c", ids=[*range(100), 5, *range(101, 200)])
    return build(d / "c", root)


def duplicate_string_id(d, root):
    put(pa.table({"id": ["a", "b", "a"], "vector": vec_array(vecs(3, 16))}), d / "c" / "s.parquet")
    return build(d / "c" / "s.parquet", root)


def no_parquet(d, root):
    (d / "c").mkdir()
    (d / "c" / "notes.txt").write_text("not a corpus")
    return build(d / "c", root)


def zero_rows(d, root):
    put(pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}), d / "c" / "z.parquet")
    return text_build(d / "c" / "z.parquet", root)


def random_bytes(d, root):
    vectors_corpus(d / "c")
    (d / "c" / "b.parquet").write_bytes(np.random.default_rng(0).bytes(4096))
    return build(d / "c", root)


def truncated(d, root):
    f = vectors_corpus(d / "c") / "b.parquet"
    f.write_bytes(f.read_bytes()[:1000])
    return build(d / "c", root)


def corrupt_pages(d, root):
    f = put(pa.table({"id": pa.array(np.arange(5000), pa.int64()), "vector": vec_array(vecs(5000, 16))}),
            d / "c" / "p.parquet")
    md = pq.ParquetFile(str(f)).metadata.row_group(0).column(0)
    start = md.dictionary_page_offset or md.data_page_offset
    b = bytearray(f.read_bytes())
    b[start: start + md.total_compressed_size] = np.random.default_rng(1).bytes(md.total_compressed_size)
    f.write_bytes(bytes(b))
    return build(f, root)


# ---------------------------------------------------------------- rows (found in Ray workers)

def bad_vector(kind: str):
    def make(d, root):
        x = vecs(200, 16)
        if kind in ("nan", "inf"):
            x[42, 5] = np.nan if kind == "nan" else np.inf
            arr = vec_array(x)
        elif kind == "dim":
            rows = [list(map(float, v)) for v in x]
            rows[107] = rows[107][:15]
            arr = pa.array(rows, pa.list_(pa.float32()))
        else:
            arr = pa.array([list(map(float, v)) if i != 33 else None for i, v in enumerate(x)],
                           pa.list_(pa.float32()))
        put(pa.table({"id": pa.array(range(200), pa.int64()), "vector": arr}), d / "c" / "a.parquet")
        return build(d / "c" / "a.parquet", root)
    return make


def bad_text(value):
    def make(d, root):
        t = texts(40)
        t[17] = value
        return text_build(put(pa.table({"id": pa.array(range(40), pa.int64()), "text": t}), d / "c" / "t.parquet"),
                          root)
    return make


def skip_vectors(d, root):
    n, x = 2000, vecs(2000, 16)
    x[1300, 2] = np.nan
    ids = list(range(n))
    ids[10], ids[1200] = None, 5
    rows = [list(map(float, v)) for v in x]
    rows[40] = rows[40][:15]
    t = pa.table({"id": pa.array(ids, pa.int64()), "vector": pa.array(rows, pa.list_(pa.float32()))})
    put(t.slice(0, 1000), d / "c" / "a.parquet")
    put(t.slice(1000), d / "c" / "b.parquet")
    return ["build", str(d / "c"), str(d / "new-root"), "--vector-column", "vector", "--factory", "IVF16,Flat",
            "--bad-rows", "skip", "--json"]


def skip_texts(d, root):
    t = texts(60)
    t[8], t[51] = None, "   "
    f = put(pa.table({"id": pa.array(range(60), pa.int64()), "text": t}), d / "c" / "t.parquet")
    return ["build", str(f), str(d / "new-root"), "--factory", "Flat", "--bad-rows", "skip", "--json"]

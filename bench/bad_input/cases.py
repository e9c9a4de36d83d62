"""Every class of bad input run.py tries, with the outcome a user should get. Makers of bad corpora
and rows are in inputs.py; those of bad options, config files, query files and damaged indexes here."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import inputs as i
import numpy as np
from inputs import build, vecs, vectors_corpus


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    outcome: str                      # refused | quarantined | warned
    make: Callable[[Path, Path], list[str]]
    names: tuple[str, ...] = ()       # what the error (or warning) must name; {d} is the case's directory
    rows: int = 0                     # quarantined: rows in, and how many are rejected
    rejected: int = 0
    held: bool = False                # run while another writer (this process) holds the root's lease


def factory(s: str, n: int = 200):
    def make(d, root):
        return build(vectors_corpus(d / "c", n), root, "--factory", s)
    return make


def yaml_config(text: str):
    def make(d, root):
        (d / "build.yaml").write_text(text)
        return ["build", str(vectors_corpus(d / "c")), str(root), "--vector-column", "vector",
                "--config", str(d / "build.yaml")]
    return make


def option(*args: str):
    def make(d, root):
        c = vectors_corpus(d / "c")
        return [a.format(c=c, d=d, root=root) for a in args]
    return make


def query_file(kind: str):
    """A bad --vectors file for search, or --queries file for eval."""
    def make(d, root):
        f = d / ("q.npy" if kind != "garbage" else "q.parquet")
        if kind == "truncated":
            np.save(f, vecs(10, 16))
            f.write_bytes(f.read_bytes()[:100])
        elif kind == "dim":
            np.save(f, vecs(10, 8))
        elif kind == "empty":
            f.write_bytes(b"")
        else:
            f.write_bytes(np.random.default_rng(2).bytes(2000))
        if kind == "garbage":
            return ["eval", str(root), "--queries", str(f)]
        return ["search", str(root), "--vectors", str(f), "--local"]
    return make


def versions(root: Path) -> tuple[str, str]:
    """(the older version, CURRENT) of the seeded root."""
    cur = (root / "CURRENT").read_text().strip()
    old = next(v.name for v in (root / "versions").iterdir() if v.name != cur)
    return old, cur


def shard_file(root: Path, version: str) -> Path:
    m = json.loads((root / "versions" / version / "manifest.json").read_text())
    return root / "versions" / version / m["shards"][0]["file"]


def damaged(how: str, cmd: str):
    """A published shard truncated or a manifest's sha256 edited, then searched, evaluated or
    rolled back to (rollback: the older version is damaged)."""
    def make(d, root):
        old, cur = versions(root)
        v = old if cmd == "rollback" else cur
        f = shard_file(root, v)
        if how == "truncated":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        else:
            mf = root / "versions" / v / "manifest.json"
            m = json.loads(mf.read_text())
            m["shards"][0]["sha256"] = "0" * 64
            mf.write_text(json.dumps(m))
        return {"search": ["search", str(root), "--vectors", str(query(d)), "--local"],
                "search-actors": ["search", str(root), "--vectors", str(query(d))],
                "eval": ["eval", str(root)], "rollback": ["rollback", str(root), old]}[cmd]
    return make


def query(d: Path) -> Path:
    np.save(d / "q.npy", vecs(5, 16, seed=9))
    return d / "q.npy"


def broken_root(kind: str):
    def make(d, root):
        if kind == "file":
            (d / "a-file").write_text("not an index")
            return ["versions", str(d / "a-file")]
        if kind == "dangling":
            (root / "CURRENT").write_text("v-gone\n")
            return ["versions", str(root)]
        return ["versions", str(d / "missing")]
    return make


def zero_vectors_ip(d, root):
    x = vecs(200, 16)
    x[:150] = 0
    return build(vectors_corpus(d / "c", x=x), d / "new-root", "--metric", "ip")


def too_many_shards(d, root):
    return build(vectors_corpus(d / "c"), d / "new-root", "--shards", "1000")


C = "{d}/c"
CASES = [
    Case("missing-id-column", "corpus", "refused", i.missing_column("id"), (C,)),
    Case("missing-text-column", "corpus", "refused", i.missing_column("text"), (C, "text")),
    Case("missing-vector-column", "corpus", "refused", i.missing_column("vector"), (C, "vector")),
    Case("second-file-missing-id", "corpus", "refused", i.second_file_missing_id, ("{d}/c/z.parquet",)),
    Case("null-id", "corpus", "refused", i.with_ids([0, 1, None, 3]), ("{d}/c/a.parquet", "row 2")),
    Case("duplicate-id-across-files", "corpus", "refused", i.duplicate_across_files, ("{d}/c/b.parquet",)),
    Case("duplicate-string-id", "corpus", "refused", i.duplicate_string_id, ("{d}/c/s.parquet", "row 2")),
    Case("negative-id", "corpus", "refused", i.with_ids([0, 1, -5, 3]), ("{d}/c/a.parquet", "row 2")),
    Case("uint64-id-above-int64", "corpus", "refused", i.with_ids([0, 2**63 + 7, 2]), ("{d}/c/a.parquet", "row 1")),
    Case("directory-without-parquet", "corpus", "refused", i.no_parquet, (C,)),
    Case("missing-source", "corpus", "refused", option("build", "{d}/nowhere", "{root}"), ("{d}/nowhere",)),
    Case("parquet-with-zero-rows", "corpus", "refused", i.zero_rows, ("{d}/c/z.parquet",)),
    Case("random-bytes-parquet", "corpus", "refused", i.random_bytes, ("{d}/c/b.parquet",)),
    Case("truncated-parquet", "corpus", "refused", i.truncated, ("{d}/c/b.parquet",)),
    Case("corrupt-pages-intact-footer", "corpus", "refused", i.corrupt_pages, ("{d}/c/p.parquet",)),
    Case("vector-wrong-dimension", "rows", "refused", i.bad_vector("dim"), ("{d}/c/a.parquet", "row 107")),
    Case("vector-nan", "rows", "refused", i.bad_vector("nan"), ("{d}/c/a.parquet", "row 42")),
    Case("vector-inf", "rows", "refused", i.bad_vector("inf"), ("{d}/c/a.parquet", "row 42")),
    Case("vector-null", "rows", "refused", i.bad_vector("null"), ("{d}/c/a.parquet", "row 33")),
    Case("text-null", "rows", "refused", i.bad_text(None), ("{d}/c/t.parquet", "row 17")),
    Case("text-empty", "rows", "refused", i.bad_text(" \t \n "), ("{d}/c/t.parquet", "row 17")),
    Case("skip-bad-vector-rows", "rows", "quarantined", i.skip_vectors, rows=2000, rejected=4),
    Case("skip-bad-text-rows", "rows", "quarantined", i.skip_texts, rows=60, rejected=2),
    Case("factory-IVF0", "factory", "refused", factory("IVF0,PQ3"), ("factory", "IVF0,PQ3")),
    Case("factory-PQ-not-dividing-d", "factory", "refused", factory("IVF4,PQ5"), ("factory", "IVF4,PQ5")),
    Case("factory-unparsable", "factory", "refused", factory("lol,what"), ("factory", "lol,what")),
    Case("factory-nlist-above-N", "factory", "refused", factory("IVF4096,Flat"), ("factory", "IVF4096")),
    Case("factory-HNSW-not-mergeable", "factory", "refused", factory("HNSW32"), ("factory", "HNSW32")),
    Case("yaml-syntax-error", "config", "refused", yaml_config("shards: [2\nfactory: Flat\n"), ("{d}/build.yaml",)),
    Case("yaml-not-a-mapping", "config", "refused", yaml_config("- shards: 2\n"), ("{d}/build.yaml",)),
    Case("yaml-unknown-key", "config", "refused", yaml_config("shardz: 2\n"), ("shardz",)),
    Case("option-shards-zero", "options", "refused", option("build", "{c}", "{root}", "--shards", "0"),
         ("shards",)),
    Case("option-unknown-metric", "options", "refused",
         option("build", "{c}", "{root}", "--vector-column", "vector", "--metric", "cosine2"), ("--metric", "cosine2")),
    Case("search-vectors-truncated-npy", "queries", "refused", query_file("truncated"), ("{d}/q.npy",)),
    Case("search-vectors-empty-file", "queries", "refused", query_file("empty"), ("{d}/q.npy",)),
    Case("search-vectors-wrong-dim", "queries", "refused", query_file("dim"), ("{d}/q.npy",)),
    Case("eval-queries-garbage", "queries", "refused", query_file("garbage"), ("{d}/q.parquet",)),
    Case("search-truncated-shard", "integrity", "refused", damaged("truncated", "search"), ("shard",)),
    Case("search-wrong-sha256", "integrity", "refused", damaged("sha256", "search"), ("shard", "sha256")),
    Case("search-actors-truncated-shard", "integrity", "refused", damaged("truncated", "search-actors"), ("shard",)),
    Case("eval-truncated-shard", "integrity", "refused", damaged("truncated", "eval"), ("shard",)),
    Case("rollback-to-damaged-version", "integrity", "refused", damaged("truncated", "rollback"), ("shard",)),
    Case("second-writer-build", "writers", "refused", option("build", "{c}", "{root}", "--vector-column", "vector"),
         ("another writer", "bad-input bench"), held=True),
    Case("second-writer-rollback", "writers", "refused", lambda d, root: ["rollback", str(root), versions(root)[0]],
         ("another writer", "bad-input bench"), held=True),
    Case("versions-missing-root", "root", "refused", broken_root("missing"), ("{d}/missing",)),
    Case("versions-root-is-a-file", "root", "refused", broken_root("file"), ("{d}/a-file",)),
    Case("versions-dangling-current", "root", "refused", broken_root("dangling"), ("v-gone",)),
    Case("zero-vectors-under-ip", "warnings", "warned", zero_vectors_ip, ("zero",)),
    Case("more-shards-than-documents", "warnings", "warned", too_many_shards, ("1000",)),
]

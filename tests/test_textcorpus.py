"""The stdlib docstring corpus: size, unique ids, word floor, determinism, Parquet layout."""
from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from index_builder.demo import textcorpus
from index_builder.demo.textcorpus import COLUMNS, collect, example_queries, stdlib_docstrings, write_corpus

MIN_WORDS = 8


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return stdlib_docstrings(limit=None, min_words=MIN_WORDS)


def test_corpus_is_large(records):
    assert len(records) > 3000


def test_ids_unique(records):
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))


def test_records_have_all_fields_and_enough_words(records):
    for r in records:
        assert set(r) == set(COLUMNS)
        assert all(isinstance(r[c], str) for c in COLUMNS)
        assert r["kind"] in {"module", "class", "function"}
        assert r["id"] == r["module"] or r["id"].startswith(r["module"] + ":")
        assert len(r["text"].split()) >= MIN_WORDS
        assert r["text"] == " ".join(r["text"].split())  # whitespace normalised
        assert r["title"] and r["title"] == r["title"].strip()


def test_no_test_or_third_party_modules(records):
    skipped = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages"}
    for r in records:
        assert not skipped & set(r["module"].split("."))


def test_deterministic(records):
    assert stdlib_docstrings(limit=None, min_words=MIN_WORDS) == records


def test_limit_spans_whole_corpus(records):
    subset = textcorpus.spread(records, 100)
    assert len(subset) == 100
    assert len({r["id"] for r in subset}) == 100
    assert subset[0] == records[0]
    assert records.index(subset[-1]) >= len(records) * 0.95  # reaches the end, not a prefix
    assert textcorpus.spread(records, 0) == []
    assert textcorpus.spread(records, len(records) + 10) == records


def test_write_corpus(tmp_path):
    out = tmp_path / "corpus"
    result = write_corpus(str(out), limit=500, files=2, row_group_rows=100)
    assert result["documents"] == 500
    assert result["files"] == [str(out / "part-0.parquet"), str(out / "part-1.parquet")]
    assert sorted(os.listdir(out)) == ["part-0.parquet", "part-1.parquet"]  # no temp files left
    total, ids = 0, []
    for path in result["files"]:
        f = pq.ParquetFile(path)
        assert f.schema_arrow.names == list(COLUMNS)
        assert all(str(t) == "string" for t in f.schema_arrow.types)
        assert f.metadata.num_row_groups >= 2
        for i in range(f.metadata.num_row_groups):
            assert f.metadata.row_group(i).num_rows <= 100
        total += f.metadata.num_rows
        ids += f.read(columns=["id"]).column("id").to_pylist()
    assert total == 500
    assert len(set(ids)) == 500


def test_write_corpus_removes_stale_parts(tmp_path, monkeypatch, records):
    monkeypatch.setattr(textcorpus, "collect", lambda: (records, 0))  # skip a re-parse
    out = str(tmp_path)
    write_corpus(out, limit=30, files=3, row_group_rows=10)
    write_corpus(out, limit=30, files=2, row_group_rows=10)
    assert sorted(os.listdir(out)) == ["part-0.parquet", "part-1.parquet"]


def test_collect_skips_bad_files_and_keeps_first_duplicate(tmp_path):
    body = "one two three four five six seven eight"
    (tmp_path / "good.py").write_text(
        f'"""Module title.\n\n{body}\n"""\n'
        "if True:\n"
        f'    def f():\n        """First f.\n\n        {body}\n        """\n'
        "else:\n"
        f'    def f():\n        """Second f.\n\n        {body}\n        """\n'
        f'class C:\n    """C title.\n\n    {body}\n    """\n'
        f'    def m(self):\n        """M title.\n\n        {body}\n        """\n'
    )
    (tmp_path / "bad.py").write_text("def broken(:\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text(f'"""Test.\n\n{body}\n"""\n')
    recs, skipped = collect(root=str(tmp_path), min_words=8)
    assert skipped == 1
    assert [(r["id"], r["kind"], r["title"]) for r in recs] == [
        ("good", "module", "Module title."),
        ("good:f", "function", "First f."),
        ("good:C", "class", "C title."),
        ("good:C.m", "function", "M title."),
    ]
    assert all(r["text"] == body for r in recs)
    assert collect(root=str(tmp_path), min_words=9) == ([], 1)


def test_example_queries():
    queries = example_queries()
    assert len(queries) == 3 and all(isinstance(q, str) and q for q in queries)


# ---------------------------------------------------------------- man pages and docstring paragraphs

@pytest.mark.parametrize("line,text", [
    (r"List information about the \fBFILEs\fR (the directory).", "List information about the FILEs (the directory)."),
    (r".B ls", "ls"),
    (r'.BR "grep" (1)', "grep (1)"),
    (r".PP", ""),
    (r'.\" a comment', ""),
    (r"print C\-style escapes \(em for \fInongraphic\fP chars", "print C-style escapes  -  for nongraphic chars"),
    (r".Nm tar", "tar"),
    (r".TH LS 1", ""),
    (r"don\(aqt \s-1SMALL\s0 \&.", "don't SMALL ."),
])
def test_roff_text(line, text):
    assert textcorpus.roff_text(line) == text


MAN = r""".\" generated
.TH FROB 1 "2026" "frob 1.0"
.SH NAME
frob \- twiddle the \fBbits\fR of a file
.SH SYNOPSIS
.B frob
[\fIOPTION\fR]... FILE
.SH DESCRIPTION
.PP
Frob reads FILE and flips every bit
whose position is prime.
.TP
\fB\-n\fR
do nothing, verbosely
.SH "SEE ALSO"
.BR xxd (1)
"""


def test_man_pages(tmp_path):
    assert textcorpus.parse_man(MAN) == (
        "frob - twiddle the bits of a file",
        "Frob reads FILE and flips every bit whose position is prime. -n do nothing, verbosely")
    import gzip

    (tmp_path / "man1").mkdir()
    (tmp_path / "man8").mkdir()
    with gzip.open(tmp_path / "man1" / "frob.1.gz", "wt") as f:
        f.write(MAN)
    (tmp_path / "man1" / "redirect.1").write_text(".so man1/frob.1\n")
    os.symlink(tmp_path / "man1" / "frob.1.gz", tmp_path / "man8" / "frob.8.gz")
    (tmp_path / "man8" / "short.8").write_text(".SH NAME\nshort \\- x\n.SH DESCRIPTION\nToo short.\n")
    assert textcorpus.man_pages(str(tmp_path)) == [
        {"id": "man:frob.1", "title": "frob - twiddle the bits of a file", "module": "man1", "kind": "man",
         "text": "Frob reads FILE and flips every bit whose position is prime. -n do nothing, verbosely"}]


def test_docstring_paragraphs(tmp_path):
    para = "one two three four five six seven eight nine"
    (tmp_path / "m.py").write_text(f'"""Title.\n\n{para}\n\nshort one\n\n{para} ten\n"""\n'
                                   f'def f():\n    """F title.\n\n    {para}\n    """\n')
    recs = textcorpus.docstring_paragraphs(str(tmp_path))
    assert [(r["id"], r["title"], r["text"]) for r in recs] == [
        ("m#1", "Title.", para), ("m#3", "Title.", para + " ten"), ("m:f#1", "F title.", para)]

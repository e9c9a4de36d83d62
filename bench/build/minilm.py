"""Real embeddings for bench/build: all-MiniLM-L6-v2 vectors of text every machine has.

Documents: passages of at most WORDS words from the standard library's docstrings
(index_builder.demo.textcorpus) and from the DESCRIPTION-and-after text of the English man pages
under /usr/share/man (roff requests and font escapes stripped); for more than those give, the
docstrings of the installed packages too. Queries, held out of the
corpus: the one-line summaries from the man pages' NAME sections ("ls - list directory
contents" -> "list directory contents"), encoded as queries.

Encoding 50k passages on 2 CPU cores takes tens of minutes, so vectors are written in chunks
of CHUNK under bench/out/build/minilm-<N>/chunks/ and a re-run resumes; the finished dataset has
the layout of common.synthetic (corpus/, npy/, queries.npy, gt.npy) with metric ip.

    .venv/bin/python bench/build/minilm.py [--n 50000]
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import NQ, OUT, ground_truth, write_parts

WORDS = 60          # words per passage: near the model's useful length, and quick to encode
MIN_WORDS = 8
CHUNK = 2000
_ESC = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\\(..|\\\[[^\]]*\]|\\[&|^~0 ]|\\[*n]\(?..|\\s[-+]?\d")


def passages(text: str) -> list[str]:
    words = text.split()
    return [" ".join(words[i:i + WORDS]) for i in range(0, len(words), WORDS) if len(words[i:i + WORDS]) >= MIN_WORDS]


def roff_text(src: str) -> tuple[str, str]:
    """(NAME summary, body text) of one man page's roff source, crudely: requests dropped, escapes stripped."""
    name, body, section = [], [], None
    for line in src.splitlines():
        if line.startswith((".SH", ".Sh")):
            section = line[3:].strip().strip('"').upper()
            continue
        if line.startswith((".", "'")):
            continue
        line = _ESC.sub("", line).replace("\\-", "-").replace("\\e", "\\").strip()
        if not line:
            continue
        (name if section == "NAME" else body if section and section not in ("SYNOPSIS", "NAME") else []).append(line)
    summary = " ".join(name)
    summary = summary.split(" - ", 1)[1].strip() if " - " in summary else ""
    return summary, " ".join(body)


def man_pages() -> list[tuple[str, str]]:
    out = []
    for path in sorted(glob.glob("/usr/share/man/man[1-8]/*.gz")):
        try:
            with gzip.open(path, "rt", errors="replace") as f:
                src = f.read()
        except OSError:
            continue
        if src.startswith(".so "):  # a link to another page
            continue
        out.append(roff_text(src))
    return out


def package_docstrings() -> list[str]:
    """Docstrings (module, class, function) of the installed packages' Python files, in path order:
    the third source, for corpora larger than the standard library and the man pages give."""
    import ast
    import site

    out = []
    for root in sorted(set(site.getsitepackages())):
        for path in sorted(glob.glob(f"{root}/**/*.py", recursive=True)):
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    if doc := ast.get_docstring(node):
                        out.append(doc)
    return out


def texts(n: int) -> tuple[list[str], list[str]]:
    """(n document passages, NQ query texts), deterministic, no duplicates, queries not in the corpus."""
    from index_builder.demo.textcorpus import stdlib_docstrings

    docs, seen = [], set()
    for rec in stdlib_docstrings(min_words=MIN_WORDS):
        docs += passages(f"{rec['title']} {rec['text']}")
    pages = man_pages()
    queries = list(dict.fromkeys(s for s, _ in pages if len(s.split()) >= 3))
    for _, body in pages:
        docs += passages(body)
    if len(set(docs)) < n:  # beyond what these give (about 141k here): the packages' docstrings too
        for doc in package_docstrings():
            docs += passages(doc)
    uniq = [d for d in docs if not (d in seen or seen.add(d))]
    if len(uniq) < n or len(queries) < NQ:
        raise SystemExit(f"only {len(uniq)} passages and {len(queries)} queries here; need {n} and {NQ}")
    step = len(uniq) / n
    qstep = len(queries) / NQ
    return [uniq[int(i * step)] for i in range(n)], [queries[int(i * qstep)] for i in range(NQ)]


def make(n: int) -> str:
    path = f"{OUT}/minilm-{n}"
    if os.path.exists(f"{path}/gt.npy"):
        return path
    from shards.encoder import Encoder

    docs, queries = texts(n)
    os.makedirs(f"{path}/chunks", exist_ok=True)
    with open(f"{path}/texts.json", "w") as f:
        json.dump({"documents": docs, "queries": queries}, f)
    enc = Encoder(threads=os.cpu_count())
    t0 = time.time()
    for c in range(0, n, CHUNK):
        dst = f"{path}/chunks/{c:07d}.npy"
        if not os.path.exists(dst):
            np.save(dst + ".tmp.npy", enc.encode_documents(docs[c:c + CHUNK]))
            os.replace(dst + ".tmp.npy", dst)
            done = min(n, c + CHUNK)
            print(f"encoded {done:,}/{n:,} ({done / (time.time() - t0):.0f} docs/s this run)", flush=True)
    xb = np.concatenate([np.load(f"{path}/chunks/{c:07d}.npy") for c in range(0, n, CHUNK)])
    xq = enc.encode_queries(queries)
    write_parts(path, xb, np.arange(n, dtype=np.int64))
    np.save(f"{path}/queries.npy", xq)
    np.save(f"{path}/gt.npy", ground_truth(xb, xq, "ip"))
    with open(f"{path}/info.json", "w") as f:
        json.dump({"documents": n, "queries": NQ, "dim": int(xb.shape[1]), "model": enc.info().name,
                   "words_per_passage": WORDS, "encode_seconds_last_run": round(time.time() - t0, 1)}, f)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    print(make(ap.parse_args().n))

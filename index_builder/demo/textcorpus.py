"""A real-text demo corpus built from the running Python's standard library docstrings.

Why: demos and tests need natural-language text that exists on every machine,
including ones with no network (so no dataset download), and that is the same
on every run. The standard library's docstrings are exactly that: thousands of
English passages ("Parse command-line options...") with natural titles.

The source files are parsed with `ast`, never imported: importing stdlib modules
has side effects (antigravity opens a browser, `this` prints, tkinter needs a display).
"""
from __future__ import annotations

import ast
import os
import re
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

# Directory names never descended into: installed third-party code and test suites.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                       "lib2to3", "turtledemo", "__pycache__"})
PARSE_ERRORS = (SyntaxError, UnicodeDecodeError, ValueError, OSError)
COLUMNS = ("id", "title", "text", "module", "kind")
SCHEMA = pa.schema([(name, pa.string()) for name in COLUMNS])

_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)  # may hold nested definitions


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def source_files(root: str) -> list[str]:
    """The stdlib's .py files, relative to root and sorted, without tests and third-party code."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and d.isidentifier()]
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.endswith(".py") and name[:-3].isidentifier():
                out.append(os.path.normpath(os.path.join(rel, name)))
    return sorted(out)


def module_name(rel_path: str) -> str:
    """'email/mime/text.py' -> 'email.mime.text'; 'json/__init__.py' -> 'json'."""
    parts = rel_path[:-3].split(os.sep)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def parse_file(path: str) -> ast.Module:
    """Parse one file (bytes, so its encoding cookie is honoured); raises one of PARSE_ERRORS."""
    with open(path, "rb") as f:
        source = f.read()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. SyntaxWarning for invalid escapes
        return ast.parse(source, filename=path)


def iter_docstrings(tree: ast.Module) -> Iterator[tuple[str, str, str]]:
    """(qualname, kind, docstring) in source order; the module's own has qualname ''."""
    doc = ast.get_docstring(tree)
    if doc:
        yield "", "module", doc
    yield from _walk(tree, "")


def _walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, str, str]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _DEFS):
            qualname = f"{prefix}{child.name}"
            doc = ast.get_docstring(child)
            if doc:
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                yield qualname, kind, doc
            inner = f"{qualname}." if isinstance(child, ast.ClassDef) else f"{qualname}.<locals>."
            yield from _walk(child, inner)
        elif isinstance(child, _BLOCKS):  # if/try/with/for bodies: same scope
            yield from _walk(child, prefix)


def split_docstring(doc: str) -> tuple[str, str]:
    """(title: first non-empty line, body: the rest with whitespace runs collapsed)."""
    lines = doc.strip().splitlines()
    if not lines:
        return "", ""
    return lines[0].strip(), " ".join(" ".join(lines[1:]).split())


def make_record(module: str, qualname: str, kind: str, doc: str) -> dict:
    title, text = split_docstring(doc)
    return {"id": f"{module}:{qualname}" if qualname else module,
            "title": title, "text": text, "module": module, "kind": kind}


def collect(root: str | None = None, min_words: int = 8) -> tuple[list[dict], int]:
    """All records in deterministic order (sorted paths, then source order), and files skipped."""
    root = root or stdlib_dir()
    records, seen, skipped = [], set(), 0
    for rel in source_files(root):
        try:
            tree = parse_file(os.path.join(root, rel))
        except PARSE_ERRORS:
            skipped += 1
            continue
        module = module_name(rel)
        for qualname, kind, doc in iter_docstrings(tree):
            rec = make_record(module, qualname, kind, doc)
            if rec["id"] in seen or len(rec["text"].split()) < min_words:
                continue
            seen.add(rec["id"])
            records.append(rec)
    return records, skipped


def spread(records: list[dict], limit: int | None) -> list[dict]:
    """At most limit records, evenly spaced over the whole list (deterministic)."""
    if limit is None or limit >= len(records):
        return records
    if limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    n = len(records)
    return [records[i * n // limit] for i in range(limit)]


def stdlib_docstrings(limit: int | None = None, min_words: int = 8) -> list[dict]:
    """Docstring records of the running Python's standard library; see the module docstring."""
    records, _ = collect(min_words=min_words)
    return spread(records, limit)


def chunks(records: list[dict], files: int) -> list[list[dict]]:
    """records split into `files` contiguous, near-equal chunks."""
    q, r = divmod(len(records), files)
    bounds = [0]
    for i in range(files):
        bounds.append(bounds[-1] + q + (1 if i < r else 0))
    return [records[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def write_parquet_atomic(rows: list[dict], dest: str, row_group_rows: int) -> None:
    """Write rows to dest via a hidden temp file in the same directory, then os.replace."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    directory, name = os.path.split(dest)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp, row_group_size=row_group_rows)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_parts(path: str, keep: int) -> None:
    """Delete part-N.parquet for N >= keep, left by an earlier write with more files."""
    for name in os.listdir(path):
        stem = name[len("part-"):-len(".parquet")]
        if name.startswith("part-") and name.endswith(".parquet") and stem.isdigit() and int(stem) >= keep:
            os.remove(os.path.join(path, name))


def write_corpus(path: str, limit: int | None = 5000, files: int = 2, row_group_rows: int = 1000) -> dict:
    """Write the stdlib corpus to path/part-0.parquet ... part-{files-1}.parquet (local paths)."""
    if files < 1 or row_group_rows < 1:
        raise ValueError(f"files and row_group_rows must be >= 1, got {files} and {row_group_rows}")
    records, skipped = collect()
    records = spread(records, limit)
    if len(records) < files:
        raise ValueError(f"{len(records)} documents cannot fill {files} files; ask for fewer files")
    os.makedirs(path, exist_ok=True)
    written = []
    for i, chunk in enumerate(chunks(records, files)):
        dest = os.path.join(path, f"part-{i}.parquet")
        write_parquet_atomic(chunk, dest, row_group_rows)
        written.append(dest)
    remove_stale_parts(path, files)
    return {"documents": len(records), "files": written, "skipped_files": skipped}


def example_queries() -> list[str]:
    """Natural-language queries the stdlib docstrings answer well."""
    return [
        "parse command line options and arguments",
        "compress and decompress data with gzip",
        "send an email message over SMTP",
    ]


# ---------------------------------------------------------------- man pages: NAME line -> DESCRIPTION

MAN_ROOT = "/usr/share/man"
MAN_TEXT_CHARS = 4000          # a DESCRIPTION is cut here: the encoder reads the first 256 tokens anyway
_FONT_MACROS = frozenset({"B", "I", "BR", "BI", "IB", "IR", "RB", "RI", "SM", "SB", "Nm", "Nd", "Ar", "Fl",
                          "Cm", "Pa", "Em", "Sy", "Xr", "Va", "Dv", "Ev", "Li", "Ql", "Dq", "Sq", "Op"})
_ESCAPES = [(re.compile(r"\\f(\(..|\[[^\]]*\]|.)"), ""), (re.compile(r"\\s[+-]?\d"), ""),
            (re.compile(r"\\\((em|en)"), " - "), (re.compile(r"\\\((aq|cq)"), "'"),
            (re.compile(r"\\\((lq|rq|dq)"), '"'), (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),
            (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
            (re.compile(r"\\[&|^%:/,]"), ""), (re.compile(r"\\ "), " "), (re.compile(r"\\\*\(..|\\\*."), "")]


def roff_text(line: str) -> str:
    """The words of one roff source line: macro names and font changes dropped, escapes resolved."""
    if line.startswith(("'", ".\\\"", '.\\"')) or line.startswith("\\\""):
        return ""
    if line.startswith("."):
        parts = line[1:].split(None, 1)
        if not parts or parts[0] not in _FONT_MACROS:
            return ""
        line = parts[1] if len(parts) > 1 else ""
        line = line.replace('"', "")
    for pat, rep in _ESCAPES:
        line = pat.sub(rep, line)
    return line.strip()


def parse_man(source: str) -> tuple[str, str]:
    """(NAME line, DESCRIPTION text) of a man page's roff source (man or mdoc macros)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in source.splitlines():
        m = re.match(r'^\.S[hH]\s+"?([^"]*)"?\s*$', line)
        if m:
            current = m.group(1).strip().upper()
            sections.setdefault(current, [])
        elif current is not None:
            words = roff_text(line)
            if words:
                sections[current].append(words)
    name = " ".join(" ".join(sections.get("NAME", [])).split())
    text = " ".join(" ".join(sections.get("DESCRIPTION", [])).split())
    return name, text[:MAN_TEXT_CHARS]


def man_pages(root: str = MAN_ROOT, min_words: int = 8) -> list[dict]:
    """The English man pages installed under root (sections 1-8), as records like the docstrings':
    id 'man:ls.1', title the NAME line, text the DESCRIPTION. Links and `.so` redirects are skipped."""
    import gzip

    out = []
    for sec in sorted(d for d in (os.listdir(root) if os.path.isdir(root) else []) if re.fullmatch(r"man\d", d)):
        base = os.path.join(root, sec)
        for name in sorted(os.listdir(base)):
            path = os.path.join(base, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            try:
                with (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")) as f:
                    source = f.read().decode("utf-8", errors="replace")
            except (OSError, EOFError):
                continue
            if source.lstrip().startswith(".so "):
                continue
            title, text = parse_man(source)
            if title and len(text.split()) >= min_words:
                page = name[:-3] if name.endswith(".gz") else name
                out.append({"id": f"man:{page}", "title": title, "text": text, "module": sec, "kind": "man"})
    return out


def docstring_paragraphs(root: str | None = None, min_words: int = 8) -> list[dict]:
    """Each paragraph (blank-line separated) of every stdlib docstring as its own document: id
    'module:qualname#i', title the docstring's first line. About three times as many documents
    as whole docstrings, for corpora that need more real text than the stdlib's docstrings."""
    root = root or stdlib_dir()
    out, seen = [], set()
    for rel in source_files(root):
        try:
            tree = parse_file(os.path.join(root, rel))
        except PARSE_ERRORS:
            continue
        module = module_name(rel)
        for qualname, kind, doc in iter_docstrings(tree):
            title = doc.strip().splitlines()[0].strip()
            for i, para in enumerate(p for p in re.split(r"\n\s*\n", doc.strip()) if p.strip()):
                text = " ".join(para.split())
                key = f"{module}:{qualname}#{i}" if qualname else f"{module}#{i}"
                if len(text.split()) < min_words or key in seen:
                    continue
                seen.add(key)
                out.append({"id": key, "title": title, "text": text, "module": module, "kind": kind})
    return out

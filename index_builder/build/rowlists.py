"""rowlists: the IVF list of every row of an embeddings part under one trained index, as the add put it.

The add writes one record per piece of a part it reads (rows [start, stop)), kept rows included:
  embeddings/<fp>/lists-<t>/part-<key>.parquet.<start>-<stop>.npy   int32, one list per row
t: the first 16 hex digits of the trained index's sha256 (the manifest's trained.sha256), so a
retrain never reads another quantizer's lists. A reindex that keeps the quantizer finds the lists of
the base entries it marks dead in the records of the changed files' parts: 4 bytes a row, where
assigning their vectors again reads 4·d bytes a row and runs the coarse search. Records are named
by their part (retention keeps them with it). Two builds with one trained index may cut a part into
other pieces: their lists are the same, and read() chains any pieces that cover the part, or gives
None when they do not (the caller then assigns the vectors).
"""
from __future__ import annotations

import io
import posixpath

import numpy as np

from shards.storage.store import Store


def _dir(part: str, tfp: str) -> str:
    return f"{posixpath.dirname(part)}/lists-{tfp[:16]}"


def rel(part: str, tfp: str, start: int, stop: int) -> str:
    return f"{_dir(part, tfp)}/{posixpath.basename(part)}.{start}-{stop}.npy"


def write(store: Store, part: str, tfp: str, start: int, lists: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(lists, np.int32))
    store.write_bytes(rel(part, tfp, start, start + len(lists)), buf.getvalue())


def pieces(names: list[str], part: str) -> dict[int, int]:
    """start -> the farthest stop of the records among names (file names) of part."""
    head, out = posixpath.basename(part) + ".", {}
    for f in names:
        a, _, b = f[len(head):-4].partition("-") if f.startswith(head) and f.endswith(".npy") else ("", "", "")
        if a.isdigit() and b.isdigit():
            out[int(a)] = max(out.get(int(a), 0), int(b))
    return out


def read(store: Store, part: str, tfp: str, rows: int) -> np.ndarray | None:
    """The lists of rows [0, rows) of part, or None when its records do not cover them."""
    have, got, at = pieces(store.ls(_dir(part, tfp)), part), [], 0
    while at < rows:
        if at not in have:
            return None
        b = have[at]
        got.append(np.load(io.BytesIO(store.read_bytes(rel(part, tfp, at, b)))))
        at = b
    return np.concatenate(got).astype(np.int64) if got and at == rows else (None if rows else np.empty(0, np.int64))

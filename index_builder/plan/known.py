"""plan: what a reindex's id check need not read again: the ids of the files the live version checked.

A file whose every part is a live part (the same key: file, size, ETag or mtime, rows, and no drops)
is byte for byte a file the live version's check read, and no two such files share an id (the
check passed, or put the repeat in a drop, which changes that file's key). So a duplicate can only
involve a changed or new file, and an unchanged file's row group matters only if its id range
(the footer's statistics) meets the range of some row group of a changed file. With ids that
follow the files (sequences, time-ordered keys) that is a few row groups; with random ids it is
all of them, and the check reads what a build reads. A footer without statistics is read whole.
"""
from __future__ import annotations

import bisect


def id_ranges(md, column: str) -> list[tuple]:
    """Per row group of a file's metadata, (rows, min id, max id); the ids None without statistics."""
    j = next((i for i in range(md.num_columns) if md.schema.column(i).path == column), None)
    out = []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        st = rg.column(j).statistics if j is not None else None
        ok = st is not None and st.has_min_max
        out.append((rg.num_rows, st.min, st.max) if ok else (rg.num_rows, None, None))
    return out


def union(spans: list[tuple]) -> tuple[list, list]:
    """The sorted, disjoint (starts, stops) covering spans [(lo, hi)], inclusive."""
    lo, hi = [], []
    for a, b in sorted(spans):
        if hi and a <= hi[-1]:
            hi[-1] = max(hi[-1], b)
        else:
            lo.append(a)
            hi.append(b)
    return lo, hi


def meets(lo: list, hi: list, a, b) -> bool:
    """Whether [a, b] meets one of the disjoint spans (lo, hi)."""
    i = bisect.bisect_right(lo, b) - 1
    return i >= 0 and hi[i] >= a


def to_read(ranges: list[list[tuple]], same: list[bool]) -> dict[int, list[int]]:
    """Per unchanged file (same[fi]), the row groups the id check must read: those whose id range meets
    a changed file's row group's. {} (read everything) when a changed row group has no statistics."""
    changed = [r for fi, rs in enumerate(ranges) if not same[fi] for r in rs if r[0]]
    if any(r[1] is None for r in changed):
        return {}
    lo, hi = union([(a, b) for _, a, b in changed])
    return {fi: [g for g, (n, a, b) in enumerate(rs) if n and (a is None or meets(lo, hi, a, b))]
            for fi, rs in enumerate(ranges) if same[fi]}

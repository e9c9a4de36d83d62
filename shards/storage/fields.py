"""Stored fields per serving shard: each segment's documents (id, [source_id], stored fields) in Parquet
files sorted by id, in row groups small enough that a lookup reads a few tens of kilobytes per hit.

Layout, in versions/<v>/: shard-<s>.fields-<g>-<b>.parquet, g the generation (0: the build's; each
delta reindex writes the next, with every row of the docs files it re-read) and b numbering its files.
The manifest's FieldsInfo records each file's id range (lo..hi), so a lookup finds the file by the id,
the row group by the row groups' first ids (the file's footer, read once per replica) and reads only
those row groups' columns: a request reads O(k) rows of the shards holding its hits, however many
docs files the corpus had. Generations are searched newest first: a changed document's new row
stands over its old one. A compaction writes the shard's live rows as one new generation.
Written by index_builder/build/fields.py.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pyarrow as pa

from shards.errors import IntegrityError
from shards.storage.docstore import by_id, columns
from shards.storage.manifest import FieldsInfo, Manifest, ShardInfo
from shards.storage.store import Store

ROW_GROUP_BYTES = 64 << 10   # uncompressed bytes per row group: what one hit costs to read
FILE_BYTES = 256 << 20       # uncompressed bytes per file: what one task sorts in memory
OPEN_FILES = 256             # footers a replica holds (its row groups' statistics), the last used


def rel(version_dir: str, s: int, gen: int, b: int) -> str:
    return f"{version_dir}/shard-{s}.fields-{gen}-{b:05d}.parquet"


def row_group_rows(t: pa.Table, target: int = ROW_GROUP_BYTES) -> int:
    per = max(1, t.nbytes // max(1, t.num_rows))
    return int(np.clip(target // per, 16, 1 << 16))


def write(store: Store, path: str, t: pa.Table, gen: int) -> FieldsInfo:
    """t (sorted by id, at least one row) as one fields file; its FieldsInfo, named by path."""
    w = store.write_table(path, t, row_group_size=row_group_rows(t))
    ids = t.column("id")
    return FieldsInfo(file=path, sha256=w.sha256, bytes=w.bytes, ntotal=t.num_rows, lo=ids[0].as_py(),
                      hi=ids[-1].as_py(), gen=gen)


class ShardFields:
    """The stored fields of one shard of a version (m.docs.per_shard), read by id."""

    def __init__(self, store: Store, m: Manifest, shard: ShardInfo):
        self.store, self.m = store, m
        gens = sorted({f.gen for f in shard.fields}, reverse=True)  # newest first
        self.segs = [sorted(((m.path(f.file), f) for f in shard.fields if f.gen == g), key=lambda p: p[1].lo)
                     for g in gens]
        self._open: OrderedDict[str, tuple] = OrderedDict()

    def files(self) -> list[tuple[str, str]]:
        """(path, sha256) of every file, newest segment first."""
        return [(p, f.sha256) for seg in self.segs for p, f in seg]

    def lookup(self, ids: np.ndarray, fields: list[str]) -> dict[int, dict]:
        """{int id: {"id": public id, "fields": {...}}} for those of ids this shard holds."""
        want = np.unique(np.asarray(ids, np.int64))
        want = want[want >= 0]
        cols, out = columns(self.m.docs.id_kind, fields), {}
        for seg in self.segs:
            found = []
            for path, f in seg:
                hit = want[(want >= f.lo) & (want <= f.hi)]
                if len(hit):
                    t = self._rows(path, f, hit, cols)
                    found.append(t.column("id").to_numpy())
                    out.update(by_id(t))
            if found:
                want = np.setdiff1d(want, np.concatenate(found))
            if not len(want):
                break
        return out

    def _rows(self, path: str, f: FieldsInfo, ids: np.ndarray, cols: list[str]) -> pa.Table:
        """The rows of ids (sorted) that file path holds: only the row groups they fall in are read."""
        import pyarrow.parquet as pq

        md, firsts = self._footer(path, f)
        groups = np.unique(np.searchsorted(firsts, ids, "right") - 1)
        with self._file(path) as fh:  # the footer is held: the read fetches only those row groups
            t = pq.ParquetFile(fh, metadata=md).read_row_groups([int(g) for g in groups if g >= 0], columns=cols)
        got = t.column("id").to_numpy()
        pos = np.minimum(np.searchsorted(got, ids), max(len(got) - 1, 0))
        keep = got[pos] == ids if len(got) else np.zeros(len(ids), bool)
        return t.take(pa.array(pos[keep]))

    def _footer(self, path: str, f: FieldsInfo):
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        import pyarrow.parquet as pq

        size = self.store.size(path)
        if size != f.bytes:
            raise IntegrityError(f"{self.store.uri(path)}: {size} bytes, the manifest says {f.bytes}; "
                                 f"the version is damaged")
        with self._file(path) as fh:
            md = pq.ParquetFile(fh).metadata
        col = md.schema.to_arrow_schema().get_field_index("id")
        firsts = np.array([md.row_group(g).column(col).statistics.min for g in range(md.num_row_groups)], np.int64)
        self._open[path] = (md, firsts)
        while len(self._open) > OPEN_FILES:
            self._open.popitem(last=False)
        return md, firsts

    def _file(self, path: str):
        # on S3 no read-ahead: a row group is one ranged read, not tens of MiB around it
        return self.store.open(path, "rb", **({} if self.store.local else {"cache_type": "none"}))

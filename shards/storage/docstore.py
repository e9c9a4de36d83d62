"""Stored fields by id, read from the version's docs Parquet files (Manifest.path: encode's parts) on demand.

Only the rows asked for are read: each docs file is sorted by id, so its
row-group statistics let pyarrow skip the groups that cannot hold them. The
router never holds the docs table; it holds the dataset's file list and schema.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from shards.storage.manifest import Manifest
from shards.storage.store import Store


class DocStore:
    def __init__(self, store: Store, m: Manifest):
        paths = [store.path(m.path(f)) for f in m.docs.files]
        self.dataset = ds.dataset(paths, format="parquet", filesystem=store.fs)
        self.fields = m.docs.fields
        self.id_kind = m.docs.id_kind

    @property
    def schema(self) -> pa.Schema:
        return self.dataset.schema

    def lookup(self, ids: np.ndarray, fields: list[str] | None = None) -> dict[int, dict]:
        """{int id: {"id": public id, "fields": {...}}} for the ids that exist."""
        want = [int(i) for i in np.unique(ids) if i >= 0]
        fields = self.fields if fields is None else fields
        if not want:
            return {}
        if not fields and self.id_kind != "str":
            return {i: {"id": i, "fields": {}} for i in want}  # nothing to read
        t: pa.Table = self.dataset.to_table(columns=columns(self.id_kind, fields), filter=ds.field("id").isin(want))
        return by_id(t)


def columns(id_kind: str, fields: list[str]) -> list[str]:
    """The columns a lookup reads: the id, the public id of a string-id corpus, the fields."""
    return ["id", *(["source_id"] if id_kind == "str" else []), *fields]


def by_id(t: pa.Table) -> dict[int, dict]:
    """{int id: {"id": public id, "fields": {...}}} of a lookup's rows (columns())."""
    out = {}
    for row in t.to_pylist():
        key = row.pop("id")
        out[key] = {"id": row.pop("source_id", key), "fields": row}
    return out

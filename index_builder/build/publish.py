"""publish: copy the version's files into versions/<v>/, write the manifest, verify, then move CURRENT.

CURRENT is the last write. A run killed anywhere before it leaves the previous
version served; a half-copied versions/<v>/ has no manifest and is never listed.
"""
from __future__ import annotations

import pyarrow as pa

from shards.errors import IntegrityError
from shards.storage.manifest import FileInfo, Manifest, set_current, vdir, verify, write_manifest
from shards.storage.store import Store


def copy_files(store: Store, version: str, pairs: list[tuple[str, str]]) -> None:
    if store.exists(vdir(version)):
        raise IntegrityError(f"{store.uri(vdir(version))}: exists; a published version is never rewritten")
    for src, name in pairs:
        store.copy(src, f"{vdir(version)}/{name}")


def write_quarantine(store: Store, version: str, rejected_rels: list[str]) -> str | None:
    """All rejected rows, with their reasons, in one Parquet file of the version."""
    tables = [store.read_table(r) for r in rejected_rels if store.exists(r)]
    if not tables:
        return None
    store.write_table(f"{vdir(version)}/quarantine.parquet", pa.concat_tables(tables))
    return "quarantine.parquet"


def file_info(store: Store, version: str, name: str, ntotal: int | None = None) -> FileInfo:
    rel = f"{vdir(version)}/{name}"
    return FileInfo(file=name, sha256=store.sha256(rel), bytes=store.size(rel), ntotal=ntotal)


def publish(store: Store, m: Manifest) -> Manifest:
    """Write and verify the manifest (its files are already in place), then point CURRENT at it."""
    write_manifest(store, m)
    verify(store, m)
    set_current(store, m.version)
    return m

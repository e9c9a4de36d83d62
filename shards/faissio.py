"""faiss indexes on storage, and the few index facts shardex needs (nprobe, ids, metric)."""
from __future__ import annotations

import numpy as np

from .store import Store


def faiss():
    import faiss as _faiss  # lazy: the CLI's --help and the router's HTTP layer stay light

    return _faiss


def metric_type(metric: str) -> int:
    f = faiss()
    return f.METRIC_INNER_PRODUCT if metric == "ip" else f.METRIC_L2


def keep_max(metric: str) -> bool:
    """Inner product: larger is better. L2: smaller is better."""
    return metric == "ip"


def to_bytes(index) -> bytes:
    return faiss().serialize_index(index).tobytes()


def from_bytes(data: bytes):
    return faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))


def write_index(store: Store, rel: str, index) -> None:
    store.write_bytes(rel, to_bytes(index))


def read_index(store: Store, rel: str):
    return from_bytes(store.read_bytes(rel))


def ivf(index):
    """The IndexIVF inside (through pre-transforms and wrappers), or None for a flat index."""
    try:
        return faiss().extract_index_ivf(index)
    except RuntimeError:
        return None


def set_nprobe(index, nprobe: int | None) -> None:
    i = ivf(index)
    if i is not None and nprobe:
        i.nprobe = int(nprobe)


def nlist(index) -> int | None:
    i = ivf(index)
    return int(i.nlist) if i is not None else None


def index_ids(index) -> np.ndarray:
    """Every id stored in the index (IVF inverted lists or an IDMap), unsorted."""
    f = faiss()
    i = ivf(index)
    if i is None:
        return f.vector_to_array(f.downcast_index(index).id_map).astype(np.int64)
    inv = i.invlists
    parts = [f.rev_swig_ptr(inv.get_ids(l), inv.list_size(l)).copy()
             for l in range(inv.nlist) if inv.list_size(l)]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def quantizer_bytes(index) -> bytes:
    """What must be identical between indexes that are merged: the trained index, emptied."""
    f = faiss()
    c = f.clone_index(index)
    c.reset()
    return to_bytes(c)

"""faiss indexes on storage, and the few index facts shardex needs (nprobe, ids, metric)."""
from __future__ import annotations

import os
import sys
import uuid
from contextlib import contextmanager

import numpy as np

from shards.storage.cache import download, evict, local_dir
from shards.storage.store import Store

# OpenBLAS picks its kernels from the CPU model, and the one faiss-cpu's wheels bundle (0.3.15) does
# not know newer ones: on an Ice Lake Xeon (model 106) it runs the SSE3 "Prescott" kernels, and
# faiss's distance computations (k-means, flat search, the add's assignment) ran 5x slower here
# (18 against 93 GFLOP/s for a 100k x 4096 x 96 search on 2 threads). The CPU's own flags say which
# kernels it can run; OPENBLAS_CORETYPE must be set before the library loads. A value already set wins.
CORES = (("SkylakeX", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}), ("Haswell", {"avx2", "fma"}))


def blas_core(flags: set[str]) -> str | None:
    """The OpenBLAS kernels a CPU with these /proc/cpuinfo flags runs best, or None (let it detect)."""
    return next((name for name, need in CORES if need <= flags), None)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((x for x in f if x.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


def faiss():
    if "faiss" not in sys.modules and "OPENBLAS_CORETYPE" not in os.environ:
        core = blas_core(cpu_flags())
        if core:
            os.environ["OPENBLAS_CORETYPE"] = core
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


def from_bytes(data: bytes, io_flags: int = 0):
    return faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8), io_flags)


def write_index(store: Store, rel: str, index) -> None:
    """On a local store faiss writes the file itself (then it is renamed into place): no serialized
    copies in memory, which for a big shard were twice its size on top of it."""
    if not store.local:
        store.write_bytes(rel, to_bytes(index))
        return
    path = store.path(rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        faiss().write_index(index, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_index(store: Store, rel: str, io_flags: int = 0):
    return from_bytes(store.read_bytes(rel), io_flags)


def no_search_flags() -> int:
    """io_flags for an index that is added to, cut or merged but not searched: IVFPQ's table of
    precomputed distances (nlist x M x 256 floats, 134 MB at IVF4096,PQ32) is not built on read.
    Building it took most of the time of reading a part's sub-index."""
    return faiss().IO_FLAG_SKIP_PRECOMPUTE_TABLE


def ivf(index):
    """The IndexIVF inside (through pre-transforms and wrappers), or None for a flat index."""
    try:
        return faiss().extract_index_ivf(index)
    except RuntimeError:
        return None


# An HNSW coarse quantizer (a factory IVF{nlist}_HNSW32,...) explores this many candidates per list
# probed; with faiss's default efSearch (16) it would find few of 64 lists. At nlist 65,536 this
# finds 0.996 of the nprobe nearest lists (bench/serve/coarse.py).
HNSW_EF_PER_PROBE = 2.0


def coarse_ef(nprobe: int, ef_per_probe: float = HNSW_EF_PER_PROBE) -> int:
    return max(16, int(np.ceil(ef_per_probe * nprobe)))


def hnsw_quantizer(ivf_index):
    """ivf_index's coarse quantizer when it is an HNSW graph, else None."""
    q = faiss().downcast_index(ivf_index.quantizer)
    return q if isinstance(q, faiss().IndexHNSW) else None


def quantizer_params(ivf_index, nprobe: int, ef_per_probe: float = HNSW_EF_PER_PROBE):
    """Per-call parameters of ivf_index's coarse quantizer for nprobe lists: efSearch for an HNSW
    one (its default, 16, would find few of 64 lists), None for a flat one."""
    if hnsw_quantizer(ivf_index) is None:
        return None
    return faiss().SearchParametersHNSW(efSearch=coarse_ef(nprobe, ef_per_probe))


def set_nprobe(index, nprobe: int | None) -> None:
    """nprobe on the shared index (eval, tune), and its HNSW quantizer's efSearch to match."""
    i = ivf(index)
    if i is not None and nprobe:
        i.nprobe = int(nprobe)
        if (q := hnsw_quantizer(i)) is not None:
            q.hnsw.efSearch = coarse_ef(int(nprobe))


def nlist(index) -> int | None:
    i = ivf(index)
    return int(i.nlist) if i is not None else None


def set_ntotal(index, n: int) -> None:
    """IndexPreTransform keeps its own ntotal: bring every wrapper level in line with the IVF
    after its lists were filled or emptied behind the wrapper's back (add_core, copy_subset_to)."""
    f = faiss()
    index = f.downcast_index(index)
    while isinstance(index, f.IndexPreTransform):
        index.ntotal = n
        index = f.downcast_index(index.index)


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


# ---------------------------------------------------------------- pre-transforms and the coarse quantizer

def pretransform(index, x: np.ndarray) -> np.ndarray:
    """x through the index's OPQ/PCA chain (IndexPreTransform), as the index sees it; x itself when none."""
    f = faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    index = f.downcast_index(index)
    while isinstance(index, f.IndexPreTransform):
        for i in range(index.chain.size()):
            x = index.chain.at(i).apply(x)
        index = f.downcast_index(index.index)
    return x


def untransform(index, y: np.ndarray) -> np.ndarray:
    """y, as the IVF index under index's OPQ/PCA chain sees vectors, back in the input space."""
    f = faiss()
    top = f.downcast_index(index)
    if not isinstance(top, f.IndexPreTransform):
        return y
    y = np.ascontiguousarray(y, dtype=np.float32)
    out = np.empty((len(y), top.d), np.float32)
    top.reverse_chain(len(y), f.swig_ptr(y), f.swig_ptr(out))
    return out


def coarse_search(trained_index, xq: np.ndarray, nprobe: int,
                  ef_per_probe: float = HNSW_EF_PER_PROBE) -> tuple[np.ndarray, np.ndarray]:
    """(distances, lists) [nq, nprobe]: what the IVF index's own search probes for these queries."""
    i = ivf(trained_index)
    if i is None:
        raise ValueError("coarse_search: the index has no IVF quantizer (a flat index probes nothing)")
    k = min(int(nprobe), int(i.nlist))
    return i.quantizer.search(pretransform(trained_index, xq), k, params=quantizer_params(i, k, ef_per_probe))


def probed_lists(trained_index, xq: np.ndarray, nprobe: int) -> np.ndarray:
    """The IVF lists [nq, nprobe] each query probes: the pre-transform chain, then quantizer.search.
    With --sharding ivf, routing.shards_for_lists turns them into the shards to ask."""
    return coarse_search(trained_index, xq, nprobe)[1]


def search_preassigned(index, xq: np.ndarray, k: int, coarse: tuple[np.ndarray, np.ndarray]):
    """(D, I) of an IVF index searched in the lists given (coarse_search's output), not its own choice.
    A shard searched this way probes exactly the lists the router computed, ties in the
    coarse quantizer included."""
    i = ivf(index)
    Dq, Iq = coarse
    i.nprobe = Iq.shape[1]
    return i.search_preassigned(pretransform(index, xq), k, np.ascontiguousarray(Iq, dtype=np.int64),
                                np.ascontiguousarray(Dq, dtype=np.float32))


# ---------------------------------------------------------------- shards on storage, in RAM or on disk

@contextmanager
def faiss_quiet():
    """faiss's on-disk code printf()s notes (an .ivfdata resized, its path fixed up) on stdout,
    where a `--json` caller reads its answer: file descriptor 1 goes to /dev/null meanwhile."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def read_ondisk(index_path: str):
    """An index whose inverted lists live in a .ivfdata file beside it, mmapped read-only.
    The .ivfdata is found next to the .index (its name kept, its directory fixed up)."""
    f = faiss()
    with faiss_quiet():
        return f.read_index(index_path, f.IO_FLAG_ONDISK_SAME_DIR | f.IO_FLAG_READ_ONLY)


def fetch_files(store: Store, dir_rel: str, names: list[tuple[str, int | None]], local_dir: str) -> None:
    """Download dir_rel/<name> for each (name, expected size) into local_dir, names kept (so an
    .index finds its .ivfdata); a file already there at its expected size is reused. Work dir files only:
    a published version's are fetched by fetch_verified."""
    os.makedirs(local_dir, exist_ok=True)
    for name, size in names:
        dst = os.path.join(local_dir, name)
        if os.path.exists(dst) and (size is None or os.path.getsize(dst) == size):
            continue
        tmp = f"{dst}.tmp-{uuid.uuid4().hex[:8]}"
        rel = f"{dir_rel}/{name}"
        store.call(lambda _, r=rel, t=tmp: download(store, r, t), store.path(rel))
        os.replace(tmp, dst)


def fetch_verified(store: Store, dir_rel: str, fileinfo, local_dir: str) -> None:
    """The entry's .index and .ivfdata as local copies checked against the manifest (integrity.fetch_checked)."""
    from shards.storage.integrity import base, fetch_checked

    os.makedirs(local_dir, exist_ok=True)
    for name, sha, size in [(base(fileinfo.file), fileinfo.sha256, fileinfo.bytes),
                            (base(fileinfo.ivfdata), fileinfo.ivfdata_sha256 or "", fileinfo.ivfdata_bytes)]:
        fetch_checked(store, f"{dir_rel}/{name}", sha, size, os.path.join(local_dir, name))


def read_verified(store: Store, dir_rel: str, fileinfo, io_flags: int = 0, cache_dir: str | None = None):
    """dir_rel/<fileinfo.file> read into RAM once it matches its manifest entry: a local file is hashed
    once per process while unchanged; one on S3 is fetched into the node's cache (hashed as it is
    written, once per cached copy: shards/storage/cache.py), then read from there, so RAM holds
    the index once, never its bytes beside it.
    dir_rel: the file's directory (Manifest.dir_of for a published one); its name's last part is taken."""
    from shards.storage.integrity import base, check_path, fetch_checked

    name = base(fileinfo.file)
    rel = f"{dir_rel}/{name}"
    if store.local:
        check_path(store.path(rel), store.uri(rel), fileinfo.sha256, fileinfo.bytes)
        return faiss().read_index(store.path(rel), io_flags)
    d = local_dir(store, dir_rel, cache_dir)
    fetch_checked(store, rel, fileinfo.sha256, fileinfo.bytes, os.path.join(d, name))
    evict(cache_dir)
    return faiss().read_index(os.path.join(d, name), io_flags)


def open_shard_file(store: Store, dir_rel: str, fileinfo, cache_dir: str | None = None, verified: bool = False):
    """The index dir_rel/<fileinfo.file>: mmapped from the store (local) or from a local copy (S3)
    when it has an .ivfdata; read into RAM otherwise. verified: every file is first checked against
    fileinfo's sha256 (a published version; a work dir's merged shards are checked by their merge).
    dir_rel: the directory of the .index and its .ivfdata; the names' last parts are taken."""
    from shards.storage.integrity import base

    name, data = base(fileinfo.file), base(fileinfo.ivfdata or "")
    rel = f"{dir_rel}/{name}"
    if not fileinfo.ivfdata:
        if verified:
            return read_verified(store, dir_rel, fileinfo)
        return faiss().read_index(store.path(rel)) if store.local else read_index(store, rel)
    if store.local:
        if verified:
            from shards.storage.integrity import check_info

            check_info(store, dir_rel, fileinfo)
        return read_ondisk(store.path(rel))
    d = local_dir(store, dir_rel, cache_dir)
    if verified:
        fetch_verified(store, dir_rel, fileinfo, d)
    else:
        fetch_files(store, dir_rel, [(name, fileinfo.bytes), (data, fileinfo.ivfdata_bytes)], d)
    evict(cache_dir)
    return read_ondisk(os.path.join(d, name))


def load_shard(store: Store, version, fileinfo, cache_dir: str | None = None):
    """One published shard, its files checked against the manifest's sha256 before faiss reads them
    (shards/storage/integrity.py), then its ntotal. A shard merged on disk (fileinfo.ivfdata) is
    mmapped: in place on a local store, from a verified local copy under cache_dir (default
    cache.cache_root()) when on S3. Others are read into RAM. version: its Manifest, or its name (the
    manifest is then read, to find where the shard's files are)."""
    from shards.errors import IntegrityError
    from shards.storage.manifest import load_manifest

    m = load_manifest(store, version) if isinstance(version, str) else version
    index = open_shard_file(store, m.dir_of(fileinfo), fileinfo, cache_dir, verified=True)
    if fileinfo.ntotal is not None and index.ntotal != fileinfo.ntotal:
        raise IntegrityError(f"{store.uri(m.path(fileinfo.file))}: holds {index.ntotal} vectors, "
                             f"the manifest says {fileinfo.ntotal}")
    return index

"""One serving shard: load it (checked against the manifest) and answer top-k searches, filtered or not."""
from __future__ import annotations

import os
import tempfile
from functools import cached_property

import numpy as np

from shards.errors import IntegrityError, SearchError
from shards.search.filters import Attributes, SelectionCache
from shards.storage import segments
from shards.storage.faissio import faiss, index_ids, ivf, load_shard, quantizer_params
from shards.storage.fields import ShardFields
from shards.storage.manifest import FileInfo, Manifest, load_manifest
from shards.storage.refine import RefineStore
from shards.storage.store import Store

NPROBE_GROWTH = 4   # a filtered search that comes back short retries with nprobe this many times larger
DEAD_MARGIN = 16    # results a segmented shard asks for beyond k (at least k more), to drop dead ones after


class ShardSearcher:
    def __init__(self, store: Store, version: str | Manifest, shard: FileInfo, threads: int | None = None,
                 held=None):
        """held: where a serving replica keeps loaded segments (shards/search/held.py), asked for the
        base and each delta before they are read; None reads them."""
        self.threads = threads
        if threads:
            faiss().omp_set_num_threads(threads)
        m = load_manifest(store, version) if isinstance(version, str) else version
        self.index = held.base(store, m, shard) if held else load_shard(store, m, shard)  # checked, mmapped
        self.name = shard.file
        self.stored = ShardFields(store, m, shard) if m.docs.per_shard else None  # this shard's own fields
        self.refine = RefineStore.of(store, m, shard)  # its vectors by id, mmapped: the rerank's
        self.refine_factor, self.metric = m.search.refine_factor or 0, m.index.metric
        self.seg = None  # a shard with delta segments or a dead set is searched through them
        self.rows, self.attr_bytes = None, 0
        if getattr(shard, "segmented", False):
            self.seg = segments.load(store, m, shard, self.index, held.delta if held else segments.read_delta)
            if self.seg.scan is None:  # searched as one stacked index; else the base beside its deltas' scan
                self.index = self.seg.index
        if self._ivf is not None:
            # faiss parallelizes the default mode (0) in search() only, around search_preassigned, so a shard
            # scanning the router's lists ran one thread whatever `threads` said; mode 3 splits the queries
            # inside search_preassigned (dynamically), and search() with it gives the same results
            self._ivf.parallel_mode = 3

    @cached_property
    def _ivf(self):
        return ivf(self.index)

    @property
    def nlist(self) -> int:
        return int(self._ivf.nlist) if self._ivf is not None else 1

    def load_attributes(self, store: Store, m: Manifest, kinds: dict[str, str],
                        prev: ShardSearcher | None = None) -> int:
        """Hold the filterable columns of this shard's own documents; returns their bytes.

        Every docs file is read with only the id and those columns, and only this shard's
        rows are kept, so a shard holds 1/S of the attributes and none of the text. With
        prev (this shard in a version loaded before), only docs files prev did not have are
        read: prev's rows of entries still live stay, those files' rows replace them.
        Rows are keyed by entry (an id in a base, negative in a delta), so a filter's
        selection names live entries only."""
        self.kinds, self.docs, self.docs_read = kinds, set(self._sources(m)), 0
        rows = self._rows_since(store, m, kinds, prev) if prev is not None else None
        if rows is None or len(rows) != self.ntotal():  # prev could not say (none held, or a row short)
            rows = self._rows(store, m, [f for f, _ in self._sources(m)], kinds)
        self.rows, self.attrs = rows, Attributes.from_table(rows, kinds)
        if len(self.attrs) != self.ntotal():
            raise IntegrityError(f"{self.name}: {self.ntotal()} vectors but {len(self.attrs)} rows of "
                                 f"{m.version}'s docs files carry its ids")
        self.selections = SelectionCache()
        self.attr_bytes = self.attrs.nbytes()
        return self.attr_bytes

    def _rows(self, store: Store, m: Manifest, files: list[str], kinds: dict[str, str]):
        """The id (as entry key) and `kinds` columns of this shard's live rows in docs files `files`."""
        keys, ids = self._live()
        rows = _own_rows(store, m, ids, list(kinds), files)
        self.docs_read += len(files)
        return rows if self.seg is None else rows.set_column(0, "id", _keys_of(rows.column("id").to_numpy(),
                                                                               ids, keys))

    def _rows_since(self, store: Store, m: Manifest, kinds: dict[str, str], prev: ShardSearcher):
        """prev's rows of entries still live, overlaid by the rows of docs files new since prev;
        None when prev holds none of the same columns."""
        import pyarrow as pa

        if prev.rows is None or prev.kinds != kinds:
            return None
        new = [f for f, sha in self._sources(m) if (f, sha) not in prev.docs]
        fresh = self._rows(store, m, new, kinds) if new else prev.rows.schema.empty_table()
        k = prev.rows.column("id").to_numpy()
        keep = np.isin(k, self._live()[0]) & ~np.isin(k, fresh.column("id").to_numpy())
        return pa.concat_tables([prev.rows.filter(pa.array(keep)), fresh.cast(prev.rows.schema)])

    def _sources(self, m: Manifest) -> list[tuple[str, str]]:
        """(path, sha256) of the files holding this shard's rows: its own fields files (newest first),
        or, in a version without them, every docs file."""
        return self.stored.files() if self.stored is not None else _docs(m)

    def lookup(self, ids: np.ndarray, fields: list[str]) -> dict[int, dict]:
        """The stored fields of ids (hits of this shard), read from its own fields files."""
        if self.stored is None:
            raise SearchError(f"{self.name}: this version keeps no fields per shard")
        return self.stored.lookup(ids, fields)

    def _live(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, ids) of the live entries, sorted by id (a base entry's key is its id)."""
        if self.seg is not None:
            return self.seg.live()
        ids = np.sort(index_ids(self.index))
        return ids, ids

    def search(self, xq: np.ndarray, k: int, nprobe: int | None = None, flt: list | None = None,
               coarse: tuple[np.ndarray, np.ndarray] | None = None, refine: int | None = None):
        """(D, I) of the k best per query. With a refine store and a refine factor R (refine, or the
        version's tuned one when None; 0: none), the k x R best by the codes, reranked by exact
        distance from the stored vectors: the k best of those, with their exact distances."""
        R = self.refine_factor if refine is None else refine
        if not R or self.refine is None:
            return self._search(xq, k, nprobe, flt, coarse)
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        _, I = self._search(xq, k * R, nprobe, flt, coarse)
        return self.refine.rerank(xq, I, k, self.metric)

    def _search(self, xq: np.ndarray, k: int, nprobe: int | None = None, flt: list | None = None,
                coarse: tuple[np.ndarray, np.ndarray] | None = None):
        """(D, I) of the k best per query by the codes.

        coarse: the router's (Dq, Iq) for these queries; the shard then scans exactly those
        lists rather than quantizing the queries again. With a filter (the router's wire
        form), only matching documents are scanned, and each query gets min(k, matching
        documents of this shard) results: a short answer is retried with a larger nprobe,
        up to every list."""
        if self.threads:  # OpenMP's thread count is per calling thread: Serve and the local backend search in others
            faiss().omp_set_num_threads(self.threads)
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        sel = None
        if flt is not None:
            if getattr(self, "attrs", None) is None:
                raise SearchError(f"{self.name}: filters need the shard's attributes; none were loaded")
            sel = self.selections.get(self.attrs, flt)
            if sel.count == 0:
                return (np.full((len(xq), k), _worst(self.index), dtype=np.float32),
                        np.full((len(xq), k), -1, dtype=np.int64))
        s = self._selector(sel)
        if sel is None and self.seg is not None and self.seg.scan is not None:
            return self._beside(xq, k, nprobe, coarse)
        if self.seg is not None and s is self.seg.alive:
            D, I = self._live_only(xq, k, nprobe, coarse, self.seg.index)
        else:
            D, I = self._scan(xq, k, nprobe, coarse, s, self._index(sel))
        if sel is not None:
            want, p = min(k, sel.count), (coarse[1].shape[1] if coarse is not None else nprobe) or \
                self._default_nprobe()
            while p < self.nlist:
                short = np.flatnonzero((I != -1).sum(1) < want)  # a delta's keys are negative
                if not len(short):
                    break
                p = min(self.nlist, p * NPROBE_GROWTH)
                D[short], I[short] = self._index(sel).search(xq[short], k, params=self._params(p, s))
        return D, (self.seg.ids(I) if self.seg else I)

    def _index(self, sel):
        """The faiss index a search runs on: a segmented shard with a filter is searched as one stack."""
        return self.seg.index if self.seg is not None and sel is not None else self.index

    def _scan(self, xq, k, nprobe, coarse, sel, index):
        if coarse is not None and self._ivf is not None:
            return self._preassigned(xq, k, coarse, sel, index)
        return index.search(xq, k, params=self._params(nprobe, sel))

    def _beside(self, xq, k, nprobe, coarse):
        """A segmented shard without a filter: the base searched alone (dead entries dropped after),
        the live delta entries of the same lists scanned in numpy (segments.DeltaScan), merged."""
        from shards.storage.faissio import coarse_search, pretransform

        if coarse is None:
            coarse = coarse_search(self.index, xq, nprobe or self._default_nprobe())
        D, I = self._live_only(xq, k, nprobe, coarse, self.index)
        Dd, Id = self.seg.scan.search(pretransform(self.index, xq), coarse[0], coarse[1], k, D[:, -1])
        D, I = np.concatenate([D, Dd], 1), np.concatenate([I, Id], 1)
        best = -D if self.index.metric_type == faiss().METRIC_INNER_PRODUCT else D
        o = np.argsort(np.where(I == -1, np.inf, best), axis=1, kind="stable")[:, :k]
        return np.take_along_axis(D, o, 1), self.seg.ids(np.take_along_axis(I, o, 1))

    def _live_only(self, xq, k, nprobe, coarse, index):
        """A segmented shard's search with no filter: dead entries dropped after the scan, not tested in
        it. A selector costs every scanned code a call (28% of one shard's QPS at IVF1024,PQ32 and nprobe
        128, bench/README.md), and dead entries are few: the scan asks for DEAD_MARGIN more results, and
        a query that got fewer than k live ones out of a full answer is scanned again with the selector,
        so each answer is the exact one either way."""
        if self.seg.alive is None:
            return self._scan(xq, k, nprobe, coarse, None, index)
        D, I = self._scan(xq, k + max(k, DEAD_MARGIN), nprobe, coarse, None, index)
        live = (I != -1) & ~np.isin(I, self.seg.dead)
        o = np.argsort(~live, axis=1, kind="stable")[:, :k]  # live results first, in their order
        D2, I2, got = (np.take_along_axis(a, o, 1) for a in (D, I, live))
        D2[~got], I2[~got] = _worst(self.index), -1
        short = np.flatnonzero((got.sum(1) < k) & (I[:, -1] != -1))  # more live ones may lie past the margin
        if len(short):
            c = (coarse[0][short], coarse[1][short]) if coarse is not None else None
            D2[short], I2[short] = self._scan(xq[short], k, nprobe, c, self.seg.alive, index)
        return D2, I2

    def _selector(self, sel):
        """The IDSelector a search runs with: the filter's selection, and on a segmented shard only
        live entries (a selection of matches holds live keys only; "all" and "not-batch" do not)."""
        alive = self.seg.alive if self.seg else None
        if sel is None or sel.kind == "all":
            return alive
        if alive is None or sel.kind != "not-batch":
            return sel.sel
        if getattr(sel, "_and", None) is None:
            sel._and = faiss().IDSelectorAnd(sel.sel, alive)
        return sel._and

    def _preassigned(self, xq, k, coarse, sel, index):
        """Scan the lists the router chose. The C++ call, not the Python wrapper: the wrapper
        takes no per-call parameters and reads nprobe from the shared index."""
        from shards.storage.faissio import pretransform

        f = faiss()
        Dq, Iq = (np.ascontiguousarray(coarse[0], np.float32), np.ascontiguousarray(coarse[1], np.int64))
        p = f.SearchParametersIVF(nprobe=int(Iq.shape[1]))  # the C++ reads Iq as [n, nprobe]
        if sel is not None:
            p.sel = sel
        x = np.ascontiguousarray(pretransform(index, xq), np.float32)
        n = len(x)
        D, I = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
        ivf(index).search_preassigned_c(n, f.swig_ptr(x), k, f.swig_ptr(Iq), f.swig_ptr(Dq), f.swig_ptr(D),
                                       f.swig_ptr(I), False, p)
        return D, I

    def _default_nprobe(self) -> int:
        return int(self._ivf.nprobe) if self._ivf is not None else 1

    def _params(self, nprobe: int | None, sel):
        """Per-call search parameters: nprobe and the selector never touch the shared index,
        so concurrent searches with different settings cannot race."""
        f = faiss()
        if self._ivf is not None:
            p = f.SearchParametersIVF(nprobe=int(nprobe or self._default_nprobe()))
            qp = quantizer_params(self._ivf, p.nprobe)
            if qp is not None:
                p.quantizer_params, p._quantizer = qp, qp  # kept alive as long as p
        elif sel is None:
            return None
        else:
            p = f.SearchParameters()
        if sel is not None:
            p.sel = sel
        if isinstance(self.index, f.IndexPreTransform):
            outer = f.SearchParametersPreTransform()
            outer.index_params = p
            outer._inner = p  # keep the inner parameters alive as long as the outer ones
            return outer
        return p

    def ids(self) -> np.ndarray:
        """The ids of every live vector of this shard, unsorted (a segmented shard: sorted)."""
        return self.seg.live()[1] if self.seg else index_ids(self.index)

    def ntotal(self) -> int:
        """Live vectors: a segmented shard's entries less its dead ones."""
        return len(self.seg) if self.seg else int(self.index.ntotal)


def _worst(index) -> float:
    return -np.finfo(np.float32).max if index.metric_type == faiss().METRIC_INNER_PRODUCT \
        else np.finfo(np.float32).max


def _keys_of(ids: np.ndarray, live_ids: np.ndarray, live_keys: np.ndarray):
    """The entry key of each id (live_ids sorted, live_keys beside them), as an Arrow column."""
    import pyarrow as pa

    return pa.array(live_keys[np.searchsorted(live_ids, ids)], pa.int64())


def _docs(m: Manifest) -> list[tuple[str, str]]:
    """(path under INDEX_ROOT, sha256 or "") of each docs file of m: one pair names one content."""
    d = m.docs
    shas = d.sha256 if len(d.sha256) == len(d.files) else [""] * len(d.files)
    return [(m.path(f), sha) for f, sha in zip(d.files, shas)]


def _own_rows(store: Store, m: Manifest, ids: np.ndarray, fields: list[str], files: list[str]):
    """The id and `fields` columns of the docs rows (of `files`, paths under INDEX_ROOT) whose id is
    in `ids` (sorted), file by file."""
    import pyarrow as pa

    parts = []
    for f in files:
        t = store.read_table(f, columns=["id", *fields])
        got = t.column("id").to_numpy()
        pos = np.minimum(np.searchsorted(ids, got), len(ids) - 1) if len(ids) else got * 0
        keep = (ids[pos] == got) if len(ids) else np.zeros(len(got), bool)
        if keep.any():
            parts.append(t.filter(pa.array(keep)))
    if not parts:
        schema = store.read_table(m.path(m.docs.files[0]), columns=["id", *fields]).schema
        return schema.empty_table()
    t = pa.concat_tables(parts)
    _, first = np.unique(t.column("id").to_numpy(), return_index=True)  # files newest first: its row stands
    return t if len(first) == t.num_rows else t.take(pa.array(np.sort(first)))


def scratch_dir() -> str:
    d = os.path.join(tempfile.gettempdir(), "shardex-cache")
    os.makedirs(d, exist_ok=True)
    return d

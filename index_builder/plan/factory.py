"""--factory auto: the faiss index from (N, d, memory budget), as pure functions.

The rules, smallest corpus first:
- Flat: exact search, when N is small enough (< FLAT_MAX) that a scan is fast and
  the raw vectors fit the budget.
- IVF{nlist},Flat: raw vectors still fit the budget; IVF makes search sublinear.
- IVF{nlist},PQ{M}: compressed codes of M bytes (+8 for the id) per vector, with
  M the largest that fits the budget.
- OPQ{M}_{D},IVF{nlist},PQ{M}: as above for d >= OPQ_MIN_DIM, where a learned
  rotation (and reduction to D dims) keeps PQ's error down.
- With --refine auto and a target recall that such PQ codes cap under (pq_recall_cap), the same bytes
  as fast-scan PQ{2M}x4fs (4-bit codes, scanned in SIMD registers) pick candidates, and a refine
  store of the full vectors on disk reranks them (shards/storage/refine.py).
The coarse quantizer stays flat at every nlist. An HNSW one (give IVF{nlist}_HNSW32,... by hand)
answers one query at a time 7x faster at 65,536 lists (0.7 against 4.9 ms, 0.996 of the lists),
but batched, as the router runs it under load, it is no faster at nprobe 64 and 2.8x slower at 256
(bench/serve/coarse.py).
nlist is a power of two near c*sqrt(N): c = 4 up to a million vectors, 8 up to a
hundred million, 16 beyond (faiss's guidance is 4*sqrt(N) to 16*sqrt(N); the bigger the
corpus, the more a list scanned costs next to the centroids compared). It is halved
until every list gets MIN_TRAIN_PER_LIST training vectors from a sample that fits
TRAIN_MAX_BYTES.

index_plan() then says what the build will hold: memory per serving shard (and whether it
is merged on disk), disk, and the training sample; the build prints it before training.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from shards.errors import ConfigError

FLAT_MAX = 10_000          # below this, a brute-force scan is faster than training anything
MIN_TRAIN_PER_LIST = 39    # faiss's k-means warns below 39 points per centroid
PQ_TRAIN_MIN = 256 * 39    # 8-bit PQ codebooks need this many training vectors
ID_BYTES = 8
LIST_OVERHEAD = 1.05       # inverted-list bookkeeping on top of codes and ids
OPQ_MIN_DIM = 256
PQ_M = (128, 96, 64, 48, 32, 24, 16, 12, 8, 4)  # code bytes offered, largest first
TRAIN_MAX_BYTES = 4 << 30  # the training sample is held by one task: at most this many bytes of float32
TRAIN_PER_LIST = 100       # training vectors wanted per IVF centroid (faiss uses at most 256)
# recall@10 that PQ codes alone were measured to top out at, by code bits per (rotated) dimension: 2 bits,
# 0.894 (MiniLM 60k, OPQ96_384,PQ96) and 0.84 (1M x 128 synthetic, PQ32); 1 bit, 0.66 (SIFT1M, PQ16). Four
# bits and more are not taken to cap anything.
PQ_CAPS = ((4.0, 1.0), (2.0, 0.89), (1.0, 0.66), (0.0, 0.5))


@dataclass(frozen=True)
class Choice:
    factory: str
    bytes_per_vector: float
    reason: str
    refine: str | None = None     # a refine store's precision, when the choice reranks from one


def nlist_factor(n: int) -> int:
    return 4 if n <= 1_000_000 else 8 if n <= 100_000_000 else 16


def max_train(n: int, d: int | None) -> int:
    """The most training vectors the sample may hold: all of N, or what fits TRAIN_MAX_BYTES."""
    return min(n, TRAIN_MAX_BYTES // (4 * d)) if d else n


def nlist_for(n: int, d: int | None = None) -> int:
    """A power of two near nlist_factor(n)*sqrt(n), with >= MIN_TRAIN_PER_LIST training vectors
    per list (from a sample of at most max_train(n, d) vectors)."""
    target = nlist_factor(n) * math.sqrt(n)
    k = 2 ** max(0, round(math.log2(max(target, 1))))
    while k > 1 and max_train(n, d) < k * MIN_TRAIN_PER_LIST:
        k //= 2
    return max(1, k)


def pq_recall_cap(code_bytes: float, dims: int) -> float:
    """The recall@10 PQ codes of code_bytes a vector over dims (rotated) dimensions are taken to cap at."""
    bits = 8 * code_bytes / max(1, dims)
    return next(c for b, c in PQ_CAPS if bits >= b)


def choose_factory(n: int, d: int, budget: int, need_ivf: bool = False, shards: int = 1,
                   target: float | None = None) -> Choice:
    """need_ivf: --sharding ivf, whose shards are ranges of IVF lists, so never plain Flat. The
    budget holds the codes and ids of all N vectors plus, once per shard, the trained part
    (centroids, codebooks, rotation) that every shard file carries. target: the recall@10 to reach
    when a refine store may be added (--refine auto); None: codes alone."""
    if n < 1 or d < 1:
        raise ConfigError(f"factory auto: need at least one vector of at least one dimension (N={n}, d={d})")
    flat = d * 4 + ID_BYTES

    def served(factory: str, per: float) -> float:
        return n * per * LIST_OVERHEAD + shards * trained_bytes(factory, d)

    if n < FLAT_MAX and not need_ivf and served("Flat", flat) <= budget:
        return Choice("Flat", flat, f"N={n:,} < {FLAT_MAX:,}: exact search is fast, and raw vectors fit the budget")
    k = nlist_for(n, d)
    if served(f"IVF{k},Flat", flat) <= budget:
        return Choice(f"IVF{k},Flat", flat, f"raw vectors ({_gb(n * flat)}) and {shards} x the centroids fit the "
                                            f"budget ({_gb(budget)}); nlist={k} ~ {nlist_factor(n)}*sqrt(N)")
    opq = d >= OPQ_MIN_DIM
    fit = [pq_factory(m, d, k, opq) for m in PQ_M if m <= d and (opq or d % m == 0)]  # the PQ{M} d allows
    ok = [f for f in fit if served(f, _pq_of(f) + ID_BYTES) <= budget]
    if not ok or n < PQ_TRAIN_MIN:
        if n < PQ_TRAIN_MIN:
            why = f"{_gb(served(f'IVF{k},Flat', flat), up=True)} (too few vectors to train PQ)"
        elif not fit:
            why = f"{_gb(served(f'IVF{k},Flat', flat), up=True)} (no PQ{{M}} with M in {PQ_M} divides d={d})"
        else:
            why = f"at least {_gb(min(served(f, _pq_of(f) + ID_BYTES) for f in fit), up=True)}"
        raise ConfigError(f"memory_budget: {_gb(budget)} cannot hold {n:,} vectors of d={d} in {shards} shard(s) "
                          f"(each holds its own trained part); raise --memory-budget to {why}, or give --factory")
    f = ok[0]
    m = _pq_of(f)
    held = f"PQ{m} = {m} bytes/vector + {shards} x {_gb(trained_bytes(f, d))} trained fits it"
    dd = factory_shape(f, d)[0]
    why = f"raw vectors ({_gb(n * flat)}) exceed the budget; " + (
        f"d={d} >= {OPQ_MIN_DIM}: OPQ rotation to {dd} dims, " if opq else "") + held
    cap = pq_recall_cap(m, dd)
    if target is None or cap >= target:
        return Choice(f, m + ID_BYTES, why)
    fs = fast_scan_factory(m, d, k, opq)
    return Choice(fs or f, m + ID_BYTES, f"{why}; but {m} bytes over {dd} dims ({8 * m / dd:g} bits a dimension) "
                  f"cap recall@10 near {cap} by the codes alone, under the target {target}: "
                  + (f"the same bytes as fast-scan {fs.rsplit(',', 1)[1]} pick candidates, " if fs else "")
                  + f"reranked by exact distance from a refine store of the vectors on disk "
                  f"({_gb(n * (4 * d + ID_BYTES))}, apart from the budget)", refine="fp32")


def fast_scan_factory(m: int, d: int, nlist: int, opq: bool) -> str | None:
    """m code bytes as fast-scan PQ{2m}x4fs (two 4-bit codes a byte), under OPQ's rotation to D dims (a
    multiple of 2m); None when 2m does not divide d without a rotation. The rotation is trained for m
    sub-vectors, as the plain PQ{m}'s is: trained for 2m of 2 dims each it took 353 s on MiniLM 50k,
    against 42 s (bench/README.md)."""
    if opq:
        dd = max(2 * m, min(d, 4 * m) // (2 * m) * (2 * m))
        return f"OPQ{m}_{dd},IVF{nlist},PQ{2 * m}x4fs"
    return f"IVF{nlist},PQ{2 * m}x4fs" if d % (2 * m) == 0 else None


def pq_factory(m: int, d: int, nlist: int, opq: bool) -> str:
    """IVF{nlist},PQ{m}, under an OPQ rotation to D = 4*m dims (at most d, a multiple of m) when opq."""
    return f"OPQ{m}_{min(d, 4 * m) // m * m},IVF{nlist},PQ{m}" if opq else f"IVF{nlist},PQ{m}"


def _pq_of(factory: str) -> int:
    return int(factory.rsplit("PQ", 1)[1])


def train_size(n: int, d: int, factory: str, nlist: int | None, cap_bytes: int = TRAIN_MAX_BYTES) -> int:
    """faiss's guidance: tens to a few hundred vectors per centroid (TRAIN_PER_LIST for the IVF
    k-means, as many for each of PQ's 256), capped by cap_bytes of sample, but never under
    the MIN_TRAIN_PER_LIST per list that k-means needs; never more than N."""
    want = max(TRAIN_PER_LIST * (nlist or 1), TRAIN_PER_LIST * 256 if "PQ" in factory else 0, 10_000)
    cap = cap_bytes // (4 * d)
    return min(n, max(min(want, cap), MIN_TRAIN_PER_LIST * (nlist or 1)))


def _gb(b: float, up: bool = False) -> str:
    """Bytes as GiB or MiB; up=True rounds up, so a size shown as a fix is enough when given back."""
    unit, places, name = (2**30, 2, "GiB") if b >= 2**30 else (2**20, 1, "MiB")
    v = b / unit
    if up:
        v = math.ceil(v * 10**places) / 10**places
    return f"{v:.{places}f} {name}"


# ---------------------------------------------------------------- the plan printed before training

_PRE = re.compile(r"^(?:OPQ\d+(?:_(\d+))?|PCAR?(\d+)|RR(\d+))$")
_IVF = re.compile(r"^IVF(\d+)(?:_HNSW(\d+))?")
_PQ = re.compile(r"^PQ(\d+)(?:x(\d+))?(fs)?$")
_SQ_BITS = {"SQ4": 4, "SQ6": 6, "SQ8": 8, "SQfp16": 16, "SQbf16": 16}


def fast_scan(factory: str) -> bool:
    """Whether the factory's codes are fast-scan PQ (PQ{M}x4fs), whose lists are packed in blocks."""
    return any((m := _PQ.match(p.strip())) and m.group(3) for p in factory.split(","))


def factory_shape(factory: str, d: int) -> tuple[int, int | None, float | None]:
    """(dims the index sees after its pre-transforms, nlist or None, code bytes per vector or None
    when this parser does not know the encoding). Pure string work: no faiss."""
    dd, nl, code = d, None, None
    for part in factory.split(","):
        part = part.strip()
        if m := _PRE.match(part):
            dd = int(next((g for g in m.groups() if g), dd))
        elif m := _IVF.match(part):
            nl = int(m.group(1))
        elif part == "Flat":
            code = 4 * dd
        elif m := _PQ.match(part):
            code = math.ceil(int(m.group(1)) * int(m.group(2) or 8) / 8)
        elif part in _SQ_BITS:
            code = math.ceil(dd * _SQ_BITS[part] / 8)
    return dd, nl, code


def trained_bytes(factory: str, d: int) -> int:
    """Bytes of the trained part that every shard file holds: the pre-transform's matrix (d x D;
    PCA also keeps its d x d eigenvectors), the IVF centroids (nlist x D), the PQ codebooks
    (2^nbits x D) or the SQ ranges (2 x D). Pure string work, like factory_shape."""
    dd, total = d, 0
    for part in factory.split(","):
        part = part.strip()
        if m := _PRE.match(part):
            out = int(next((g for g in m.groups() if g), dd))
            total += dd * out + (dd * dd + dd if part.startswith("PCA") else 0)
            dd = out
        elif m := _IVF.match(part):
            # an HNSW quantizer's graph: about 2M int32 links a centroid on level 0, 10% more above
            total += int(m.group(1)) * (dd + (int(2.2 * int(m.group(2))) if m.group(2) else 0))
        elif m := _PQ.match(part):
            total += 2 ** int(m.group(2) or (4 if m.group(3) else 8)) * dd
        elif part in _SQ_BITS:
            total += 2 * dd
    return 4 * total


@dataclass(frozen=True)
class Plan:
    factory: str
    n: int
    d: int
    shards: int
    nlist: int | None
    bytes_per_vector: float | None   # served: code + id, with the lists' overhead; None: unknown encoding
    trained_bytes: int               # centroids, codebooks, rotation: in every shard
    shard_bytes: int | None          # one serving shard (the even share)
    on_disk: bool                    # shards over the merge RAM budget: on-disk lists, mmapped
    train_vectors: int
    embeddings_bytes: int            # the vectors as encoded (embeddings/ parts)
    code_bytes: int | None = None    # one vector's code
    refine: str | None = None        # the refine store's precision (fp32, fp16): on disk, apart from RAM

    @property
    def index_bytes(self) -> int | None:
        return None if self.shard_bytes is None else self.shard_bytes * self.shards

    @property
    def refine_bytes(self) -> int:
        """The refine store (id and vector per row), on disk beside the shards: read by row, not held."""
        return self.n * (ID_BYTES + self.d * (2 if self.refine == "fp16" else 4)) if self.refine else 0

    @property
    def train_bytes(self) -> int:
        return self.train_vectors * self.d * 4

    def lines(self) -> list[str]:
        unknown = "unknown (not a Flat/PQ/SQ encoding this plan can size)"
        size = _gb(self.index_bytes) if self.index_bytes is not None else unknown
        out = [f"plan: {self.factory} over {self.n:,} x {self.d}"
               + (f", nlist {self.nlist:,} (~{self.n / self.nlist:,.0f} vectors a list)" if self.nlist else ""),
               f"plan: index {size}" + (f" = {self.bytes_per_vector:.0f} bytes a vector" if self.bytes_per_vector
                                        else "") + f" + {_gb(self.trained_bytes)} trained (in each shard)"]
        if self.shard_bytes is not None:
            where = ("merged into on-disk lists and mmapped (over --merge-ram-budget): RAM holds what the page "
                     "cache keeps" if self.on_disk else "merged and served in RAM")
            out.append(f"plan: memory per shard {_gb(self.shard_bytes + self.trained_bytes)} x {self.shards} "
                       f"shard(s), {where}")
        if self.refine:
            out.append(f"plan: refine store {_gb(self.refine_bytes)} ({self.refine}) on disk, apart from the memory "
                       f"above: each shard reads its candidates' vectors by row (mmap)")
        work = self.n * (self.code_bytes + 12) if self.code_bytes is not None else None  # list, id, code
        out.append(f"plan: disk {_gb(self.embeddings_bytes)} embeddings"
                   + (f" + {_gb(work)} add payloads in work/ (deletable after publish)" if work is not None else "")
                   + (f" + {_gb(self.index_bytes)} shards" if self.index_bytes is not None else "")
                   + (f" + {_gb(self.refine_bytes)} refine store (and as much again in work/)" if self.refine else ""))
        out.append(f"plan: training sample {self.train_vectors:,} vectors ({_gb(self.train_bytes)})"
                   + (f", {self.train_vectors / self.nlist:,.0f} per list" if self.nlist else ""))
        return out


def index_plan(n: int, d: int, factory: str, shards: int, merge_ram_budget: int, refine: str | None = None) -> Plan:
    dd, nl, code = factory_shape(factory, d)
    per = (code + ID_BYTES) * LIST_OVERHEAD if code is not None else None
    trained = trained_bytes(factory, d)
    shard = math.ceil(n / shards * per) if per is not None else None
    return Plan(factory=factory, n=n, d=d, shards=shards, nlist=nl, bytes_per_vector=per, trained_bytes=trained,
                shard_bytes=shard, on_disk=bool(nl) and shard is not None and shard > merge_ram_budget,
                train_vectors=train_size(n, d, factory, nl), embeddings_bytes=n * (4 * d + ID_BYTES),
                code_bytes=code, refine=refine)


# ---------------------------------------------------------------- before any work: trainable, sensible

MIN_PER_SHARD = 1_000  # below this a shard (a serving replica and its own copy of the trained part) costs
                       # more than it saves: hash sharding sends every query to every shard anyway


def _ksub(factory: str) -> int | None:
    """Centroids per PQ codebook (2^nbits), or None without PQ."""
    for part in factory.split(","):
        if m := _PQ.match(part.strip()):
            return 2 ** int(m.group(2) or (4 if m.group(3) else 8))
    return None


def check_trainable(factory: str, n: int, d: int, shards: int, sharding: str) -> None:
    """Refuse a factory the build's training sample cannot train (k-means needs at least one
    vector per centroid), and ivf sharding with more shards than lists; at plan time."""
    nl = factory_shape(factory, d)[1]
    t = train_size(n, d, factory, nl)
    k = nlist_for(n, d)
    if nl is not None and nl < 1:
        raise ConfigError(f"factory: {factory!r} has no IVF lists; give at least one, e.g. IVF{k} for N={n:,}, "
                          f"or --factory auto")
    if nl and nl > t:
        raise ConfigError(f"factory: {factory!r} has {nl:,} IVF lists, and k-means needs a training vector for "
                          f"each but the build has {t:,} (N={n:,}); give at most IVF{k} (~{MIN_TRAIN_PER_LIST} "
                          f"vectors a list), or --factory auto")
    if (ks := _ksub(factory)) and ks > t:
        raise ConfigError(f"factory: {factory!r}'s PQ codebooks have {ks} centroids each, and the build has "
                          f"{t:,} training vectors (N={n:,}); give Flat or SQ8 codes for so few vectors, "
                          f"or --factory auto")
    if sharding == "ivf" and nl and shards > nl:
        raise ConfigError(f"shards: {shards} shards cannot each own one of {factory!r}'s {nl:,} IVF lists; "
                          f"give --shards <= {nl:,} or a larger nlist")


def plan_warnings(n: int, d: int, factory: str, shards: int) -> list[str]:
    """What the build will do but the user likely did not mean: too few training vectors a list
    for good clustering, or more shards than N makes sense for."""
    out = []
    nl = factory_shape(factory, d)[1]
    t = train_size(n, d, factory, nl)
    if nl and t < MIN_TRAIN_PER_LIST * nl:
        out.append(f"factory: {t:,} training vectors for {nl:,} IVF lists is {t / nl:,.1f} a list, under the "
                   f"{MIN_TRAIN_PER_LIST} faiss's k-means wants: lists will be poor; give IVF{nlist_for(n, d)} "
                   f"or --factory auto")
    if shards > 1 and n < shards * MIN_PER_SHARD:
        empty = f", {shards - n:,} of them empty" if n < shards else ""
        out.append(f"shards: {shards:,} shards over {n:,} vectors is {n / shards:,.1f} a shard{empty}; each costs "
                   f"a serving replica and its own copy of the trained part: give --shards "
                   f"{max(1, n // MIN_PER_SHARD)} (at least {MIN_PER_SHARD:,} vectors a shard)")
    return out

"""--factory auto: the faiss index from (N, d, memory budget), as pure functions.

The rules, smallest corpus first:
- Flat: exact search, when N is small enough (< FLAT_MAX) that a scan is fast and
  the raw vectors fit the budget.
- IVF{nlist},Flat: raw vectors still fit the budget; IVF makes search sublinear.
- IVF{nlist},PQ{M}: compressed codes of M bytes (+8 for the id) per vector, with
  M the largest that fits the budget.
- OPQ{M}_{D},IVF{nlist},PQ{M}: as above for d >= OPQ_MIN_DIM, where a learned
  rotation (and reduction to D dims) keeps PQ's error down.
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


@dataclass(frozen=True)
class Choice:
    factory: str
    bytes_per_vector: float
    reason: str


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


def pq_m(d: int, code_bytes: float, need_divisor: bool) -> int | None:
    """The largest M in PQ_M that fits code_bytes (and divides d, without OPQ's rotation)."""
    for m in PQ_M:
        if m <= code_bytes and (not need_divisor or d % m == 0) and m <= d:
            return m
    return None


def choose_factory(n: int, d: int, budget: int, need_ivf: bool = False) -> Choice:
    """need_ivf: --sharding ivf, whose shards are ranges of IVF lists, so never plain Flat."""
    if n < 1 or d < 1:
        raise ConfigError(f"factory auto: need at least one vector of at least one dimension (N={n}, d={d})")
    flat = d * 4 + ID_BYTES
    fits_flat = n * flat * LIST_OVERHEAD <= budget
    if n < FLAT_MAX and fits_flat and not need_ivf:
        return Choice("Flat", flat, f"N={n:,} < {FLAT_MAX:,}: exact search is fast, and raw vectors fit the budget")
    k = nlist_for(n, d)
    if fits_flat:
        return Choice(f"IVF{k},Flat", flat, f"raw vectors ({_gb(n * flat)}) fit the budget ({_gb(budget)}); "
                                            f"nlist={k} ~ {nlist_factor(n)}*sqrt(N)")
    code = budget / (n * LIST_OVERHEAD) - ID_BYTES
    opq = d >= OPQ_MIN_DIM
    m = pq_m(d, code, need_divisor=not opq)
    if m is None or n < PQ_TRAIN_MIN:
        fit = [mm for mm in PQ_M if mm <= d and (opq or d % mm == 0)]  # the PQ{M} that d allows at all
        if n < PQ_TRAIN_MIN:
            why = f"{_gb(n * flat * LIST_OVERHEAD, up=True)} (too few vectors to train PQ)"
        elif not fit:
            why = f"{_gb(n * flat * LIST_OVERHEAD, up=True)} (no PQ{{M}} with M in {PQ_M} divides d={d})"
        else:
            why = f"at least {_gb(n * (min(fit) + ID_BYTES) * LIST_OVERHEAD, up=True)}"
        raise ConfigError(f"memory_budget: {_gb(budget)} cannot hold {n:,} vectors of d={d}; "
                          f"raise --memory-budget to {why}, or give --factory")
    if opq:
        dd = min(d, 4 * m) // m * m
        return Choice(f"OPQ{m}_{dd},IVF{k},PQ{m}", m + ID_BYTES,
                      f"raw vectors ({_gb(n * flat)}) exceed the budget; d={d} >= {OPQ_MIN_DIM}: OPQ rotation "
                      f"to {dd} dims, PQ{m} = {m} bytes/vector")
    return Choice(f"IVF{k},PQ{m}", m + ID_BYTES,
                  f"raw vectors ({_gb(n * flat)}) exceed the budget; PQ{m} = {m} bytes/vector fits it")


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
_IVF = re.compile(r"^IVF(\d+)")
_PQ = re.compile(r"^PQ(\d+)(?:x(\d+))?(fs)?$")
_SQ_BITS = {"SQ4": 4, "SQ6": 6, "SQ8": 8, "SQfp16": 16, "SQbf16": 16}


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

    @property
    def index_bytes(self) -> int | None:
        return None if self.shard_bytes is None else self.shard_bytes * self.shards

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
        work = 2 * self.index_bytes if self.index_bytes is not None else None
        out.append(f"plan: disk {_gb(self.embeddings_bytes)} embeddings"
                   + (f" + {_gb(work)} work (part indexes and merged shards, deletable after publish)"
                      if work is not None else "") + "; the published version links or copies the shards")
        out.append(f"plan: training sample {self.train_vectors:,} vectors ({_gb(self.train_bytes)})"
                   + (f", {self.train_vectors / self.nlist:,.0f} per list" if self.nlist else ""))
        return out


def index_plan(n: int, d: int, factory: str, shards: int, merge_ram_budget: int) -> Plan:
    dd, nl, code = factory_shape(factory, d)
    per = (code + ID_BYTES) * LIST_OVERHEAD if code is not None else None
    trained = 4 * (dd * (nl or 0) + (d * dd if dd != d else 0) + (256 * dd if "PQ" in factory else 0))
    shard = math.ceil(n / shards * per) if per is not None else None
    return Plan(factory=factory, n=n, d=d, shards=shards, nlist=nl, bytes_per_vector=per, trained_bytes=trained,
                shard_bytes=shard, on_disk=bool(nl) and shard is not None and shard > merge_ram_budget,
                train_vectors=train_size(n, d, factory, nl), embeddings_bytes=n * (4 * d + ID_BYTES))

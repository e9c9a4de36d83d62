"""--factory auto: the faiss index from (N, d, memory budget), as pure functions.

The rules, smallest corpus first:
- Flat: exact search, when N is small enough (< FLAT_MAX) that a scan is fast and
  the raw vectors fit the budget.
- IVF{nlist},Flat: raw vectors still fit the budget; IVF makes search sublinear.
- IVF{nlist},PQ{M}: compressed codes of M bytes (+8 for the id) per vector, with
  M the largest that fits the budget.
- OPQ{M}_{D},IVF{nlist},PQ{M}: as above for d >= OPQ_MIN_DIM, where a learned
  rotation (and reduction to D dims) keeps PQ's error down.
nlist is a power of two near 4*sqrt(N), with at least MIN_TRAIN_PER_LIST training
vectors per list.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from shards.errors import ConfigError

FLAT_MAX = 10_000          # below this, a brute-force scan is faster than training anything
MIN_TRAIN_PER_LIST = 39    # faiss's k-means warns below 39 points per centroid
PQ_TRAIN_MIN = 256 * 39    # 8-bit PQ codebooks need this many training vectors
ID_BYTES = 8
LIST_OVERHEAD = 1.05       # inverted-list bookkeeping on top of codes and ids
OPQ_MIN_DIM = 256
PQ_M = (64, 48, 32, 24, 16, 12, 8, 4)  # codes faiss has fast kernels for, largest first


@dataclass(frozen=True)
class Choice:
    factory: str
    bytes_per_vector: float
    reason: str


def nlist_for(n: int) -> int:
    """A power of two near 4*sqrt(n), with >= MIN_TRAIN_PER_LIST vectors per list."""
    target = 4 * math.sqrt(n)
    k = 2 ** max(0, round(math.log2(max(target, 1))))
    while k > 1 and n < k * MIN_TRAIN_PER_LIST:
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
    k = nlist_for(n)
    if fits_flat:
        return Choice(f"IVF{k},Flat", flat, f"raw vectors ({_gb(n * flat)}) fit the budget ({_gb(budget)}); "
                                            f"nlist={k} ~ 4*sqrt(N)")
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


def train_size(n: int, factory: str, nlist: int | None, cap: int = 500_000) -> int:
    """faiss's guidance: tens to a few hundred vectors per centroid (k-means and PQ's 256), capped."""
    want = max(100 * (nlist or 1), 100 * 256 if "PQ" in factory else 0, 10_000)
    return min(n, want, cap)


def _gb(b: float, up: bool = False) -> str:
    """Bytes as GiB or MiB; up=True rounds up, so a size shown as a fix is enough when given back."""
    unit, places, name = (2**30, 2, "GiB") if b >= 2**30 else (2**20, 1, "MiB")
    v = b / unit
    if up:
        v = math.ceil(v * 10**places) / 10**places
    return f"{v:.{places}f} {name}"

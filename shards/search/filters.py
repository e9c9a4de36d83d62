"""Filters on stored attributes: parse and check them at the router, evaluate them on a shard.

A filter is a mapping of field names to conditions, all of which must hold:

    {"lang": "en"}                              equality
    {"year": {"gte": 2000, "lt": 2010}}         numeric range (any of gt, gte, lt, lte)
    {"category": {"in": ["news", "sport"]}}     membership
    {"year": {"eq": 2004}}                      equality, spelled out

The router checks a filter against the filterable fields of the version it serves
(names, kinds, operators, value types) and sends it to the shards in a canonical
form. Each shard holds the filterable columns of its own documents only, turns the
filter into the ids that match, and hands faiss an IDSelector, so the filter is
applied inside the index scan.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from shards.errors import ConfigError, QueryError

RANGE_OPS = ("gt", "gte", "lt", "lte")
OPS = ("eq", "in") + RANGE_OPS
MAX_CLAUSES = 32       # fields in one filter
MAX_IN_VALUES = 1024   # values in one "in" list
KINDS = ("int", "float", "bool", "str")


class FilterError(QueryError):
    """A filter that cannot be applied; `field` names the offending part (filter.<name>)."""


def kind_of(arrow_type) -> str | None:
    """The filter kind of an Arrow column type, or None when it cannot be filtered on."""
    import pyarrow as pa

    t = arrow_type.value_type if pa.types.is_dictionary(arrow_type) else arrow_type
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    return None


def filterable(schema, stored: list[str], wanted: list[str] | None) -> dict[str, str]:
    """{field: kind} the shards hold in memory for filtering.

    wanted None: every stored field of a numeric or boolean type (a few bytes per document).
    Strings are held only when named, because a text body held per document is the docs
    table itself; a category or language code is cheap and worth naming.
    """
    kinds = {f: kind_of(schema.field(f).type) for f in stored if f in schema.names}
    if wanted is None:
        return {f: k for f, k in kinds.items() if k in ("int", "float", "bool")}
    out = {}
    for f in wanted:
        if f not in kinds:
            raise ConfigError(f"filter_fields: {f!r} is not a stored field of this index; stored: {stored}")
        if kinds[f] is None:
            raise ConfigError(f"filter_fields: {f!r} has type {schema.field(f).type}, which cannot be "
                              "filtered on (numbers, booleans and strings can)")
        out[f] = kinds[f]
    return out


# ---- parsing at the router -------------------------------------------------------------


@dataclass(frozen=True)
class Clause:
    field: str
    op: str                    # "eq" | "in" | "range"
    values: tuple = ()         # eq: (v,); in: (v, ...)
    lo: float | None = None    # range bounds
    lo_incl: bool = True
    hi: float | None = None
    hi_incl: bool = True

    def as_list(self) -> list:
        return [self.field, self.op, list(self.values), self.lo, self.lo_incl, self.hi, self.hi_incl]


Filter = tuple[Clause, ...]


def parse_filter(spec: dict | None, kinds: dict[str, str]) -> Filter | None:
    """Check a filter against the filterable fields; raise FilterError naming filter.<field>."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise FilterError("filter", "expected an object of field names to conditions")
    if not spec:
        return None
    if len(spec) > MAX_CLAUSES:
        raise FilterError("filter", f"{len(spec)} fields, at most {MAX_CLAUSES}")
    return tuple(_clause(f, cond, kinds) for f, cond in sorted(spec.items()))


def _clause(field: str, cond, kinds: dict[str, str]) -> Clause:
    where = f"filter.{field}"
    if field not in kinds:
        held = ", ".join(sorted(kinds)) or "none"
        raise FilterError(where, f"unknown filter field; this index filters on: {held}")
    kind = kinds[field]
    if not isinstance(cond, dict):
        cond = {"eq": cond}
    cond = {k: v for k, v in cond.items() if v is not None}
    bad = sorted(set(cond) - set(OPS))
    if bad:
        raise FilterError(where, f"unknown operator {bad[0]!r}; use one of {', '.join(OPS)}")
    if not cond:
        raise FilterError(where, "empty condition; give eq, in, or a range (gt, gte, lt, lte)")
    if ("eq" in cond or "in" in cond) and len(cond) > 1:
        raise FilterError(where, "eq and in stand alone; do not combine them with other operators")
    if "eq" in cond:
        return Clause(field, "eq", (_value(where + ".eq", cond["eq"], kind),))
    if "in" in cond:
        vs = cond["in"]
        if not isinstance(vs, list) or not vs:
            raise FilterError(where + ".in", "expected a non-empty list of values")
        if len(vs) > MAX_IN_VALUES:
            raise FilterError(where + ".in", f"{len(vs)} values, at most {MAX_IN_VALUES}")
        return Clause(field, "in", tuple(_value(f"{where}.in[{i}]", v, kind) for i, v in enumerate(vs)))
    if kind not in ("int", "float"):
        raise FilterError(where, f"a range needs a numeric field; {field!r} holds {kind} values")
    b = {op: _number(f"{where}.{op}", cond[op]) for op in RANGE_OPS if op in cond}
    if "gt" in b and "gte" in b or "lt" in b and "lte" in b:
        raise FilterError(where, "give at most one lower bound (gt or gte) and one upper bound (lt or lte)")
    lo, lo_incl = (b["gt"], False) if "gt" in b else (b.get("gte"), True)
    hi, hi_incl = (b["lt"], False) if "lt" in b else (b.get("lte"), True)
    return Clause(field, "range", (), lo, lo_incl, hi, hi_incl)


def _value(where: str, v, kind: str):
    if kind == "str":
        if not isinstance(v, str):
            raise FilterError(where, f"expected a string, got {_json_type(v)}")
        return v
    if kind == "bool":
        if not isinstance(v, bool):
            raise FilterError(where, f"expected true or false, got {_json_type(v)}")
        return v
    return _number(where, v)


def _number(where: str, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FilterError(where, f"expected a number, got {_json_type(v)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise FilterError(where, "expected a finite number")
    if isinstance(v, int) and not -(1 << 63) <= v < (1 << 63):
        raise FilterError(where, "outside the 64-bit integer range")
    return v


def _json_type(v) -> str:
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object",
            type(None): "null"}.get(type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


def wire(flt: Filter | None) -> list | None:
    """The canonical, JSON-able form that travels to the shards (also their cache key)."""
    return None if flt is None else [c.as_list() for c in flt]


def unwire(w: list | None) -> Filter | None:
    if w is None:
        return None
    return tuple(Clause(f, op, tuple(vs), lo, li, hi, hi_) for f, op, vs, lo, li, hi, hi_ in w)


def key(w: list | None) -> str:
    return json.dumps(w, sort_keys=True)


# ---- evaluation on a shard -------------------------------------------------------------


@dataclass
class Column:
    values: np.ndarray              # numbers, booleans, or dictionary codes for strings (-1: null)
    valid: np.ndarray | None = None  # False where the stored value is null (numbers, booleans)
    codes: dict | None = None        # strings: value -> code


class Attributes:
    """The filterable columns of one shard's documents, aligned with its sorted ids."""

    def __init__(self, ids: np.ndarray, columns: dict[str, Column], kinds: dict[str, str]):
        self.ids = ids
        self.columns = columns
        self.kinds = kinds

    @classmethod
    def from_table(cls, t, kinds: dict[str, str]) -> Attributes:
        """From an Arrow table (id + the filterable fields), any order."""
        import pyarrow.compute as pc

        t = t.sort_by("id")
        cols = {}
        for f, kind in kinds.items():
            a = t.column(f)
            if kind == "str":
                enc = a.dictionary_encode().combine_chunks() if not _is_dict(a) else a.combine_chunks()
                codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
                cols[f] = Column(codes, None, {v: i for i, v in enumerate(enc.dictionary.to_pylist())})
            else:
                valid = pc.is_valid(a).to_numpy(zero_copy_only=False)
                fill = False if kind == "bool" else 0
                v = a.fill_null(fill).to_numpy(zero_copy_only=False)
                cols[f] = Column(v, None if valid.all() else valid)
        return cls(t.column("id").to_numpy(), cols, kinds)

    def __len__(self) -> int:
        return len(self.ids)

    def nbytes(self) -> int:
        return self.ids.nbytes + sum(c.values.nbytes + (c.valid.nbytes if c.valid is not None else 0)
                                     for c in self.columns.values())

    def mask(self, flt: Filter) -> np.ndarray:
        m = np.ones(len(self.ids), dtype=bool)
        for c in flt:
            if c.field not in self.columns:
                raise FilterError(f"filter.{c.field}", "this shard does not hold the field; "
                                  "the router and the shard disagree on the filterable fields")
            m &= self._clause_mask(c, self.columns[c.field])
        return m

    @staticmethod
    def _clause_mask(c: Clause, col: Column) -> np.ndarray:
        v = col.values
        if col.codes is not None:  # strings by dictionary code; an unknown value matches nothing
            want = [col.codes[x] for x in c.values if x in col.codes]
            m = np.isin(v, np.asarray(want, dtype=np.int32)) if want else np.zeros(len(v), bool)
        elif c.op in ("eq", "in"):
            m = np.isin(v, np.asarray(c.values, dtype=v.dtype if v.dtype == bool else None))
        else:
            m = np.ones(len(v), dtype=bool)
            if c.lo is not None:
                m &= (v >= c.lo) if c.lo_incl else (v > c.lo)
            if c.hi is not None:
                m &= (v <= c.hi) if c.hi_incl else (v < c.hi)
        return m & col.valid if col.valid is not None else m


def _is_dict(a) -> bool:
    import pyarrow as pa

    return pa.types.is_dictionary(a.type)


# ---- faiss selectors -------------------------------------------------------------------

BITMAP_BYTES_PER_DOC = 8   # a bitmap over ids [0, max id] is used while it costs at most this per document


def selector_kind(ids: np.ndarray, nmatch: int) -> str:
    """How to hand a match set to faiss: all | bitmap | batch | not-batch (pure; ids sorted).

    A bitmap indexed by id is the fastest test and is cheap when ids are dense and
    non-negative. Otherwise a hash set (IDSelectorBatch) of the smaller side: the
    matches, or the non-matches under IDSelectorNot.
    """
    n = len(ids)
    if nmatch == n:
        return "all"
    if n and ids[0] >= 0 and (int(ids[-1]) + 1) // 8 + 1 <= BITMAP_BYTES_PER_DOC * n:
        return "bitmap"
    return "batch" if nmatch <= n - nmatch else "not-batch"


class Selection:
    """The documents of one shard that match one filter, as a faiss IDSelector (kept alive here)."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, kind: str | None = None):
        from shards.storage.faissio import faiss

        f = faiss()
        self.count = int(mask.sum())
        self.kind = kind or selector_kind(ids, self.count)
        self._keep = []
        if self.kind == "all":
            self.sel = None
        elif self.kind == "bitmap":
            bits = np.zeros(int(ids[-1]) + 1, dtype=bool)
            bits[ids[mask]] = True
            bm = np.packbits(bits, bitorder="little")
            self._keep = [bm]
            self.sel = f.IDSelectorBitmap(len(bm), f.swig_ptr(bm))
        else:
            side = ids[mask] if self.kind == "batch" else ids[~mask]
            side = np.ascontiguousarray(side, dtype=np.int64)
            inner = f.IDSelectorBatch(len(side), f.swig_ptr(side))
            self._keep = [inner]
            self.sel = inner if self.kind == "batch" else f.IDSelectorNot(inner)


class SelectionCache:
    """The last few filters' selections on one shard: repeated filters skip the column scan."""

    def __init__(self, size: int = 64):
        self.size = size
        self._d: OrderedDict[str, Selection] = OrderedDict()

    def get(self, attrs: Attributes, w: list) -> Selection:
        k = key(w)
        if k in self._d:
            self._d.move_to_end(k)
            return self._d[k]
        s = Selection(attrs.ids, attrs.mask(unwire(w)))
        self._d[k] = s
        if len(self._d) > self.size:
            self._d.popitem(last=False)
        return s

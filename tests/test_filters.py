"""Filters: the grammar (tables), evaluation on a shard's columns, faiss selectors, and filtered
search through the Python API against brute force, for hash and IVF sharding."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shards.errors import ConfigError
from shards.search.filters import (
    Attributes,
    Clause,
    FilterError,
    Selection,
    filterable,
    parse_filter,
    selector_kind,
    unwire,
    wire,
)

from helpers import build, clustered, vector_table

KINDS = {"year": "int", "price": "float", "cat": "str", "ok": "bool"}


@pytest.mark.parametrize("spec,want", [
    ({"cat": "a"}, (Clause("cat", "eq", ("a",)),)),
    ({"year": {"eq": 2001}}, (Clause("year", "eq", (2001,)),)),
    ({"cat": {"in": ["a", "b"]}}, (Clause("cat", "in", ("a", "b")),)),
    ({"year": {"gte": 2000, "lt": 2010}}, (Clause("year", "range", (), 2000, True, 2010, False),)),
    ({"price": {"gt": 1.5}}, (Clause("price", "range", (), 1.5, False, None, True),)),
    ({"price": {"lte": 3}}, (Clause("price", "range", (), None, True, 3, True),)),
    ({"ok": True, "cat": "x"}, (Clause("cat", "eq", ("x",)), Clause("ok", "eq", (True,)))),
    ({"year": {"eq": 2001, "gt": None}}, (Clause("year", "eq", (2001,)),)),    # null operators are absent
    ({}, None),
    (None, None),
])
def test_parse_filter(spec, want):
    got = parse_filter(spec, KINDS)
    assert got == want
    assert unwire(wire(got)) == got


@pytest.mark.parametrize("spec,field,msg", [
    ({"colour": "red"}, "filter.colour", "unknown filter field"),
    ({"cat": {"gte": "a"}}, "filter.cat", "needs a numeric field"),
    ({"cat": 3}, "filter.cat.eq", "expected a string"),
    ({"year": "2001"}, "filter.year.eq", "expected a number"),
    ({"year": True}, "filter.year.eq", "expected a number"),
    ({"ok": 1}, "filter.ok.eq", "expected true or false"),
    ({"ok": {"gt": 0}}, "filter.ok", "needs a numeric field"),
    ({"year": {"between": 1}}, "filter.year", "unknown operator 'between'"),
    ({"year": {}}, "filter.year", "empty condition"),
    ({"year": {"eq": 1, "lt": 3}}, "filter.year", "stand alone"),
    ({"year": {"gt": 1, "gte": 2}}, "filter.year", "at most one lower bound"),
    ({"year": {"in": []}}, "filter.year.in", "non-empty list"),
    ({"year": {"in": 5}}, "filter.year.in", "non-empty list"),
    ({"cat": {"in": ["a", 1]}}, "filter.cat.in[1]", "expected a string"),
    ({"year": {"lt": float("nan")}}, "filter.year.lt", "finite"),
    ({"year": 1 << 70}, "filter.year.eq", "64-bit"),
    ({"cat": {"eq": [1]}}, "filter.cat.eq", "a list"),
    ([1, 2], "filter", "object"),
])
def test_bad_filters_name_the_field(spec, field, msg):
    with pytest.raises(FilterError, match=msg) as e:
        parse_filter(spec, KINDS)
    assert e.value.field == field and str(e.value).startswith(field)


def test_filterable_fields():
    schema = pa.schema([("id", pa.int64()), ("title", pa.string()), ("year", pa.int16()),
                        ("price", pa.float32()), ("ok", pa.bool_()), ("tags", pa.list_(pa.string())),
                        ("cat", pa.dictionary(pa.int32(), pa.string()))])
    stored = ["title", "year", "price", "ok", "tags", "cat"]
    assert filterable(schema, stored, None) == {"year": "int", "price": "float", "ok": "bool"}
    assert filterable(schema, stored, ["title", "cat"]) == {"title": "str", "cat": "str"}
    with pytest.raises(ConfigError, match="filter_fields: 'tags' has type"):
        filterable(schema, stored, ["tags"])
    with pytest.raises(ConfigError, match="filter_fields: 'nope' is not a stored field"):
        filterable(schema, stored, ["nope"])


def test_attributes_mask_with_nulls_and_unknown_values():
    t = pa.table({"id": [9, 3, 5, 7], "year": pa.array([2000, None, 2010, 1990], pa.int64()),
                  "cat": pa.array(["a", "b", None, "a"]), "ok": pa.array([True, False, None, True])})
    a = Attributes.from_table(t, {"year": "int", "cat": "str", "ok": "bool"})
    assert a.ids.tolist() == [3, 5, 7, 9]            # sorted by id, columns aligned
    m = lambda spec: a.ids[a.mask(parse_filter(spec, a.kinds))].tolist()  # noqa: E731
    assert m({"cat": "a"}) == [7, 9]
    assert m({"cat": "zzz"}) == []
    assert m({"cat": {"in": ["b", "zzz"]}}) == [3]
    assert m({"year": {"gte": 2000}}) == [5, 9]      # a null year never matches
    assert m({"year": {"lt": 2000}}) == [7]
    assert m({"ok": False}) == [3]                   # a null bool is not False
    assert m({"ok": True, "year": {"gt": 1995}}) == [9]


@pytest.mark.parametrize("ids,nmatch,kind", [
    (np.arange(100), 100, "all"),
    (np.arange(100) * 3 + 1, 10, "bitmap"),          # dense enough: a bitmap of 38 bytes
    (np.array([5, 1 << 40]), 1, "batch"),            # sparse ids: a hash set of the matches
    (np.array([5, 6, 1 << 40]), 2, "not-batch"),     # ... or of the non-matches, when fewer
    (np.array([-4, 3]), 1, "batch"),                 # negative ids cannot index a bitmap
])
def test_selector_kind(ids, nmatch, kind):
    assert selector_kind(np.sort(ids), nmatch) == kind


@pytest.mark.parametrize("kind", ["bitmap", "batch", "not-batch"])
def test_every_selector_selects_exactly_the_matches(kind):
    from shards.storage.faissio import faiss

    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(5000, 600, replace=False)).astype(np.int64)
    mask = rng.random(600) < 0.3
    x = rng.random((600, 8)).astype(np.float32)
    index = faiss().IndexIDMap(faiss().IndexFlatL2(8))
    index.add_with_ids(x, ids)
    sel = Selection(ids, mask, kind)
    params = faiss().SearchParameters()
    params.sel = sel.sel
    _, I = index.search(x[:3], 600, params=params)
    assert set(I[0][I[0] >= 0]) == set(ids[mask])


# ---- filtered search through the Python API, against brute force -------------------------------

N, D = 4000, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    src = tmp_path_factory.mktemp("filt") / "corpus"
    src.mkdir()
    x = clustered(N, D, seed=5)
    ids = np.arange(N, dtype=np.int64) * 7 + 3
    rng = np.random.default_rng(1)
    attrs = {"year": rng.integers(1990, 2020, N), "cat": rng.choice(list("abcdefgh"), N),
             "price": np.round(rng.random(N) * 1000, 1)}
    pq.write_table(vector_table(ids, x, **attrs), str(src / "part-0.parquet"), row_group_size=1000)
    return str(src), ids, x, attrs


def brute_force(x, ids, attrs, xq, k, match):
    """Exact top-k by L2 over the matching documents."""
    xs, ms = x[match], ids[match]
    d = ((xq[:, None, :] - xs[None, :, :]) ** 2).sum(-1)
    o = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, o, 1), ms[o]


SPECS = [
    ({"cat": {"in": ["a", "b"]}}, lambda a: np.isin(a["cat"], ["a", "b"])),
    ({"year": {"gte": 2015}, "cat": "c"}, lambda a: (a["year"] >= 2015) & (a["cat"] == "c")),
    ({"price": {"gte": 100, "lt": 103}}, lambda a: (a["price"] >= 100) & (a["price"] < 103)),  # ~12 docs
]


@pytest.mark.parametrize("factory,shards,sharding", [("Flat", 3, "hash"), ("IVF32,Flat", 2, "hash"),
                                                     ("IVF32,Flat", 4, "ivf")])
def test_filtered_search_equals_brute_force(ray_session, corpus, tmp_path, factory, shards, sharding):
    """Exact indexes (and IVF with every list probed) return brute force's filtered top-k; at
    nprobe=1, IVF still returns k matching results whenever k documents match, even when the
    query's own lists (and, with ivf sharding, its own shards) hold fewer."""
    from shards.search.router import Router

    src, ids, x, attrs = corpus
    root = str(tmp_path / "index")
    build(ray_session, source=src, index_root=root, vector_column="vector", fields=["year", "cat", "price"],
          factory=factory, shards=shards, sharding=sharding, metric="l2")
    r = Router(root, backend="local", filter_fields=["year", "cat", "price"])
    xq, k = x[::211][:16], 10
    for spec, fn in SPECS:
        match = fn(attrs)
        want = min(k, int(match.sum()))
        D0, I0 = brute_force(x, ids, attrs, xq, k, match)
        D1, I1 = r.search_vectors(xq, k, nprobe=32, filter=spec)
        np.testing.assert_allclose(D1[:, :want], D0[:, :want], rtol=1e-4, atol=1e-3)
        np.testing.assert_array_equal(I1[:, :want], I0[:, :want])
        assert (I1[:, want:] == -1).all()
        out = r.search_outcome(xq, k, nprobe=1, filter=spec)
        assert ((out.I >= 0).sum(1) == want).all(), spec
        assert np.isin(out.I[out.I >= 0], ids[match]).all()
        if sharding == "ivf" and match.sum() < 20:
            assert (out.touched == shards).any()   # short answers went on to the other shards
    unfiltered = r.search_outcome(xq, k, nprobe=1)
    if sharding == "ivf":
        assert unfiltered.touched.mean() < shards  # IVF routing skips shards
    else:
        assert (unfiltered.touched == shards).all()
    r.close()

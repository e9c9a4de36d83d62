"""shardex eval: recall against exact search per nprobe, on held-out or given queries; JSON, PNG,
the Ray job wrapper; and the published default nprobe is what eval finds on the same queries."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from index_builder.cli import main
from index_builder.config import EvalConfig
from index_builder.eval.evaluate import evaluate, figure, label, lines
from index_builder.eval.measures import drop_own, recall_at_k
from shards.config import make
from shards.errors import ConfigError
from shards.storage.manifest import current_version, load_manifest
from shards.storage.store import Store

from helpers import build, write_vector_corpus

N, D = 3000, 32


@pytest.fixture(scope="module")
def index(ray_session, tmp_path_factory):
    """An ivf-sharded IVF-Flat index (nprobe = nlist is exact search) and its vectors."""
    tmp = tmp_path_factory.mktemp("eval")
    ids, x = write_vector_corpus(str(tmp / "corpus"), n=N, d=D, files=2, seed=5)
    root = str(tmp / "index")
    build(ray_session, source=str(tmp / "corpus"), index_root=root, vector_column="vector", factory="IVF32,Flat",
          shards=2, sharding="ivf", metric="l2")
    return root, ids, x


@pytest.fixture(scope="module")
def flat_index(ray_session, tmp_path_factory):
    """A 2-shard Flat index: no lists, no nprobe; its search is the exact search itself."""
    tmp = tmp_path_factory.mktemp("eval-flat")
    write_vector_corpus(str(tmp / "corpus"), n=1200, d=D, files=2, seed=6)
    root = str(tmp / "index")
    build(ray_session, source=str(tmp / "corpus"), index_root=root, vector_column="vector", factory="Flat",
          shards=2, metric="l2")
    return root


# (distances, ids, own ids, k) -> ids after leaving each query's own id out
@pytest.mark.parametrize("I,own,k,want", [
    ([[7, 1, 2]], [7], 2, [[1, 2]]),
    ([[1, 7, 2]], [7], 2, [[1, 2]]),
    ([[1, 2, 7]], [7], 2, [[1, 2]]),
    ([[1, 2, 3]], [7], 2, [[1, 2]]),          # not found: the first k stay
    ([[7, -1, -1]], [7], 2, [[-1, -1]]),
    ([[4, 5], [5, 4]], [4, 4], 1, [[5], [5]]),
])
def test_drop_own(I, own, k, want):
    I = np.array(I)
    _, got = drop_own(np.arange(I.size, dtype=np.float32).reshape(I.shape), I, np.array(own), k)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("I,gt,want", [
    ([[1, 2, 3]], [[1, 2, 3]], 1.0), ([[1, 2, 9]], [[3, 2, 1]], 2 / 3), ([[1, -1, -1]], [[1, -1, -1]], 1.0),
    ([[5, 6, 7]], [[1, 2, 3]], 0.0), ([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 0, 0]], (1 + 1 / 3) / 2),
    ([[1, -1, -1]], [[1, 2, -1]], 1 / 2),     # -1 pads on both sides are not a hit: a share of the 2 true ids
    ([[-1, -1, -1]], [[-1, -1, -1]], 0.0),    # nothing to find
    ([[1, 2, -1]], [[1, 2, 3]], 2 / 3),
])
def test_recall(I, gt, want):
    """The one recall of tune, eval, the benchmarks and the tests (measures.recall_at_k)."""
    assert recall_at_k(np.array(I), np.array(gt), 3) == pytest.approx(want)


def test_eval_cli_writes_json_and_png(index, tmp_path, capsys):
    root, _, _ = index
    out = tmp_path / "report"
    assert main(["eval", root, "--out", str(out), "--num-queries", "300", "--latency-queries", "20"]) == 0
    text = capsys.readouterr().out
    assert "recall@10" in text and str(out / "eval.json") in text
    rep = json.loads((out / "eval.json").read_text())
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = rep["results"]
    assert [r["nprobe"] for r in rows] == [1, 2, 4, 8, 16, 32]
    assert rows[-1]["recall"] == 1.0                      # every list probed: IVF-Flat is exact
    assert all(a["recall"] <= b["recall"] + 1e-9 for a, b in zip(rows, rows[1:], strict=False))
    assert all(r["qps"] > 0 and r["latency_ms"]["p50"] <= r["latency_ms"]["p99"] for r in rows)
    assert rows[0]["shards_per_query"] < rows[-1]["shards_per_query"] == 2  # ivf routing: fewer shards at low nprobe
    assert rep["queries"] == {"source": "300 stored vectors, each left out of its own search", "count": 300,
                              "held_out": True}
    assert rep["nprobe_reaching_target"] == next(r["nprobe"] for r in rows if r["recall"] >= 0.95)
    assert len(rep["machine"]["loadavg"]) == 3
    li = rep["lists"]   # the lists' sizes, from the manifest, and their line
    assert li["cap"] == 4.0 and li["mean"] == round(N / 32, 1) and li["largest"] >= li["mean"] and li["imbalance"] >= 1
    assert f"lists        imbalance {li['imbalance']:.3f}, largest {li['largest']:,}" in text


def test_eval_plot_is_the_nprobe_curve_and_the_target(index):
    root, _, _ = index
    rep = evaluate(make(EvalConfig, {"index_root": root, "nprobe": "1,4,32", "num_queries": 100,
                                     "latency_queries": 0}))
    assert rep["search"] == "ivf" and all(r["runs"] >= 1 and r["qps"] > 0 for r in rep["results"])
    ax = figure(rep).axes[0]
    assert [t.get_text() for t in ax.texts] == ["nprobe 1", "nprobe 4", "nprobe 32"]
    assert len(ax.lines[0].get_xydata()) == 3 and ax.lines[1].get_ydata()[0] == 0.95  # the target's line
    assert lines(rep)[-1].startswith("target       recall@10 >= 0.95: nprobe ")


def test_eval_of_a_flat_index_is_one_exact_row(flat_index, tmp_path, capsys):
    """No nprobe to sweep: one row labelled exact, its recall 1.0 (no duplicate vectors here, so no
    ties at the k-th distance), no target line, and a plot of one labelled point."""
    out = tmp_path / "report"
    assert main(["eval", flat_index, "--out", str(out), "--num-queries", "200", "--latency-queries", "10"]) == 0
    text = capsys.readouterr().out
    assert "exact (brute force)" in text and "target" not in text and "nprobe" not in text
    rep = json.loads((out / "eval.json").read_text())
    assert rep["search"] == "exact" and rep["nlist"] is None and rep["nprobe_reaching_target"] is None
    [row] = rep["results"]
    assert row["nprobe"] is None and row["recall"] == 1.0 and row["qps"] > 0 and row["runs"] >= 1
    ax = figure(rep).axes[0]
    assert len(ax.lines) == 1 and len(ax.lines[0].get_xydata()) == 1     # one point, no target line
    assert [t.get_text() for t in ax.texts] == ["exact (brute force)"] and ax.get_legend() is None
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_nprobe_on_a_flat_index_is_refused(flat_index):
    with pytest.raises(ConfigError, match=r"nprobe: Flat has no inverted lists to probe; leave --nprobe out"):
        evaluate(make(EvalConfig, {"index_root": flat_index, "nprobe": "1,4"}))


@pytest.mark.parametrize("kind,factory,want", [("ivf", "IVF32,Flat", "nprobe 4"),
                                               ("exact", "Flat", "exact (brute force)"),
                                               ("fixed", "HNSW32", "HNSW32 (no nprobe)")])
def test_row_labels(kind, factory, want):
    assert label({"nprobe": 4 if kind == "ivf" else None}, kind, factory) == want


def test_published_nprobe_agrees_with_eval(index):
    """Publish's default nprobe (measured by tune on 200 held-out vectors) is what eval finds on
    1,000 others: within one step of the ladder, at about the same recall."""
    root, _, _ = index
    store = Store(root)
    m = load_manifest(store, current_version(store))
    assert m.search.recall_at_10 >= m.search.target_recall == 0.95 and m.search.eval_queries == 200
    rep = evaluate(make(EvalConfig, {"index_root": root, "num_queries": 1000, "latency_queries": 0, "seed": 7}))
    assert rep["nprobe_reaching_target"] in (m.search.nprobe // 2, m.search.nprobe, m.search.nprobe * 2)
    row = next(r for r in rep["results"] if r["nprobe"] == m.search.nprobe)
    assert abs(row["recall"] - m.search.recall_at_10) < 0.03


def test_eval_given_vectors(index, tmp_path):
    root, _, x = index
    q = tmp_path / "q.npy"
    np.save(q, x[:50] + 0.01)
    rep = evaluate(make(EvalConfig, {"index_root": root, "queries": str(q), "nprobe": "2,32", "k": 5,
                                     "latency_queries": 0}))
    assert rep["queries"]["count"] == 50 and not rep["queries"]["held_out"]
    assert [r["nprobe"] for r in rep["results"]] == [2, 32] and rep["results"][1]["recall"] == 1.0


@pytest.mark.parametrize("content,name,match", [
    ("how to sort\n", "q.txt", "built from precomputed vectors"),
    ("", "q.txt", "holds no queries"),
    (np.zeros((3, 7), np.float32), "q.npy", "dimension 7, the index has 32"),
])
def test_eval_bad_queries(index, tmp_path, content, name, match):
    root, _, _ = index
    path = tmp_path / name
    np.save(path, content) if name.endswith(".npy") else path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        evaluate(make(EvalConfig, {"index_root": root, "queries": str(path)}))


@pytest.mark.parametrize("opts,match", [({"nprobe": "0,4"}, "nprobe"), ({"k": 0}, "k: must be"),
                                        ({"target_recall": 1.5}, "target_recall"), ({"nprobes": 3}, "unknown")])
def test_eval_config_errors(opts, match):
    with pytest.raises(ConfigError, match=match):
        make(EvalConfig, {"index_root": "x", **opts})


@pytest.mark.parametrize("cmd,model", [("eval", "EvalConfig"), ("build", "BuildConfig"), ("encode", "BuildConfig"),
                                       ("reindex", "ReindexConfig"), ("serve", "ServeConfig")])
def test_options_come_from_the_model_with_each_default_once(cmd, model):
    """Every field but the positional ones is an option whose help is its description, with one
    default: the one the description names in words, else the model's (none for None and flags)."""
    import argparse

    from index_builder.cli import config_model, parser

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    opts = {a.dest: a for a in sub._actions if a.option_strings}
    m = config_model(model)
    for name, f in m.model_fields.items():
        if name in ("source", "index_root"):
            continue
        h = opts[name].help
        assert h.startswith(f.description.split(" (default: ")[0]) and h.count("(default:") <= 1, (name, h)
        if cmd != "reindex" and "(default:" not in f.description and f.default not in (None, False, True):
            assert h.endswith(f"(default: {f.default})"), (name, h)
        assert opts[name].default is None          # an option not given leaves YAML's value or the model's
    assert all(a.option_strings == (["-k"] if d == "k" else ["--" + d.replace("_", "-")]) for d, a in opts.items()
               if d in m.model_fields)         # one-letter fields are short options, as eval's -k


def test_eval_as_a_ray_job_entrypoint(index, tmp_path):
    """python -m jobs.eval --config eval.yaml: YAML keys are eval's options; flags override them."""
    root, _, _ = index
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"index_root: {root}\nnprobe: [4, 32]\nnum_queries: 100\nlatency_queries: 0\n"
                   f"out: {tmp_path / 'out'}\n")
    p = subprocess.run([sys.executable, "-m", "jobs.eval", "--config", str(cfg), "--json", "-k", "5"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["k"] == 5 and [r["nprobe"] for r in rep["results"]] == [4, 32]
    assert (tmp_path / "out" / "eval.png").exists()

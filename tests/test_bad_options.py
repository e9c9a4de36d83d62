"""Bad options and files, met before any work is spent where that can be known: a malformed
--config, --factory strings faiss or the merge cannot take, bad --vectors/--queries files, local
paths and a closed stdout; then the warnings where the user likely erred (zero vectors under ip,
too many shards, recall under target) and --memory-budget holding every shard's trained part.
Corpus and row problems are in test_bad_input.py; both judge errors with helpers.error_line.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from index_builder.cli import main
from shards.storage.manifest import current_version, load_manifest
from shards.storage.store import Store

from helpers import PREFIX, SHARDEX, build, cli_env, clustered, error_line, main_error, run_cli, write_vec

# ------------------------------------------------------- 1. a malformed --config (before Ray)

def test_malformed_yaml_config(tmp_path):
    cfg = tmp_path / "build.yaml"
    cfg.write_text("source: corpus\nindex_root: [idx\n")
    rc, line = run_cli("build", "--config", str(cfg))
    assert rc == 1 and f"--config {cfg}: line 3, column 1: not valid YAML" in line


# ------------------------------------------------------- 2. --factory strings refused at plan time

@pytest.mark.parametrize("factory, expect", [
    ("IVF0,PQ3", "should be a multiple of the number of subquantizers"),    # 16 % 3: faiss cannot build it
    ("IVF0,PQ4", "has no IVF lists"),
    ("IVF4,PQ5", "faiss cannot build 'IVF4,PQ5' for d=16 (The dimension of the vector (d) should be a multiple"),
    ("lol,what", "could not parse index string"),
    ("IVF4096,Flat", "4,096 IVF lists"),                                      # more lists than the 200 vectors
    ("HNSW32", "cannot be merged from the add units' codes"),                 # fails at merge, after add, today
    ("IVF4,PQ4,RFlat", "IndexRefineFlat"),
])
def test_factory_refused_before_encoding(ray_session, vec_corpus, capsys, factory, expect):
    src, ids, x = vec_corpus
    write_vec(src, ids, x)
    idx = src.parent / "idx"
    line = main_error(capsys, str(src), str(idx), "--vector-column", "vector", "--factory", factory)
    assert line.startswith(PREFIX + "factory: ") and expect in line
    assert "--factory auto" in line or "give an IVF index" in line                # the fix
    assert not (idx / "embeddings").exists() and not (idx / "work").exists()     # no work was spent on it


def test_ivf_sharding_of_a_flat_factory_refused(ray_session, vec_corpus, capsys):
    src, ids, x = vec_corpus
    write_vec(src, ids, x)
    line = main_error(capsys, str(src), str(src.parent / "idx"), "--vector-column", "vector", "--factory", "Flat",
                      "--sharding", "ivf")
    assert "ivf needs an IVF index" in line and "--sharding hash" in line


# ------------------------------------------------------- 3. a bad --vectors / --queries file

def _npy_cases(tmp: Path) -> dict[str, Path]:
    good = tmp / "good.npy"
    np.save(good, np.ones((3, 16), np.float32))
    data = good.read_bytes()
    files = {"empty": b"", "truncated": data[:-20], "header only": data[:40], "not npy": b"hello world" * 10}
    out = {}
    for name, b in files.items():
        out[name] = tmp / f"{name.replace(' ', '-')}.npy"
        out[name].write_bytes(b)
    out["strings"] = tmp / "strings.npy"
    np.save(out["strings"], np.array(["a", "b"]))
    out["3-d"] = tmp / "3d.npy"
    np.save(out["3-d"], np.ones((2, 3, 4), np.float32))
    return out


@pytest.mark.parametrize("case, expect", [
    ("empty", "not a readable .npy array (No data left in file)"),
    ("truncated", "not a readable .npy array (Failed to read all data"),
    ("header only", "not a readable .npy array (EOF"),
    ("not npy", "not a readable .npy array (no .npy header)"),
    ("strings", "holds <U1 values, not real numbers"),
    ("3-d", "an array of shape (2, 3, 4), not [n, d] vectors"),
])
def test_search_vectors_bad_file(tmp_path, case, expect):
    """Read before the index is opened, so no index is needed to see the error."""
    path = _npy_cases(tmp_path)[case]
    rc, line = run_cli("search", str(tmp_path / "idx"), "--vectors", str(path), "--local")
    assert f"--vectors {path}: {expect}" in line and "numpy.save" in line


def test_search_vectors_wrong_dimension(ray_session, tmp_path, capsys):
    src = tmp_path / "corpus"
    write_vec(src, np.arange(200, dtype=np.int64), clustered(200, 16, seed=3))
    root = str(tmp_path / "idx")
    build(ray_session, source=str(src), index_root=root, vector_column="vector", factory="Flat")
    q = tmp_path / "q.npy"
    np.save(q, np.ones((2, 15), np.float32))
    capsys.readouterr()
    assert main(["search", root, "--vectors", str(q), "--local"]) == 1
    line = error_line(capsys.readouterr().err)
    assert f"--vectors {q}: dimension 15, this index has 16" in line


@pytest.mark.parametrize("content, expect", [
    (b"not parquet at all" * 20, "not a readable Parquet file"),
    (b"", "not a readable Parquet file"),
])
def test_eval_queries_bad_parquet(tmp_path, content, expect):
    from index_builder.eval.queries import load_queries
    from shards.errors import ConfigError

    path = tmp_path / "q.parquet"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_queries(str(path), None, None)   # the file is refused before the index is looked at
    assert f"queries: {path}: {expect}" in str(e.value) and "'vector' or 'text' column" in str(e.value)


def test_eval_queries_bad_npy(tmp_path):
    from index_builder.eval.queries import load_queries
    from shards.errors import ConfigError

    path = _npy_cases(tmp_path)["truncated"]
    with pytest.raises(ConfigError, match=r"^--queries .*truncated\.npy: not a readable \.npy array"):
        load_queries(str(path), None, None)


# ------------------------------------------------------- 4. local paths, and a closed stdout

def test_index_root_under_a_file_is_a_local_message(tmp_path):
    (tmp_path / "afile").write_text("x")
    src = tmp_path / "corpus"
    write_vec(src, np.arange(200, dtype=np.int64), clustered(200, 16, seed=3))
    rc, line = run_cli("build", str(src), str(tmp_path / "afile" / "idx"), "--vector-column", "vector",
                       "--factory", "Flat", timeout=300)
    assert str(tmp_path / "afile") in line and "is a file, not a directory" in line
    assert "credentials" not in line and "endpoint" not in line


def test_closed_stdout_pipe_exits_quietly(ray_session, tmp_path):
    """`shardex versions ROOT | head -0`: the reader is gone before the listing is written."""
    src = tmp_path / "corpus"
    write_vec(src, np.arange(200, dtype=np.int64), clustered(200, 16, seed=3))
    root = str(tmp_path / "idx")
    build(ray_session, source=str(src), index_root=root, vector_column="vector", factory="Flat")
    env = cli_env()
    r, w = os.pipe()
    os.close(r)                                    # no reader: the first write is EPIPE
    try:
        p = subprocess.run([SHARDEX, "versions", root], stdout=w, stderr=subprocess.PIPE, text=True,
                           timeout=120, env=env)
    finally:
        os.close(w)
    assert p.stderr == "" and p.returncode == 141, p.stderr   # quiet: no traceback, no "storage:" error


# ------------------------------------------------------- 5. warnings where the user likely erred

def test_zero_vectors_under_ip_and_too_many_shards_warn(ray_session, tmp_path):
    """All-zero vectors under ip score 0 against everything; 8 shards of 25 vectors cost more than
    they save. The build goes on, and says so in its log and summary."""
    src = tmp_path / "corpus"
    write_vec(src, np.arange(200, dtype=np.int64), np.zeros((200, 16), np.float32))
    s = build(ray_session, source=str(src), index_root=str(tmp_path / "idx"), vector_column="vector",
              factory="Flat", metric="ip", shards=8)
    text = "\n".join(s.warnings)
    assert "200 of 200 training vectors (100%) have a norm of ~0 under --metric ip" in text
    assert "8 shards over 200 vectors is 25.0 a shard" in text and "--shards 1" in text
    assert any(ln.startswith("warning      vectors: ") for ln in s.lines())


def test_sensible_build_has_no_warnings(ray_session, tmp_path):
    src = tmp_path / "corpus"
    write_vec(src, np.arange(200, dtype=np.int64), clustered(200, 16, seed=3))
    s = build(ray_session, source=str(src), index_root=str(tmp_path / "idx"), vector_column="vector",
              factory="Flat", metric="ip")
    assert s.warnings == []


def test_recall_below_target_warns():
    from index_builder.build.tune import recall_warning

    w = recall_warning({"nprobe": 64, "recall_at_10": 0.81}, 0.95)
    assert "0.810 recall@10 at nprobe=64 is under --target-recall 0.95" in w and "--memory-budget" in w
    assert recall_warning({"nprobe": 4, "recall_at_10": 0.96}, 0.95) is None


# ------------------------------------------------------- 6. --memory-budget holds every shard's trained part

def test_auto_factory_serves_within_the_budget(ray_session, tmp_path):
    """12k x 64 in 4 shards under 1 MiB: PQ64's codes fit, but not with 4 copies of the 128 KiB
    trained part; the chooser takes PQ32, and the published shard files add up to under the budget."""
    from helpers import write_vector_corpus

    write_vector_corpus(tmp_path / "corpus", n=12_000, d=64, files=2)
    s = build(ray_session, source=str(tmp_path / "corpus"), index_root=str(tmp_path / "idx"),
              vector_column="vector", memory_budget="1M", shards=4, part_rows=4000)
    assert s.factory == "IVF256,PQ32", s.factory
    m = load_manifest(Store(str(tmp_path / "idx")), current_version(Store(str(tmp_path / "idx"))))
    served = sum(sh.bytes + (sh.ivfdata_bytes or 0) for sh in m.shards)   # each shard file holds its trained part
    assert s.index_bytes <= served <= 1 << 20, served
    from index_builder.plan.factory import LIST_OVERHEAD, trained_bytes
    assert 12_000 * 72 * LIST_OVERHEAD + 4 * trained_bytes("IVF256,PQ64", 64) > 1 << 20   # what it used to pick

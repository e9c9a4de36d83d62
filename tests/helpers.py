"""What several test modules share: seeded corpora, the build call, top-k comparison, a client and
a load for the Serve app, the cluster/ manifests, free ports, and waiting for a condition.

Fixtures live in conftest.py and the real `ray start --head` in rayhead.py. No test module
imports another: what two of them need lives here.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests

from shards import raytools

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


# ---------------------------------------------------------------- ports and waiting

def free_port() -> int:
    """A port of 127.0.0.1 that is free now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable, timeout: float, period: float = 0.2, *, what: str | Callable[[], str]):
    """raytools.wait_until, failing the test: after `timeout` s, an AssertionError
    naming `what` (a string, or a function giving one: the state at the end). An exception raised by
    the predicate ends the wait at once, so a predicate can assert what must hold meanwhile."""
    v = raytools.wait_until(predicate, timeout, period)
    if v is None:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}")
    return v


# ---------------------------------------------------------------- corpora

def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Structured vectors (faiss's SyntheticDataset): PQ recall on i.i.d. Gaussians means nothing."""
    from faiss.contrib.datasets import SyntheticDataset

    return SyntheticDataset(d, 0, n, 0, seed=seed).get_database().astype(np.float32)


def vector_table(ids, x: np.ndarray, **extra) -> pa.Table:
    vec = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    return pa.table({"id": ids, "vector": vec, **extra})


def write_vector_corpus(path, n: int = 3000, d: int = 32, files: int = 2, seed: int = 0,
                        row_group: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """n clustered vectors with int64 ids (3*i+1) and a 'title' field, split over `files` files."""
    os.makedirs(path, exist_ok=True)
    x = clustered(n, d, seed)
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    t = vector_table(ids, x, title=[f"doc {i}" for i in ids])
    for f, (a, b) in enumerate(_bounds(n, files)):
        pq.write_table(t.slice(a, b - a), os.path.join(path, f"part-{f}.parquet"), row_group_size=row_group)
    return ids, x


def _bounds(n: int, k: int) -> list[tuple[int, int]]:
    b = np.linspace(0, n, k + 1).astype(int)
    return list(zip(b[:-1], b[1:]))


def write_filterable_corpus(path: str, ids: np.ndarray, x: np.ndarray, seed: int) -> dict:
    """Two files with a title and three filterable attributes (FILTERABLE); returns the attributes."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    attrs = {"year": rng.integers(1990, 2020, len(ids)), "cat": rng.choice(["a", "b", "c", "d"], len(ids)),
             "price": np.round(rng.random(len(ids)) * 100, 2)}
    t = vector_table(ids, x, title=[f"doc {i}" for i in ids], **attrs)
    h = len(ids) // 2
    pq.write_table(t.slice(0, h), f"{path}/part-0.parquet", row_group_size=500)
    pq.write_table(t.slice(h), f"{path}/part-1.parquet", row_group_size=500)
    return attrs


def read_part(src: Path, f: int) -> tuple[np.ndarray, np.ndarray, list]:
    """(ids, vectors, titles) of write_vector_corpus's file f."""
    t = pq.read_table(src / f"part-{f}.parquet")
    col = t.column("vector").combine_chunks()
    x = col.values.to_numpy().reshape(len(col), -1)
    return t.column("id").to_numpy(), x.copy(), t.column("title").to_pylist()


def mutate(src: Path, seed: int = 11, shift: float = 0.0, k: int = 100) -> dict:
    """Delete k rows and change k rows of file 1, add a file of k new documents."""
    ids, x, titles = read_part(src, 1)
    gone, changed = ids[:k], ids[k:2 * k]
    fresh = clustered(2 * k, x.shape[1], seed=seed) + shift
    x, titles, ids = x[k:], titles[k:], ids[k:]
    x[:k] = fresh[:k]
    titles[:k] = [f"changed {i}" for i in changed]
    pq.write_table(vector_table(ids, x, title=titles), src / "part-1.parquet")
    new = np.arange(k, dtype=np.int64) * 3 + 10**6
    pq.write_table(vector_table(new, fresh[k:], title=[f"new {i}" for i in new]), src / "part-2.parquet")
    return {"gone": gone, "changed": changed, "changed_x": fresh[:k], "new": new, "new_x": fresh[k:]}


# ---------------------------------------------------------------- building and comparing

def build(ray_session, **kw):
    """Build with the real pipeline; part_rows small so every stage has several units of work."""
    from index_builder.config import BuildConfig
    from index_builder.pipeline import build as _build

    kw.setdefault("part_rows", 1000)
    return _build(BuildConfig(**kw))


def build_config(**kw):
    """A BuildConfig through the CLI's path (make), with a source and an index root unless given."""
    from index_builder.config import BuildConfig, make

    return make(BuildConfig, {"source": "corpus", "index_root": "index", **kw})


def monolithic(root: str, ids: np.ndarray, x: np.ndarray, version: str | None = None, nprobe: int | None = None):
    """One index: a version's (CURRENT's) own trained index, every vector added to it, at the
    version's default nprobe unless given."""
    from shards.storage.faissio import read_index, set_nprobe
    from shards.storage.manifest import current_version, load_manifest
    from shards.storage.store import Store

    store = Store(root)
    m = load_manifest(store, version or current_version(store))
    index = read_index(store, m.path(m.trained.file))  # a delta version refers to its parent's
    index.add_with_ids(x, ids)
    set_nprobe(index, nprobe or m.search.nprobe)
    return index


def assert_same_topk(D1, I1, D2, I2):
    """Identical results, ties aside: equal distances, and equal ids wherever the distance is not tied."""
    np.testing.assert_allclose(D1, D2, rtol=1e-5, atol=1e-6)
    for d, a, b in zip(D1, I1, I2):
        tied = np.isclose(d[:, None], d[None, :], rtol=1e-6).sum(1) > 1
        np.testing.assert_array_equal(a[~tied], b[~tied])
        assert set(a) == set(b) or tied.any()


def tmp_files(root) -> list[str]:
    """The temporary files an atomic write leaves if it fails halfway (none, when all is well)."""
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if ".tmp-" in f]


# ---------------------------------------------------------------- the Serve app over HTTP

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FILTERABLE = ["year", "cat", "price"]


class Client:
    def __init__(self, base: str):
        self.base = base
        self.s = requests.Session()

    def post(self, path: str, body=None, headers=AUTH, **kw):
        return self.s.post(self.base + path, json=body, headers=headers, timeout=60, **kw)

    def get(self, path: str, headers=AUTH):
        return self.s.get(self.base + path, headers=headers, timeout=60)

    def search(self, **body):
        r = self.post("/search", body)
        assert r.status_code == 200, r.text
        return r.json()


def start_app(root: str, **kw):
    """A router app on the session's Serve, ready: TOKEN, a 1.5 s shard timeout, FILTERABLE unless given."""
    from shards.config import ServeConfig
    from shards.serve import lifecycle as sv

    kw = {"filter_fields": FILTERABLE, **kw}
    cfg = ServeConfig(index_root=root, port=kw.pop("port"), token=TOKEN, shard_timeout=1.5,
                      shard_cpus=0.05, threads=1, max_queries=64, **kw)
    h = sv.start(cfg)
    sv.wait_ready(h, 120)
    return cfg


def scrape(prefix: str = "ray_shardex_") -> dict[tuple, float]:
    """The samples named prefix* that the Ray nodes' metrics agents export now, summed over the
    processes reporting them: {(name, ((label, value), ...)): value}, labels Ray adds left out."""
    import urllib.request

    import ray
    from prometheus_client.parser import text_string_to_metric_families

    ray_labels = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId"}
    out: dict[tuple, float] = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                if smp.name.startswith(prefix):
                    labels = tuple(sorted((k, v) for k, v in smp.labels.items()
                                          if k not in ray_labels and not k.startswith("otel_")))
                    out[smp.name, labels] = out.get((smp.name, labels), 0.0) + smp.value
    return out


def as_arrays(res: dict, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A /search answer as faiss's (D, I), padded to k with -inf and -1."""
    D = np.array([[h["score"] for h in hs] + [-np.inf] * (k - len(hs)) for hs in res["results"]], dtype=np.float32)
    I = np.array([[h["id"] for h in hs] + [-1] * (k - len(hs)) for hs in res["results"]], dtype=np.int64)
    return D, I


@contextmanager
def under_load(base: str, body: dict, threads: int, pause: float = 0.0):
    """`threads` threads POST body to base/search, each `pause` s after its last answer, until the
    block ends; yields the list they append (sent, received, status, json) to, one per request
    (status 0: the connection failed)."""
    out, stop = [], threading.Event()

    def loop():
        c = Client(base)
        while not stop.is_set():
            t = time.time()
            try:
                r = c.post("/search", body)
            except OSError as e:                # a dropped connection is a lost request: status 0
                out.append((t, time.time(), 0, {"error": repr(e)}))
                continue
            try:
                res = r.json()
            except ValueError:
                res = {"text": r.text}          # recorded, so a test sees the failure
            out.append((t, time.time(), r.status_code, res))
            stop.wait(pause)

    ts = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    try:
        yield out
    finally:
        stop.set()
        for t in ts:
            t.join(timeout=120)


# ---------------------------------------------------------------- cluster/

def docs(path: Path) -> list[dict]:
    import yaml

    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[tuple[str, dict]]:
    """Every Kubernetes object under cluster/kuberay, with the RayJobs embedded in ConfigMaps."""
    import yaml

    out = []
    for f in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for d in docs(f):
            out.append((f.name, d))
            if d["kind"] == "ConfigMap":
                for key, text in d.get("data", {}).items():
                    if key.endswith(".yaml"):
                        out += [(f"{f.name}:{key}", e) for e in yaml.safe_load_all(text) if e]
    return out


def rayservice() -> dict:
    (d,) = [d for _, d in manifests() if d["kind"] == "RayService"]
    return d


# ---------------------------------------------------------------- bad input: the one error line

SHARDEX = str(Path(sys.executable).with_name("shardex"))
PREFIX = "shardex: error: "
FIX = "--bad-rows skip"  # every row-level message says how to go on


def error_line(stderr: str) -> str:
    """The one error line. Every other non-empty stderr line must be a progress log line, so a
    message spread over several lines, or a traceback, fails here."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(PREFIX)]
    assert len(errors) == 1, f"expected one error line, got {len(errors)}:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    stray = [ln for ln in lines if not ln.startswith((PREFIX, "[shardex "))]
    assert not stray, f"stderr has lines other than the error and progress logs:\n{stderr}"
    return errors[0]


def cli_env(**extra) -> dict:
    """The environment of a `shardex` subprocess: the test session's Ray, when it runs, in RAY_ADDRESS,
    so the command joins it (as asked) instead of starting a Ray of its own, which costs seconds.
    Not in this process's own environment: Ray's job client would take it over the address it is given."""
    import ray

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    if ray.is_initialized():
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return {**env, **extra}


def run_cli(*args: str, timeout: int = 120) -> tuple[int, str]:
    """The real `shardex` console script; returns (exit code, the one error line)."""
    p = subprocess.run([SHARDEX, *args], capture_output=True, text=True, timeout=timeout, env=cli_env())
    assert p.returncode != 0, f"exit 0 on bad input:\n{p.stdout}\n{p.stderr}"
    return p.returncode, error_line(p.stderr)


def main_error(capsys, *args: str) -> str:
    """index_builder.cli.main in this process (the session's Ray); returns the one error line."""
    from index_builder.cli import main

    capsys.readouterr()
    rc = main(["build", *args])
    err = capsys.readouterr().err
    assert rc == 1, err
    return error_line(err)


def text_table(ids, texts) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.int64()), "text": pa.array(texts, pa.string())})


def good_texts(n: int, start: int = 0) -> list[str]:
    return [f"document number {i} about topic {i % 7}" for i in range(start, start + n)]


def list_vectors(x: np.ndarray, wrong_dim: dict[int, int] | None = None) -> pa.Array:
    """list<float32> (not fixed size), so a row can have the wrong number of values."""
    rows = [list(map(float, v)) for v in x]
    for r, d in (wrong_dim or {}).items():
        rows[r] = rows[r][:d] if d <= len(rows[r]) else rows[r] + [0.5] * (d - len(rows[r]))
    return pa.array(rows, pa.list_(pa.float32()))


def write(t: pa.Table, path: Path, row_group: int = 100) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, str(path), row_group_size=row_group)
    return str(path)


def write_vec(src: Path, ids, x, fixed: bool = True, wrong_dim=None) -> None:
    vec = vector_table(ids, x).column("vector") if fixed else list_vectors(x, wrong_dim)
    t = pa.table({"id": pa.array(ids, pa.int64()), "vector": vec})
    write(t.slice(0, 100), src / "a.parquet")
    write(t.slice(100, 100), src / "b.parquet")

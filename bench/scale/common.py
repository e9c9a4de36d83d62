"""What the bench/scale scripts share: seeded clustered corpora written as Parquet, a `shardex build`
run from outside with its index root's bytes and its driver's RSS sampled while it runs, and the
byte categories of an index root.

Corpora are made once under bench/out/scale/ (git-ignored), one directory per shape:
  corpus-<n>x<d>-f<files>-s<seed>/part-*.parquet (id int64, vector float32[d]), done.json last
The machine facts, JSON results and the loadavg come from bench/build/common.py.

RSS is read from /proc/<pid>/status (VmRSS, and VmHWM, the kernel's own peak): what psutil
reads on Linux, and psutil is not among the venv's packages.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "bench", "out", "scale")
SHARDEX = os.path.join(os.path.dirname(sys.executable), "shardex")
MiB = 2 ** 20
CENTERS = 1024          # clusters of the synthetic corpus, in its latent space
LATENT = 10             # its intrinsic dimension, as faiss's SyntheticDataset: neighbours mean something
SPREAD = 0.5            # noise around a latent center (centers have std 2): clustered, not separable


def _build_common():
    """bench/build/common.py under its own name (both folders call theirs common)."""
    spec = importlib.util.spec_from_file_location("bench_build_common", os.path.join(HERE, "..", "build", "common.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_bc = _build_common()
machine, loadavg, RESULTS = _bc.machine, _bc.loadavg, _bc.RESULTS


def save(name: str, res: dict, quick: bool) -> str:
    """JSON to bench/results/<name>.json, or under bench/out/scale/ for a --quick run (not a result)."""
    out = OUT if quick else RESULTS
    os.makedirs(out, exist_ok=True)
    path = f"{out}/{name}.json"
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    return path


# ---------------------------------------------------------------- corpora

def clustered(n: int, d: int, files: int, seed: int = 0, row_group: int = 10_000) -> str:
    """n clustered vectors of dimension d in `files` Parquet files of near-equal rows (ids 0..n-1,
    file by file); made once. Points around CENTERS centers of a LATENT-dim space, mapped to d dims
    the way faiss's SyntheticDataset does (a random projection, then sin at random frequencies), so
    IVF-PQ recall behaves as on real data, unlike i.i.d. noise around centers. Each file draws from
    its own seeded stream: a file is the same whatever the others are, and memory is one file's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = f"{OUT}/corpus-{n}x{d}-f{files}-s{seed}"
    if os.path.exists(f"{path}/done.json"):
        return path
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    g = np.random.default_rng(seed)
    centers = 2 * g.standard_normal((CENTERS, LATENT), dtype=np.float32)
    proj = g.random((LATENT, d), dtype=np.float32)
    freq = g.random(d, dtype=np.float32) * 4 + 0.1
    bounds = np.linspace(0, n, files + 1).astype(np.int64)
    for f in range(files):
        a, b = int(bounds[f]), int(bounds[f + 1])
        rng = np.random.default_rng([seed, f])
        z = centers[rng.integers(0, CENTERS, b - a)]
        z += SPREAD * rng.standard_normal(z.shape, dtype=np.float32)
        x = np.sin((z @ proj) * freq)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d)
        pq.write_table(pa.table({"id": np.arange(a, b, dtype=np.int64), "vector": vec}),
                       f"{path}/part-{f:05d}.parquet", row_group_size=row_group)
    with open(f"{path}/done.json", "w") as fh:
        json.dump({"n": n, "d": d, "files": files, "seed": seed, "centers": CENTERS, "latent": LATENT,
                   "spread": SPREAD}, fh)
    return path


# ---------------------------------------------------------------- bytes of an index root

CATEGORIES = ("work", "versions", "versions_docs", "embeddings", "embeddings_docs", "other")


def category(rel: str) -> str:
    """Which part of INDEX_ROOT a file (path relative to it) counts in."""
    p = rel.split("/")
    if p[0] == "work":
        return "work"
    if p[0] == "versions":
        return "versions_docs" if len(p) > 3 and p[2] == "docs" else "versions"
    if p[0] == "embeddings":
        return "embeddings_docs" if "docs" in p[2:-1] else "embeddings"
    return "other"


def files_under(root: str):
    """(path relative to root, bytes) of every file; files that vanish while we look are skipped."""
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            it = list(os.scandir(os.path.join(root, rel)))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in it:
            r = f"{rel}/{e.name}" if rel else e.name
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(r)
                elif e.is_file(follow_symlinks=False):
                    yield r, e.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue


def tree_bytes(root: str) -> dict:
    """Bytes and files per category, and work/<run>/ split by its first level (add, shards, files)."""
    out = dict.fromkeys(CATEGORIES, 0)
    count = dict.fromkeys(CATEGORIES, 0)
    work: dict[str, int] = {}
    for rel, size in files_under(root):
        c = category(rel)
        out[c] += size
        count[c] += 1
        if c == "work":
            p = rel.split("/")
            key = p[2] if len(p) > 3 else "files"
            work[key] = work.get(key, 0) + size
    return {"bytes": out, "files": count, "work": work, "total": sum(out.values())}


class TreeSampler:
    """Walks INDEX_ROOT every `every` s in a thread while a build runs: the peak bytes of each
    category and of the whole root, and the last train record seen (work/<run>/trained.index.json,
    kept in case a build deletes its work dir at the end)."""

    def __init__(self, root: str, every: float):
        self.root, self.every = root, every
        self.peak = dict.fromkeys(CATEGORIES, 0)
        self.peak_total, self.samples, self.train_record = 0, 0, None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.sample()                       # what is left at the end counts too

    def _loop(self):
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self):
        t = tree_bytes(self.root)
        self.samples += 1
        self.peak_total = max(self.peak_total, t["total"])
        for c, b in t["bytes"].items():
            self.peak[c] = max(self.peak[c], b)
        rec = train_record(self.root)
        self.train_record = rec or self.train_record

    def result(self) -> dict:
        return {"every_s": self.every, "samples": self.samples, "peak_bytes": self.peak,
                "peak_total": self.peak_total}


def train_record(root: str) -> dict | None:
    """work/<run>/trained.index.json of the (one) run under root, or None."""
    work = os.path.join(root, "work")
    for run in sorted(os.listdir(work)) if os.path.isdir(work) else []:
        try:
            with open(os.path.join(work, run, "trained.index.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            continue
    return None


# ---------------------------------------------------------------- the driver's memory

def rss_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of one process in KiB, children excluded; None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            kv = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return int(kv["VmRSS"].split()[0]), int(kv["VmHWM"].split()[0])
    except (OSError, KeyError):
        return None                          # gone, or a zombie (no memory fields)


# ---------------------------------------------------------------- a build, from outside

def ray_head():
    """A `ray start --head` of its own (tests/rayhead.py: own ports, temp dir and process group),
    stopped when the block ends, failed or not; yields {"gcs": address for --address, ...}."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from rayhead import start_head

    return start_head(num_cpus=os.cpu_count())


STAGE_LINE = re.compile(r"^\[shardex\s+([\d.]+)s\] (\w+): start")


def stage_starts(stderr: str) -> list[tuple[float, str]]:
    """(seconds since the command started, stage) of each stage, from the build's log lines."""
    return [(float(m.group(1)), m.group(2)) for m in map(STAGE_LINE.match, stderr.splitlines()) if m]


def run_build(source: str, root: str, opts: list[str], env: dict | None = None,
              tree_every: float | None = None, rss_every: float | None = None) -> dict:
    """`shardex build SOURCE ROOT --vector-column vector --json OPTS` as a subprocess, as a user runs
    it. Samples ROOT's bytes every tree_every s and the driver's RSS every rss_every s when asked.
    Returns wall seconds, the summary, stage start times and the samples; raises with the last lines
    of stderr when the build fails."""
    cmd = [SHARDEX, "build", source, root, "--vector-column", "vector", "--json", *opts]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    rss: list[tuple[float, int]] = []
    hwm = 0
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.time()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, text=True)
        sampler = TreeSampler(root, tree_every) if tree_every else None
        try:
            if sampler:
                sampler.__enter__()
            while p.poll() is None:
                r = rss_kib(p.pid) if rss_every else None
                if r:
                    rss.append((round(time.time() - t0, 3), r[0]))
                    hwm = max(hwm, r[1])
                time.sleep(rss_every or 0.2)
        finally:
            if p.poll() is None:             # we were interrupted: the build must not outlive us
                p.kill()
            p.wait()
            if sampler:
                sampler.__exit__(None, None, None)
        wall = time.time() - t0
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if p.returncode:
        tail = "\n".join(err.splitlines()[-15:])
        raise RuntimeError(f"shardex build {source} {root} {' '.join(opts)}: exit {p.returncode}\n{tail}")
    res = {"wall": round(wall, 2), "summary": json.loads(out), "stages": stage_starts(err),
           "cmd": " ".join(cmd[1:])}
    if sampler:
        res["tree"], res["train_record"] = sampler.result(), sampler.train_record
    if rss_every:
        res["rss"] = {"every_s": rss_every, "samples": rss,
                      "peak_mib": round(max((k for _, k in rss), default=0) / 1024, 1),
                      "hwm_mib": round(hwm / 1024, 1)}
    return res


def stage_at(stages: list[tuple[float, str]], t: float) -> str:
    """The stage running t seconds into the command ("start" before the first)."""
    now = "start"
    for s, name in stages:
        if s <= t:
            now = name
    return now


def mib(b: float) -> str:
    return f"{b / MiB:,.1f}"

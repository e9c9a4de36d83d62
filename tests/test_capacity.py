"""index_builder/plan/capacity.py and costs.py: `shardex plan`'s model of time and bytes, as tables of
parametrize rows (the rules: time linear in N at a fixed factory, more nodes never slower, GPU-hours
= N / rate / 3600, bytes as DESIGN.md's formulas say), the cost table against the benchmarks'
results files, and the console script. No Ray: the plan reads nothing and starts nothing."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from index_builder.plan import capacity as capacity_module
from index_builder.plan import costs
from index_builder.plan.capacity import STAGES, Cluster, add_units, capacity, predict, train_units
from index_builder.plan.factory import LIST_OVERHEAD, choose_factory, index_plan
from shards.errors import ConfigError

from helpers import REPO, SHARDEX, cli_env, run_cli

GiB = 1 << 30
RESULTS = REPO / "bench" / "results"
HERE = Cluster(1, 2, 0, 24 * GiB)   # the machine the rates were measured on
BIG = Cluster(32, 64, 8, 512 * GiB)
MINILM = costs.model("all-MiniLM-L6-v2")


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


FIT = 10_000_000   # the run of bench/scale/stages.py the compute rates are fitted to: its largest


def _stages() -> dict:
    return _load("scale_stages.json")


def _run(n: int) -> dict:
    return next(r for r in _stages()["runs"] if r["vectors"] == n)


# ---------------------------------------------------------------- the cost table is what was measured

def _measured() -> dict[str, float]:
    """Every measured rate, recomputed from its results file with the model's own work formulas."""
    s, r = _stages(), _run(FIT)
    d, f, secs = s["d"], s["factory"], r["seconds"]
    dd, nl, _, pq, rot = capacity_module._shape(f, d)
    p = index_plan(FIT, d, f, 1, 0)
    km, other = train_units(p.train_vectors, nl, dd, pq, rot)
    merge = next(r for r in _load("build_ondisk_merge.json")["runs"] if not r["ondisk"])
    return {"kmeans_unit": HERE.cores * secs["train"] / (km + other),
            "add_unit": HERE.cores * secs["add"] / (FIT * add_units(d, dd, nl, pq, rot)),
            "merge_bytes": merge["bytes"] / merge["seconds"],   # a 522 MB shard: bandwidth, not task overhead
            "copy_bytes": FIT * d * 4 / (HERE.cores * secs["encode"]),
            "encode_gpu": _load("encode_gpu.json")["docs_per_s"]["shardex_fp16_two_threads"],
            "encode_cpu": _load("encode_cpu.json")["shardex_docs_per_s"] / 2,
            "feed_core": _load("encode_feed.json")["corpora"]["docstrings"]["feeder_2"]["docs_per_s_per_process"]}


def test_every_measured_rate_is_its_results_file():
    got = _measured()
    measured = {k for k, r in costs.RATES.items() if r.measured}
    assert measured == set(got)
    for k in measured:
        r = costs.RATES[k]
        assert r.value == pytest.approx(got[k], rel=1e-3), k
        assert (REPO / r.source.split(":")[0]).exists(), r.source
    for k, r in costs.RATES.items():
        assert r.unit and r.note and (r.measured or "not measured" in r.note), k


@pytest.mark.parametrize("n", [1_000_000, 4_000_000, 10_000_000])
def test_the_model_predicts_the_runs_it_came_from(n):
    """On the machine and shape the rates were fitted at (the 10M run), the vectors' copy, train and
    add of the smaller runs are within 25% too: the model's work grows with N as the stages' does."""
    s = _stages()
    p = predict(n, s["d"], s["factory"], s["shards"], HERE)
    for stage in ("encode", "train", "add"):
        assert p[stage].seconds == pytest.approx(_run(n)["seconds"][stage], rel=0.25), stage


# ---------------------------------------------------------------- the rules of the model

ROWS = [  # n, d, factory, shards, cluster, encoder
    (2_000_000, 128, "IVF4096,PQ32", 1, HERE, None),
    (50_000_000, 384, "IVF16384,PQ48", 4, Cluster(4, 16, 1, 128 * GiB), MINILM),
    (200_000_000, 768, "OPQ64_256,IVF32768,PQ64", 20, BIG, MINILM),
    (10_000_000, 96, "IVF8192,Flat", 8, Cluster(2, 8, 0, 64 * GiB), MINILM),
    (30_000_000, 64, "IVF4096,SQ8", 3, Cluster(3, 4, 0, 32 * GiB), None),
]


@pytest.mark.parametrize("n, d, factory, shards, cl, enc", ROWS)
def test_time_is_linear_in_n_at_a_fixed_factory(n, d, factory, shards, cl, enc):
    """encode and add exactly (no fixed costs); merge and publish affine (each shard's one trained
    part is the intercept); train grows with the sample, then stays once the sample is capped."""
    t = {k: predict(k * n, d, factory, shards, cl, enc) for k in (1, 2, 3, 8, 16)}
    for s in ("encode", "add"):
        assert t[8][s].seconds == pytest.approx(8 * t[1][s].seconds, rel=1e-9), s
    for s in ("merge", "publish"):
        assert len({t[k][s].bound.startswith("I/O") for k in (1, 2, 3)}) == 1   # one regime, one line
        assert t[3][s].seconds - t[2][s].seconds == pytest.approx(t[2][s].seconds - t[1][s].seconds, rel=1e-6)
        assert t[1][s].seconds < t[16][s].seconds <= 16 * t[1][s].seconds, s   # the intercept is >= 0
    trains = [t[k]["train"].seconds for k in (1, 2, 3, 8, 16)]
    assert trains == sorted(trains) and trains[-1] == trains[-2]


@pytest.mark.parametrize("n, d, factory, shards, cl, enc", ROWS)
@pytest.mark.parametrize("grow", ["nodes", "cpus_per_node", "gpus_per_node"])
def test_more_of_a_cluster_is_never_slower(n, d, factory, shards, cl, enc, grow):
    prev = None
    for k in (1, 2, 3, 8, 64):
        c = Cluster(**{**cl.__dict__, grow: k if grow != "gpus_per_node" else k - 1})
        p = predict(n, d, factory, shards, c, enc)
        if prev:
            for s in STAGES:
                assert p[s].seconds <= prev[s].seconds * (1 + 1e-12), (s, grow, k)
        prev = p


@pytest.mark.parametrize("n, model, rate, gpus", [
    (1_000_000_000, "all-MiniLM-L6-v2", None, 8), (12_345_678, None, None, 1),
    (5_000_000, "e5-large", 1200.0, 4), (7, "all-MiniLM-L6-v2", 900.0, 2),
])
def test_gpu_hours_are_n_over_the_rate(n, model, rate, gpus):
    c = capacity(n, None if model == "all-MiniLM-L6-v2" or not model else 1024, model=model, encode_rate=rate,
                 cluster=Cluster(2, 8, gpus, 256 * GiB))
    per_gpu = rate or costs.RATES["encode_gpu"].value
    assert c.gpu_hours == pytest.approx(n / per_gpu / 3600, rel=1e-12)
    assert c.stages["encode"].seconds == pytest.approx(max(n / (2 * gpus * per_gpu),
                                                           c.stages["encode"].written / 2e9), rel=1e-12)
    assert capacity(n, 128, vectors=True).gpu_hours is None


FEED = costs.RATES["feed_core"].value
FWD = costs.RATES["forward_gpu"].value


# (CPUs, GPUs a node, docs/s a GPU) -> CPUs a GPU gets, cores its rate needs, and whether it is CPU-bound
@pytest.mark.parametrize("cpus, gpus, rate, have, need, bound", [
    (8, 1, 5654.6, 8, math.ceil(5654.6 / FEED) + 1, False),
    (96, 8, 5654.6, 12, math.ceil(5654.6 / FEED) + 1, False),
    (8, 8, 5654.6, 1, math.ceil(5654.6 / FEED) + 1, True),      # one CPU a GPU tokenizes at one core's rate
    (16, 4, 4 * FEED, 4, 5, True),                               # 3 tokenizer cores for 4 cores' worth
    (16, 2, FWD, 8, math.ceil(FWD / FEED) + 1, False),
])
def test_the_plan_says_how_many_cores_feed_a_gpu(cpus, gpus, rate, have, need, bound):
    from index_builder.plan.capacity import feed_cores, feed_line

    line = feed_line(Cluster(4, cpus, gpus, 256 * GiB), rate)
    assert feed_cores(rate) == need and line.startswith(f"feed: {have} CPU(s) a GPU")
    assert f"needs {need} cores (one launches, the rest tokenize), at the forward pass alone ({FWD:,.0f}) " \
        f"{feed_cores(FWD)};" in line
    assert ("CPU-bound" in line) == bound
    c = capacity(10**9, model="all-MiniLM-L6-v2", cluster=Cluster(4, cpus, gpus, 256 * GiB), encode_rate=rate)
    assert line in c.lines()


@pytest.mark.parametrize("n, d, factory, shards, code, trained", [
    # trained bytes by hand: 4 x (pre-transform d x D + nlist x D + 256 x D) floats
    (1_000_000, 128, "IVF1024,PQ32", 4, 32, 4 * (1024 * 128 + 256 * 128)),
    (3_000_000, 64, "IVF256,Flat", 2, 256, 4 * 256 * 64),
    (500_000, 96, "IVF512,SQ8", 3, 96, 4 * (512 * 96 + 2 * 96)),
    (10_000_000, 768, "OPQ16_64,IVF2048,PQ16", 5, 16, 4 * (768 * 64 + 2048 * 64 + 256 * 64)),
])
def test_bytes_are_the_formulas(n, d, factory, shards, code, trained):
    p = predict(n, d, factory, shards, HERE)
    emb, payload = n * (4 * d + 8), n * (code + 8)
    shard = math.ceil(n / shards * ((code + 8) * LIST_OVERHEAD))
    assert (p["encode"].read, p["encode"].written) == (n * d * 4, emb)
    assert (p["add"].read, p["add"].written) == (emb, payload)
    assert (p["merge"].read, p["merge"].written) == (payload, shards * (shard + trained))
    assert p["publish"].written == shards * shard + (shards + 1) * trained   # and one for the version
    assert p["train"].written == trained
    assert predict(n, d, factory, shards, HERE, MINILM)["encode"].read == 0   # the text's size is not known


def test_the_plan_picks_what_build_auto_picks():
    c = capacity(1_000_000_000, 768, budget=96 * GiB, cluster=BIG, shards=20)
    assert c.factory == choose_factory(1_000_000_000, 768, 96 * GiB, shards=20).factory
    assert c.gpu_hours == pytest.approx(1e9 / costs.RATES["encode_gpu"].value / 3600)
    free = capacity(1_000_000_000, 768, budget=96 * GiB, cluster=BIG)   # shards: fewest within half a node
    assert free.ram_per_shard <= BIG.node_memory // 2 and not free.on_disk
    small = capacity(1_000_000_000, 768, budget=96 * GiB, cluster=Cluster(32, 64, 8, 16 * GiB))
    assert small.shards > free.shards and small.ram_per_shard <= 8 * GiB


def _gib(text: str) -> int:
    v, unit = re.search(r"to (?:at least )?([\d.]+) (GiB|MiB|TiB)", text).groups()
    return int(float(v) * {"MiB": 1 << 20, "GiB": GiB, "TiB": 1 << 40}[unit])


@pytest.mark.parametrize("n, d, budget, factory, shards", [
    (1_000_000_000, 768, 1 * GiB, None, None), (100_000_000, 128, 256 << 20, None, 2),
    (50_000_000, 384, 2 * GiB, "IVF16384,PQ48", 4), (1_000_000, 64, 64 << 20, "IVF1024,Flat", 1),
])
def test_a_budget_too_small_says_how_much(n, d, budget, factory, shards):
    with pytest.raises(ConfigError) as e:
        capacity(n, d, vectors=True, budget=budget, factory=factory, shards=shards, cluster=BIG)
    msg = str(e.value)
    assert "\n" not in msg and "--memory-budget" in msg and "raise" in msg
    capacity(n, d, vectors=True, budget=_gib(msg), factory=factory, shards=shards, cluster=BIG)   # the fix is enough


@pytest.mark.parametrize("kw, option", [
    (dict(model="no-such-model"), "--model"),
    (dict(vectors=True), "--dim"),
    (dict(model="all-MiniLM-L6-v2", d=768), "--dim"),
    (dict(d=128, vectors=True, factory="HNSW32"), "--factory"),
    (dict(d=128, vectors=True, shards=1, cluster=Cluster(1, 4, 0, 1 * GiB)), "--shards"),
    (dict(d=768, vectors=True, factory="IVF262144,Flat", cluster=Cluster(1, 4, 0, 1 * GiB)), "--node-memory"),
    (dict(d=128, vectors=True, cluster=Cluster(0, 4, 0, GiB)), "--nodes"),
    (dict(d=128, vectors=True, shards=0), "--shards"),
])
def test_bad_options_are_one_line_naming_the_option(kw, option):
    kw = {"n": 100_000_000, "budget": 1 << 40, **kw}
    with pytest.raises(ConfigError) as e:
        capacity(kw.pop("n"), kw.pop("d", None), **kw)
    assert "\n" not in str(e.value) and str(e.value).startswith(option), str(e.value)


# ---------------------------------------------------------------- the console script

def test_shardex_plan_prints_the_plan_and_json():
    args = ["plan", "1e9", "--dim", "768", "--nodes", "32", "--gpus-per-node", "8", "--cpus-per-node", "64",
            "--node-memory", "512G", "--memory-budget", "96G", "--shards", "20"]
    p = subprocess.run([SHARDEX, *args], capture_output=True, text=True, timeout=60, env=cli_env())
    assert p.returncode == 0, p.stderr
    assert re.search(r"^factory: OPQ64_256,IVF\d+,PQ64: ", p.stdout, re.M)
    assert all(re.search(rf"^{s} +\S", p.stdout, re.M) for s in STAGES)
    assert "GPU-hours" in p.stdout and "bench/results/encode_gpu.json" in p.stdout
    j = json.loads(subprocess.run([SHARDEX, *args, "--json"], capture_output=True, text=True, timeout=60,
                                  env=cli_env(), check=True).stdout)
    assert j["shards"] == 20 and set(j["stages"]) == set(STAGES) and j["costs"]["io_bytes"]["measured"] is False
    assert j["seconds"] == pytest.approx(sum(s["seconds"] for s in j["stages"].values()))
    rc, line = run_cli("plan", "1e9", "--dim", "768", "--memory-budget", "1G")
    assert rc == 1 and "--memory-budget" in line and "raise" in line
    rc, line = run_cli("plan", "lots", "--vectors", "--dim", "8")
    assert rc == 1 and line.startswith("shardex: error: N: 'lots'")


def test_plan_imports_neither_ray_nor_faiss():
    code = ("import sys; from index_builder.cli import main; "
            "rc = main(['plan', '1e8', '--vectors', '--dim', '128']); "
            "assert rc == 0 and not {'ray', 'faiss', 'torch'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=REPO, capture_output=True)

"""`shardex plan`: a capacity plan from measured costs, as pure functions (no Ray, no faiss).

From N, d, the encoder (or a vector source), the memory budget and the cluster's shape it says
the factory (factory.choose_factory), the shards, RAM and disk per shard, the bytes each stage
reads and writes, the GPU-hours to encode and each stage's wall time, from the cost table in
costs.py. predict() is the time and bytes model alone, for benchmarks to print beside what they
measured.

The model: a stage's work is counted as faiss does it (distance units: vectors x centroids x
dims), turned into core-seconds by a measured rate and spread over the cores that run it; a
stage takes the longer of that and its I/O at io_bytes per node. No startup costs, stragglers or
contention are modelled, so a small run takes longer than predicted. Bytes follow DESIGN.md's
"Costs at scale": embeddings N x (4d + 8), codes N x (c + 8), one trained index per shard.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field

from index_builder.eval.measures import EVAL_QUERIES
from index_builder.plan import costs
from index_builder.plan.costs import RATES as R
from index_builder.plan.factory import (
    ID_BYTES,
    check_trainable,
    choose_factory,
    factory_shape,
    index_plan,
    trained_bytes,
)
from shards.errors import ConfigError

STAGES = ("encode", "train", "add", "merge", "publish")


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    cpus_per_node: int = 16
    gpus_per_node: int = 0
    node_memory: int = 64 << 30

    @property
    def cores(self) -> int:
        return self.nodes * self.cpus_per_node

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def this_machine(cls) -> Cluster:
        """One node of this machine's CPUs and memory, no GPU (what the benchmarks here ran on)."""
        return cls(1, os.cpu_count() or 1, 0, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    def check(self) -> None:
        for name, v, least in (("--nodes", self.nodes, 1), ("--cpus-per-node", self.cpus_per_node, 1),
                               ("--gpus-per-node", self.gpus_per_node, 0), ("--node-memory", self.node_memory, 1)):
            if v < least:
                raise ConfigError(f"{name}: {v} is under {least}; give at least {least}")


@dataclass(frozen=True)
class Stage:
    seconds: float
    read: int       # bytes
    written: int    # bytes
    bound: str      # what the time is: the work, the rate, the cores


# ---------------------------------------------------------------- the work, counted as faiss does it

def _shape(factory: str, d: int) -> tuple[int, int, int, bool, bool]:
    """(dims after the pre-transform, nlist (0 without IVF), code bytes, PQ?, rotation?)."""
    dd, nl, code = factory_shape(factory, d)
    if code is None:
        raise ConfigError(f"--factory: {factory!r} is not a Flat, PQ or SQ encoding the plan can size; give one "
                          f"of those (e.g. IVF4096,PQ32), or leave --factory out")
    first = factory.split(",")[0].strip()
    return dd, nl or 0, math.ceil(code), "PQ" in factory, bool(re.match(r"(OPQ|PCA|RR)\d", first))


def train_units(sample: int, nlist: int, dd: int, pq: bool, rot: bool) -> tuple[float, float]:
    """(k-means units, other units): the IVF k-means (faiss subsamples to 256 points a centroid;
    one more pass assigns the sample for PQ's residuals), PQ's 256-centroid k-means on at most
    65,536 points, and OPQ's outer iterations of PQ training and encoding."""
    km = min(sample, nlist * costs.MAX_POINTS_PER_CENTROID) * nlist * dd * (costs.IVF_NITER + pq)
    few = min(sample, costs.PQ_KSUB * costs.MAX_POINTS_PER_CENTROID) * costs.PQ_KSUB * dd
    other = few * costs.PQ_NITER * pq + few * costs.OPQ_NITER * (costs.OPQ_NITER_PQ + 1) * rot
    return float(km), float(other)


def add_units(d: int, dd: int, nlist: int, pq: bool, rot: bool) -> int:
    """Per vector: the rotation (d x D), the nearest of nlist centroids, PQ's 256 per sub-space, and its
    distance to each of tune's held-out queries (the add takes their exact top-k while it holds the vectors)."""
    return d * dd * rot + nlist * dd + costs.PQ_KSUB * dd * pq + EVAL_QUERIES * d


def _io(nbytes: float, nodes: int) -> float:
    return nbytes / (nodes * R["io_bytes"].value)


def _stage(compute: float, nbytes: float, nodes: int, read: int, written: int, bound: str) -> Stage:
    io = _io(nbytes, nodes)
    return Stage(max(compute, io), int(read), int(written), bound if compute >= io else
                 f"I/O: {size(nbytes)} at {size(R['io_bytes'].value)}/s x {nodes} node(s)")


# ---------------------------------------------------------------- the stages

def _encode(n: int, d: int, cl: Cluster, enc: costs.Model | None) -> Stage:
    emb = n * (4 * d + ID_BYTES)
    if enc is None:
        raw = n * d * 4
        t = raw / (cl.cores * R["copy_bytes"].value)
        return _stage(t, raw + emb, cl.nodes, raw, emb, f"{cl.cores:,} cores copying vectors at "
                      f"{size(R['copy_bytes'].value)}/s each")
    if cl.gpus:
        return _stage(n / (cl.gpus * enc.gpu.value), emb, cl.nodes, 0, emb,
                      f"{cl.gpus:,} GPUs at {enc.gpu.value:,.0f} docs/s each")
    return _stage(n / (cl.cores * enc.cpu.value), emb, cl.nodes, 0, emb,
                  f"{cl.cores:,} cores at {enc.cpu.value:,.1f} docs/s each (no GPU)")


def _train(n: int, d: int, factory: str, cl: Cluster) -> Stage:
    dd, nl, _, pq, rot = _shape(factory, d)
    p = index_plan(n, d, factory, 1, 0)
    km, other = train_units(p.train_vectors, nl, dd, pq, rot)
    cpu = other * R["kmeans_unit"].value / cl.cpus_per_node
    if cl.gpus_per_node:   # the IVF k-means on one GPU, the rest on its node's CPUs
        t, where = km * R["kmeans_gpu_unit"].value + cpu, "one GPU (k-means) and its node's CPUs"
    else:
        t, where = (km + other) * R["kmeans_unit"].value / cl.cpus_per_node, f"one node's {cl.cpus_per_node} cores"
    return _stage(t, p.train_bytes, 1, p.train_bytes, p.trained_bytes,
                  f"{p.train_vectors:,} sample x {nl:,} lists x {dd} dims on {where}")


def train_seconds(n: int, d: int, factory: str, cpus: int, gpus: int = 0) -> float:
    """The training of one build, by the plan's rates, on a node of `cpus` cores (and a GPU if gpus):
    what a running build's progress compares its training with."""
    return _train(n, d, factory, Cluster(1, max(1, cpus), gpus)).seconds


def _add(n: int, d: int, factory: str, cl: Cluster) -> Stage:
    dd, nl, code, pq, rot = _shape(factory, d)
    emb, payload = n * (4 * d + ID_BYTES), n * (code + ID_BYTES)
    u = add_units(d, dd, nl, pq, rot)
    t = n * u * R["add_unit"].value / cl.cores
    return _stage(t, emb + payload, cl.nodes, emb, payload, f"{u:,} distance units a vector on {cl.cores:,} cores")


def _merge(n: int, d: int, factory: str, shards: int, cl: Cluster) -> Stage:
    p = index_plan(n, d, factory, shards, 0)
    code = _shape(factory, d)[2]
    written = p.index_bytes + shards * p.trained_bytes
    waves = math.ceil(shards / cl.cores)
    t = waves * (p.shard_bytes + p.trained_bytes) / R["merge_bytes"].value
    return _stage(t, n * (code + ID_BYTES) + written, cl.nodes, n * (code + ID_BYTES), written,
                  f"{shards} merge task(s) of {size(p.shard_bytes)} at {size(R['merge_bytes'].value)}/s, "
                  f"{waves} wave(s)")


def _publish(n: int, d: int, factory: str, shards: int, cl: Cluster) -> Stage:
    """The shards and the version's trained index copied into versions/, one task per shard, each
    at one node's bandwidth (a version that refers to the build's files copies nothing)."""
    p = index_plan(n, d, factory, shards, 0)
    nbytes = p.index_bytes + (shards + 1) * p.trained_bytes
    t = _io(nbytes, min(shards, cl.nodes))
    return Stage(t, nbytes, nbytes, f"{shards} copy task(s) at {size(R['io_bytes'].value)}/s a node")


def predict(n: int, d: int, factory: str, shards: int, cluster: Cluster,
            encoder: costs.Model | None = None) -> dict[str, Stage]:
    """Seconds and bytes of each stage of a build of n vectors of d dims into `shards` shards of
    `factory` on `cluster`. encoder: the model that encodes the corpus (costs.model(name)); None
    for a vector source, whose vectors are copied into embeddings parts."""
    return {"encode": _encode(n, d, cluster, encoder), "train": _train(n, d, factory, cluster),
            "add": _add(n, d, factory, cluster), "merge": _merge(n, d, factory, shards, cluster),
            "publish": _publish(n, d, factory, shards, cluster)}


# ---------------------------------------------------------------- the whole plan

@dataclass(frozen=True)
class Capacity:
    n: int
    d: int
    factory: str
    factory_why: str
    shards: int
    shards_why: str
    budget: int
    ram_per_shard: int     # codes, ids and lists' overhead of one shard, plus its trained part
    on_disk: bool          # over half a node's memory: merged into on-disk lists, mmapped
    train_vectors: int
    encoder: str
    encode_rate: float | None  # docs/s per GPU, or per core without GPUs; None: a vector source
    gpu_hours: float | None
    cluster: Cluster
    stages: dict[str, Stage]
    assumptions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {**asdict(self), "seconds": sum(s.seconds for s in self.stages.values()), "costs": costs.table()}

    def lines(self) -> list[str]:
        cl, st = self.cluster, self.stages
        out = [f"plan: {self.n:,} x {self.d} from {self.encoder}, on {cl.nodes:,} node(s) of {cl.cpus_per_node} CPUs, "
               f"{cl.gpus_per_node} GPUs, {size(cl.node_memory)}",
               f"factory: {self.factory}: {self.factory_why}",
               f"shards: {self.shards}: {self.shards_why}",
               f"per shard: RAM {size(self.ram_per_shard)}, disk {size(self.ram_per_shard)}, "
               + ("merged on disk and mmapped" if self.on_disk else "merged and served in RAM")
               + f"; the whole index {size(self.ram_per_shard * self.shards)} of a {size(self.budget)} "
                 f"--memory-budget",
               f"training sample: {self.train_vectors:,} vectors",
               f"{'stage':8} {'time':>12} {'read':>11} {'written':>11}  what bounds it"]
        out += [f"{k:8} {duration(s.seconds):>12} {size(s.read):>11} {size(s.written):>11}  {s.bound}"
                for k, s in st.items()]
        out.append(f"{'total':8} {duration(sum(s.seconds for s in st.values())):>12} "
                   f"{size(sum(s.read for s in st.values())):>11} {size(sum(s.written for s in st.values())):>11}")
        if self.gpu_hours is not None:
            out.append(f"encode: {self.gpu_hours:,.1f} GPU-hours (N / {self.encode_rate:,.0f} docs/s a GPU / 3600)")
            out.append(feed_line(cl, self.encode_rate))
        out.append("costs (index_builder/plan/costs.py):")
        out += [f"  {r.line(k)}" for k, r in R.items()]
        out += ["assumed:"] + [f"  {a}" for a in self.assumptions]
        return out


def capacity(n: int, d: int | None = None, *, model: str | None = None, vectors: bool = False,
             budget: int | None = None, cluster: Cluster = Cluster(), factory: str | None = None,
             shards: int | None = None, encode_rate: float | None = None) -> Capacity:
    """The plan `shardex plan` prints. budget: RAM for the whole served index, all shards together
    (build's --memory-budget); default half the cluster's memory."""
    cluster.check()
    for name, v in (("N", n), ("--dim", d), ("--shards", shards), ("--encode-rate", encode_rate)):
        if v is not None and v <= 0:
            raise ConfigError(f"{name}: {v} is not positive; give at least 1")
    enc, d, notes = encoder(d, model, vectors, encode_rate)
    budget = cluster.nodes * cluster.node_memory // 2 if budget is None else budget
    fac, why, s, s_why = _layout(n, d, factory, shards, budget, cluster)
    p = index_plan(n, d, fac, s, cluster.node_memory // 2)
    st = predict(n, d, fac, s, cluster, enc)
    rate = None if enc is None else enc.gpu.value if cluster.gpus else enc.cpu.value
    gpu_h = n / rate / 3600 if rate and cluster.gpus else None
    return Capacity(n, d, fac, why, s, s_why, budget, p.shard_bytes + p.trained_bytes, p.on_disk, p.train_vectors,
                    "vectors (copied, not encoded)" if enc is None else enc.name, rate, gpu_h, cluster, st,
                    notes + _assumed())


def from_options(a) -> Capacity:
    """capacity() from `shardex plan`'s parsed options: sizes and N as written on a command line."""
    cl = Cluster(a.nodes, a.cpus_per_node, a.gpus_per_node, _bytes(a.node_memory, "--node-memory"))
    return capacity(_count(a.n, "N"), a.dim, model=a.model, vectors=a.vectors, cluster=cl, factory=a.factory,
                    budget=_bytes(a.memory_budget, "--memory-budget") if a.memory_budget else None,
                    shards=a.shards, encode_rate=a.encode_rate)


def _count(s: str, name: str) -> int:
    """1000000, 1_000_000 or 1e6."""
    try:
        v = float(s.replace("_", "").replace(",", ""))
    except ValueError:
        v = math.nan
    if not v.is_integer():
        raise ConfigError(f"{name}: {s!r} is not a whole number; write it like 1000000000 or 1e9")
    return int(v)


def _bytes(s: str, name: str) -> int:
    from shards.config import parse_bytes

    try:
        return parse_bytes(s)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None


def encoder(d: int | None, model: str | None, vectors: bool, rate: float | None
            ) -> tuple[costs.Model | None, int, list[str]]:
    """(the encoder's rates or None for vectors, d, notes): from --model, --dim, --vectors, --encode-rate."""
    if vectors:
        if model or rate:
            raise ConfigError("--vectors: a vector source is not encoded; leave out --model and --encode-rate")
        if not d:
            raise ConfigError("--dim: give the vectors' dimension with --vectors")
        return None, d, []
    m = costs.model(model or costs.DEFAULT_MODEL)
    if m is None and rate is None:
        raise ConfigError(f"--model: {model!r} has no measured encode rate in the cost table "
                          f"(index_builder/plan/costs.py has {', '.join(costs.MODELS)}); give --encode-rate "
                          f"DOCS_PER_S and --dim, or --vectors for a vector source")
    if m is not None and model and d and d != m.dim:
        raise ConfigError(f"--dim: {model} gives {m.dim} dims, not {d}; leave --dim out")
    notes = []
    if m is None or rate is not None:
        given = costs.Rate(rate, "docs/s per GPU (per core without GPUs)", "--encode-rate", "given")
        m = costs.Model(model or "the encoder", d or (m.dim if m else 0), given, given)
        if not m.dim:
            raise ConfigError(f"--dim: give the dimension of {model}'s vectors")
    elif not model and d and d != m.dim:
        notes.append(f"encoder: no --model: a d={d} model at {m.name}'s measured rate (a bigger model is "
                     f"slower; give --encode-rate)")
        m = costs.Model(f"a d={d} model", d, m.gpu, m.cpu)
    return m, d or m.dim, notes


def _layout(n: int, d: int, factory: str | None, shards: int | None, budget: int, cl: Cluster
            ) -> tuple[str, str, int, str]:
    """(factory, why, shards, why): given, or the fewest shards whose RAM fits half a node (what
    --merge-ram-budget auto merges in RAM), with the factory choose_factory picks for them."""
    cap = cl.node_memory // 2
    s = shards or 1
    for _ in range(16):
        fac, why = _factory(n, d, factory, s, budget)
        p = index_plan(n, d, fac, s, cap)
        if shards:
            return fac, why, s, _check_shards(p, cl)
        if p.trained_bytes >= cap:
            raise ConfigError(f"--node-memory: half a node ({size(cap)}) cannot hold {fac}'s trained part "
                              f"({size(p.trained_bytes)}) that every shard loads; give a larger --node-memory, "
                              f"or --factory with fewer lists")
        need = max(1, math.ceil(p.index_bytes / (cap - p.trained_bytes)))
        if need <= s:
            break
        s = need
    return fac, why, s, (f"the fewest whose RAM ({size(p.shard_bytes + p.trained_bytes)}) fits half a node's "
                         f"memory ({size(cap)}), so each merges in RAM")


def _factory(n: int, d: int, factory: str | None, s: int, budget: int) -> tuple[str, str]:
    if not factory:
        c = choose_factory(n, d, budget, shards=s)
        return c.factory, c.reason
    check_trainable(factory, n, d, s, "hash")
    _shape(factory, d)
    p = index_plan(n, d, factory, s, 0)
    need = p.index_bytes + s * trained_bytes(factory, d)
    if need > budget:
        raise ConfigError(f"memory_budget: {size(budget)} cannot hold {factory} over {n:,} vectors in {s} "
                          f"shard(s) ({size(need)}); raise --memory-budget to {size(need, up=True)}, or give a "
                          f"smaller --factory")
    return factory, "given (--factory)"


def _check_shards(p, cl: Cluster) -> str:
    ram = p.shard_bytes + p.trained_bytes
    if ram > cl.node_memory:
        need = math.ceil(p.index_bytes / max(1, cl.node_memory // 2 - p.trained_bytes))
        raise ConfigError(f"--shards: {p.shards} shard(s) of {size(ram)} each do not fit a node's "
                          f"{size(cl.node_memory)} (--node-memory); give --shards {need} or more")
    return "given (--shards)" + (": over half a node, merged into on-disk lists and mmapped" if p.on_disk else "")


def feed_cores(rate: float) -> int:
    """Tokenizer cores that keep one GPU at `rate` docs/s (encode/feed.py), plus the one that
    launches its kernels."""
    return math.ceil(rate / R["feed_core"].value) + 1


def feed_line(cl: Cluster, rate: float) -> str:
    """What feeds a GPU on these nodes: the cores a GPU gets (encode/sizing.py: its node's CPUs
    over its GPUs) against the cores its rate and the forward pass alone need."""
    have, fwd = cl.cpus_per_node // max(1, cl.gpus_per_node), R["forward_gpu"].value
    fed = (have - 1) * R["feed_core"].value if have > 1 else R["feed_core"].value
    return (f"feed: {have} CPU(s) a GPU; at {R['feed_core'].value:,.0f} docs/s a tokenizer core, a GPU at "
            f"{rate:,.0f} docs/s needs {feed_cores(rate)} cores (one launches, the rest tokenize), at the "
            f"forward pass alone ({fwd:,.0f}) {feed_cores(fwd)}; these nodes tokenize up to {fed:,.0f} docs/s a "
            "GPU" + (" (fewer than the GPU's rate: CPU-bound)" if fed < rate else ""))


def _assumed() -> list[str]:
    out = [f"{k}: {r.note}" for k, r in R.items() if not r.measured]
    return out + ["no startup, straggler or contention costs: small builds take longer than this",
                  "the corpus's text is read by encode but its size is not known here (0 bytes shown)",
                  "tune and the drift baseline are not predicted (under 4% of the measured 1M and 4M builds)",
                  "OPQ's training is counted as its 50 x (4 + 1) PQ passes over 65,536 points at kmeans_unit; "
                  "not measured by itself"]


def duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s // 60:.0f} min {s % 60:.0f} s"
    if s < 86400:
        return f"{s // 3600:.0f} h {s % 3600 / 60:.0f} min"
    return f"{s / 86400:.1f} days"


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(b: float, up: bool = False) -> str:
    """Bytes in the largest unit under 1024 of it; up=True rounds up, so a fix shown is enough."""
    i = 0
    while b >= 1024 and i < len(_UNITS) - 1:
        b, i = b / 1024, i + 1
    if up:
        b = math.ceil(b * 100) / 100
    return f"{b:.0f} {_UNITS[i]}" if i == 0 else f"{b:.2f} {_UNITS[i]}"

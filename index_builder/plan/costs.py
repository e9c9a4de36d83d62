"""The cost table of `shardex plan`: each rate, its unit, and where it was measured.

A rate is either measured by a benchmark here (file in bench/results/, key, machine, date) or
assumed, with why. tests/test_capacity.py recomputes every measured rate from its results file,
so the table cannot drift from the benchmarks. Work is counted in "distance units": one
multiply-add of one vector against one centroid in one dimension (x . c over d is d units).

Measured on the project's machine (bench/README.md "Machine"): x86_64, 2 vCPUs, 23.5 GiB, no GPU;
every rate below is per core (a CPU thread of faiss or a Ray task), so it scales by cores.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

HERE = "2-vCPU x86_64 (Intel Xeon), 23.5 GiB, faiss-cpu 1.15.1"

# faiss's own constants, which the work formulas count with (faiss/Clustering.h, IndexIVF.cpp,
# ProductQuantizer.cpp, VectorTransform.cpp): k-means iterations of the IVF quantizer and of PQ,
# the points per centroid k-means subsamples to, and OPQ's outer and inner iterations.
IVF_NITER = 10
PQ_NITER = 25
PQ_KSUB = 256
MAX_POINTS_PER_CENTROID = 256
OPQ_NITER, OPQ_NITER_PQ = 50, 4


@dataclass(frozen=True)
class Rate:
    value: float
    unit: str
    source: str   # bench/results/<file>.json: <key>, or "assumed"
    note: str     # the machine and date, or why it is assumed and how it was derived

    @property
    def measured(self) -> bool:
        return self.source != "assumed"

    def line(self, name: str) -> str:
        return f"{name}: {self.value:.4g} {self.unit} ({self.source}; {self.note})"


RATES: dict[str, Rate] = {
    # 4M x 128 IVF16384,PQ32 train stage: 340.71 s x 2 cores over the k-means and PQ units below
    # (1,638,400 x 16,384 x 128 x (10 + 1 assignment for the residuals) + 65,536 x 256 x 128 x 25).
    "kmeans_unit": Rate(1.8003e-11, "core-s per distance unit (k-means, CPU)",
                        "bench/results/build_scaling.json: runs[vectors=4000000].stages.train",
                        f"{HERE}, 2026-11-23; the 1M run predicts 21.7 s of its 25.2 s"),
    # add = N x (units x add_unit + add_vector), fitted to the 1M (8.96 s) and 4M (97.59 s) runs on
    # 2 cores, units = (nlist + 256) x 128 per vector: assignment to the centroids, then PQ encoding.
    "add_unit": Rate(1.9630e-11, "core-s per distance unit (add: assign and encode)",
                     "bench/results/build_scaling.json: runs[vectors=1000000,4000000].stages.add",
                     f"{HERE}, 2026-11-23; fitted with add_vector to both runs"),
    "add_vector": Rate(6.9851e-6, "core-s per vector (add: read the part, exact top-k for tune, write)",
                       "bench/results/build_scaling.json: runs[vectors=1000000,4000000].stages.add",
                       f"{HERE}, 2026-11-23; fitted with add_unit to both runs"),
    # one merge task wrote a 522 MB IVF4096,Flat shard in RAM in 1.85 s
    "merge_bytes": Rate(2.8207e8, "bytes/s per merge task (one core)",
                        "bench/results/build_ondisk_merge.json: runs[ondisk=false].bytes / .seconds",
                        f"{HERE}, 2026-11-23"),
    # 4M x 128 float32 copied into embeddings parts (read, hash, write) in 10.87 s on 2 cores
    "copy_bytes": Rate(9.4204e7, "vector bytes/s per core (a vector source into embeddings parts)",
                       "bench/results/build_scaling.json: runs[vectors=4000000].stages.encode",
                       f"{HERE}, 2026-11-23"),
    "encode_gpu": Rate(5654.6, "docs/s per GPU (all-MiniLM-L6-v2, fp16)",
                       "bench/results/encode_gpu.json: docs_per_s.shardex_fp16_two_threads",
                       "NVIDIA H100 80GB HBM3, 2026-11-22; standard-library docstrings, batch 256"),
    "encode_cpu": Rate(35.905, "docs/s per core (all-MiniLM-L6-v2, fp32)",
                       "bench/results/encode_cpu.json: shardex_docs_per_s / 2 cores",
                       f"{HERE}, 2026-11-23; docstrings, many at the 256-token limit"),
    "kmeans_gpu_unit": Rate(8.0e-14, "GPU-s per distance unit (k-means on one GPU)",
                            "assumed",
                            "not measured: the GPU k-means has not run on a GPU yet; 25 TFLOP/s "
                            "effective fp32 (2 flops a unit), about half an H100's dense fp32 peak"),
    "io_bytes": Rate(1.0e9, "bytes/s per node (S3 or disk, read or write)",
                     "assumed",
                     "not measured: no S3 or network disk here; about a 10 Gbit/s NIC's worth with "
                     "parallel requests; publish copies and sha256s at this rate"),
}


@dataclass(frozen=True)
class Model:
    """An encoder the table has rates for: its output dimension and docs/s."""

    name: str
    dim: int
    gpu: Rate
    cpu: Rate


MODELS: dict[str, Model] = {
    "all-MiniLM-L6-v2": Model("all-MiniLM-L6-v2", 384, RATES["encode_gpu"], RATES["encode_cpu"]),
}
DEFAULT_MODEL = "all-MiniLM-L6-v2"   # the bundled encoder, as in `shardex build`


def model(name: str) -> Model | None:
    """The table's entry for a model name or path (sentence-transformers/NAME, a local dir named NAME)."""
    return MODELS.get(name.rstrip("/").rsplit("/", 1)[-1])


def table() -> dict[str, dict]:
    """The cost table as JSON-ready records (`shardex plan --json`)."""
    return {k: {**asdict(r), "measured": r.measured} for k, r in RATES.items()}

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


STAGES_10M = "bench/results/scale_stages.json: runs[vectors=10000000].seconds"
HERE_NOW = "2-vCPU x86_64 (Intel Xeon @ 2.60GHz, OpenBLAS SkylakeX kernels), 23.5 GiB, faiss-cpu 1.15.1"

RATES: dict[str, Rate] = {
    # 10M x 128 IVF4096,PQ16 train stage: 50.20 s x 2 cores over the k-means and PQ units below
    # (409,600 x 4,096 x 128 x (10 + 1 assignment for the residuals) + 65,536 x 256 x 128 x 25).
    "kmeans_unit": Rate(4.1558e-11, "core-s per distance unit (k-means, CPU)", f"{STAGES_10M}.train",
                        f"{HERE_NOW}, 2026-12-01; the 1M and 4M runs (same sample) took 45.3 and 43.3 s"),
    # 10M x 128 IVF4096,PQ16 add stage: 160.17 s x 2 cores over (4,096 + 256 + 200) x 128 units a vector:
    # the assignment to the centroids, PQ encoding, and the distances to tune's 200 queries.
    "add_unit": Rate(5.4979e-11, "core-s per distance unit (add: assign, encode, tune's exact top-k)",
                     f"{STAGES_10M}.add", f"{HERE_NOW}, 2026-12-01; reading and writing are in the rate"),
    # one merge task wrote a 522 MB IVF4096,Flat shard in RAM in 1.85 s
    "merge_bytes": Rate(2.8207e8, "bytes/s per merge task (one core)",
                        "bench/results/build_ondisk_merge.json: runs[ondisk=false].bytes / .seconds",
                        f"{HERE}, 2026-11-23"),
    # 10M x 128 float32 copied into embeddings parts (read, check, hash, write) in 51.48 s on 2 cores
    "copy_bytes": Rate(4.9728e7, "vector bytes/s per core (a vector source into embeddings parts)",
                       f"{STAGES_10M}.encode", f"{HERE_NOW}, 2026-12-01"),
    "encode_gpu": Rate(5654.6, "docs/s per GPU (all-MiniLM-L6-v2, fp16)",
                       "bench/results/encode_gpu.json: docs_per_s.shardex_fp16_two_threads",
                       "NVIDIA H100 80GB HBM3, 2026-11-22; standard-library docstrings, batch 256"),
    "encode_cpu": Rate(35.905, "docs/s per core (all-MiniLM-L6-v2, fp32)",
                       "bench/results/encode_cpu.json: shardex_docs_per_s / 2 cores",
                       f"{HERE}, 2026-11-23; docstrings, many at the 256-token limit"),
    # the host side of a GPU encoder: Rust tokenizer, padding, token-budget batches in tokenizer
    # processes (encode/feed.py), 2 processes on the 2 cores; the launching process spends 2.4 ms a 1k docs
    "feed_core": Rate(5056.4, "docs/s per tokenizer core (all-MiniLM-L6-v2's tokenizer, 256-token limit)",
                      "bench/results/encode_feed.json: corpora.docstrings.feeder_2.docs_per_s_per_process",
                      f"{HERE}, 2026-12-06; standard-library docstrings, 77 tokens a doc"),
    "forward_gpu": Rate(22_800.0, "docs/s per GPU, the forward pass alone (all-MiniLM-L6-v2, fp16)",
                        "assumed",
                        "not measured in a results file: one H100 run (2026-11-22) measured it and kept it "
                        "in bench/README.md only; bench/encode/gpu.py now records it as forward_only_fp16"),
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

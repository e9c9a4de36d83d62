"""Shared fixtures: one local Ray per test session, seeded tiny corpora written to real Parquet."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before Ray starts, so its workers inherit them: the moto S3 server takes any credentials.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def ray_session():
    """Local Ray on 2 CPUs, started once: each ray.init costs seconds."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head():
    """A real `ray start --head` on 2 CPUs with its own ports and temp dir (tests/rayhead.py),
    started once for every test that submits jobs; yields {"address", "temp_dir"}."""
    from rayhead import RAY, start_head

    if not RAY.exists():
        pytest.skip(f"no ray CLI at {RAY}")
    with start_head() as head:
        yield head


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


@pytest.fixture
def vector_corpus(tmp_path):
    """(source dir, ids, vectors) of a 3,000 x 32 clustered corpus in 2 files."""
    src = tmp_path / "corpus"
    ids, x = write_vector_corpus(str(src))
    return str(src), ids, x


def build(ray_session, **kw):
    """Build with the real pipeline; part_rows small so every stage has several units of work."""
    from index_builder.config import BuildConfig
    from index_builder.pipeline import build as _build

    kw.setdefault("part_rows", 1000)
    return _build(BuildConfig(**kw))

"""Fixtures only (helpers live in tests/helpers.py): one local Ray per test session, a real
`ray start --head`, a seeded vector corpus on real Parquet, and a moto S3 server."""
from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import clustered, write_vector_corpus

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before Ray starts, so its workers inherit them: the moto S3 server takes any credentials.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def ray_session():
    """Local Ray on 2 CPUs, started once: each ray.init costs seconds. A `shardex` subprocess
    joins it through helpers.cli_env()."""
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


@pytest.fixture
def vector_corpus(tmp_path):
    """(source dir, ids, vectors) of a 3,000 x 32 clustered corpus in 2 files."""
    src = tmp_path / "corpus"
    ids, x = write_vector_corpus(str(src))
    return str(src), ids, x


@pytest.fixture(scope="module")
def s3():
    """The endpoint URL of a fresh moto server with buckets 'corpus' and 'indexes'; AWS_ENDPOINT_URL
    points at it for the module."""
    import urllib.request

    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    # moto keeps its state per process, not per server: another module's server left buckets behind
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10).close()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    os.environ["AWS_ENDPOINT_URL"] = url
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": url}, key="testing", secret="testing")
    for bucket in ("corpus", "indexes"):
        fs.mkdir(bucket)
    try:
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def vec_corpus(tmp_path):
    """A 2-file corpus of 200 x 16 vectors (int ids 0..199), rows 0-99 in a.parquet, 100-199 in
    b.parquet. Returns (dir, ids, x); a test edits a copy of the data and calls write_vec."""
    x = clustered(200, 16, seed=3)
    ids = np.arange(200, dtype=np.int64)
    return tmp_path / "corpus", ids, x

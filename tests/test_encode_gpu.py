"""The encoder on CUDA: fp32 equals sentence-transformers there, fp16/bf16 stay close to it, and
threads sharing the device give the same vectors. Skipped without CUDA.

SHARDEX_TEST_MODEL may name a local copy of the weights (the GPU machines lack the bundled package).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODEL = os.environ.get("SHARDEX_TEST_MODEL")
TEXTS = ["short", "a sentence of middling length about files", "word " * 400, "read a csv file",
         "ünïcödé text", "x " * 30] * 20


@pytest.fixture(scope="module")
def fp32():
    from shards.encoder import Encoder

    return Encoder(MODEL, device="cuda", dtype="fp32")


def test_fp32_on_cuda_equals_sentence_transformers(fp32):
    ref = fp32.model.encode(TEXTS, batch_size=64, convert_to_numpy=True)
    np.testing.assert_allclose(fp32.encode_documents(TEXTS), ref, atol=1e-4)


@pytest.mark.parametrize("dtype,floor", [("fp16", 0.999), ("bf16", 0.99)])
def test_half_precision_stays_close(fp32, dtype, floor):
    from shards.encoder import Encoder

    e = Encoder(MODEL, device="cuda", dtype=dtype)
    assert e.info().dtype == dtype and next(e.model.parameters()).dtype == getattr(torch, {"fp16": "float16",
                                                                                           "bf16": "bfloat16"}[dtype])
    cos = (e.encode_documents(TEXTS) * fp32.encode_documents(TEXTS)).sum(1)
    assert cos.min() > floor


def test_auto_dtype_is_fp16_on_cuda():
    from shards.encoder import Encoder

    assert Encoder(MODEL, device="cuda").info().dtype == "fp16"


def test_threads_sharing_the_device_give_the_same_vectors(fp32):
    parts = [TEXTS[i:i + 25] for i in range(0, len(TEXTS), 25)]
    lock = threading.Lock()
    with ThreadPoolExecutor(2) as ex:
        got = np.concatenate([x for x, _ in ex.map(lambda p: fp32.encode_part(p, lock), parts)])
    np.testing.assert_allclose(got, fp32.encode_documents(TEXTS), atol=1e-5)

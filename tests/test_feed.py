"""index_builder/encode/feed.py: tokenizer processes give the encoder the batches it would make
itself, survive a worker SIGKILLed mid-run, and do not outlive an actor SIGKILLed."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from index_builder.demo.textcorpus import stdlib_docstrings
from index_builder.encode.feed import MIN_CHUNK, Feeder, spans
from shards.encoder import Encoder

from helpers import REPO, wait_until

TEXTS = [r["text"] for r in stdlib_docstrings(limit=400)] + ["", "x", "word " * 400]


@pytest.fixture(scope="module")
def enc():
    return Encoder(threads=1)


@pytest.fixture(scope="module")
def feeder(enc):
    f = Feeder(enc.fast, enc.batch_tokens, workers=2)
    yield f
    f.close()


@pytest.mark.parametrize("n,workers,want", [
    (0, 4, [(0, 0)]),
    (10, 4, [(0, 10)]),                               # too few texts to split
    (2 * MIN_CHUNK, 4, [(0, MIN_CHUNK), (MIN_CHUNK, 2 * MIN_CHUNK)]),
    (1000, 3, [(0, 333), (333, 666), (666, 1000)]),
    (1000, 1, [(0, 1000)]),
])
def test_spans(n, workers, want):
    assert spans(n, workers) == want


def test_feeder_batches_are_the_encoders_own(enc, feeder):
    mine, theirs = enc.tokenize(TEXTS, "passage: "), feeder(TEXTS, "passage: ")
    np.testing.assert_array_equal(mine.lens, theirs.lens)
    rows = np.concatenate([idx for idx, _ in theirs.items])
    assert sorted(rows.tolist()) == list(range(len(TEXTS)))   # each text once, in some batch
    for idx, f in theirs.items:                              # each batch as the encoder pads it
        np.testing.assert_array_equal(f["input_ids"], enc.fast([("passage: " + TEXTS[i]) for i in idx])["input_ids"])
        assert f["input_ids"].size <= enc.batch_tokens or len(idx) == 1
    few = TEXTS[:24] + TEXTS[-3:]  # the vectors too, on a few (the CPU encodes about 55 docs/s)
    np.testing.assert_allclose(enc.run(feeder(few))[0], enc.encode_documents(few), atol=2e-5)


def test_a_worker_killed_costs_a_part_nothing(enc, feeder):
    want = enc.tokenize(TEXTS).lens
    feeder(TEXTS)                                           # the workers are up
    victim = mp.active_children()[0].pid
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in [p.pid for p in mp.active_children()], 10, what="the worker to die")
    np.testing.assert_array_equal(feeder(TEXTS).lens, want)  # tokenized here, the pool made again
    np.testing.assert_array_equal(feeder(TEXTS).lens, want)  # and by the new pool
    assert len(mp.active_children()) == 2


CHILD = """
import os, sys
from index_builder.encode.feed import Feeder
from shards.encoder import Encoder
e = Encoder(threads=1)
f = Feeder(e.fast, e.batch_tokens, workers=2)
f(["some text"] * 400)
import multiprocessing as mp
print(" ".join(str(p.pid) for p in mp.active_children()), flush=True)
sys.stdin.read()
"""


def test_workers_exit_when_their_actor_is_sigkilled():
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, cwd=REPO)
    pids = [int(x) for x in p.stdout.readline().split()]
    assert len(pids) == 2
    p.send_signal(signal.SIGKILL)
    p.wait()

    def gone():
        return not any(os.path.exists(f"/proc/{q}") and "Z" not in open(f"/proc/{q}/stat").read().split()[2]
                       for q in pids)

    wait_until(gone, 20, what=f"tokenizer processes {pids} to exit")

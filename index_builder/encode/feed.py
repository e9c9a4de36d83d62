"""Tokenizer processes that feed one encoder actor.

On a GPU the forward pass is fast enough that the host side sets the pace: the Rust tokenizer,
reading out its ids and padding them into batches run in the same process, under the same GIL, as
the thread that launches kernels (bench/README.md: 22.8k docs/s forward pass alone on an H100,
about 6k through one process). A Feeder moves that work into worker processes: a part's texts are
cut into one chunk per worker, each returns its token-budget batches (shards/tokens.py) as plain
arrays, and the actor only pins them and runs the model.

Workers are spawned (a fork of a process holding a CUDA context is not safe), import nothing but
the tokenizer and numpy, and exit when the actor that made them dies. A worker that dies mid-part
costs nothing but time: the pool is made again and that part is tokenized in the actor.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from shards.raytools import log
from shards.tokens import Batches, FastTokenizer

MIN_CHUNK = 64  # texts per worker call, at least: smaller calls cost more in pickling than they save

_tok: FastTokenizer | None = None


def _start(fast: FastTokenizer, parent: int) -> None:
    global _tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core each: the workers are the parallelism
    _tok = fast
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """A SIGKILLed actor cannot shut its pool down: its workers see their parent change and go."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _batches(texts: list[str], budget: int) -> Batches:
    return _tok.batches(texts, budget)


def spans(n: int, workers: int) -> list[tuple[int, int]]:
    """[0, n) in at most `workers` near-equal chunks of at least MIN_CHUNK texts."""
    k = max(1, min(workers, n // MIN_CHUNK))
    at = np.linspace(0, n, k + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(at[:-1], at[1:])]


class Feeder:
    """`workers` tokenizer processes for one encoder's FastTokenizer; callable like Encoder.tokenize."""

    def __init__(self, fast: FastTokenizer, budget: int, workers: int):
        self.fast, self.budget, self.workers = fast, budget, workers
        self.lock = threading.Lock()
        self.pool = self._pool()

    def _pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"), initializer=_start,
                                   initargs=(self.fast, os.getpid()))

    def __call__(self, texts: list[str], prefix: str = "") -> Batches:
        texts = [prefix + t for t in texts] if prefix else list(texts)
        pool = self.pool
        try:
            parts = [(a, pool.submit(_batches, texts[a:b], self.budget)) for a, b in spans(len(texts), self.workers)]
            got = [(a, f.result()) for a, f in parts]
        except BrokenProcessPool:
            self._renew(pool)
            return self.fast.batches(texts, self.budget)
        items = [(idx + a, f) for a, b in got for idx, f in b.items]
        return Batches(items, np.concatenate([b.lens for _, b in got]) if got else np.zeros(0, np.int64))

    def _renew(self, broken: ProcessPoolExecutor) -> None:
        with self.lock:  # two part threads may both find it broken: make it again once
            if self.pool is broken:
                log(f"encode: a tokenizer process died; starting {self.workers} again, this part tokenized here")
                broken.shutdown(wait=False, cancel_futures=True)
                self.pool = self._pool()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

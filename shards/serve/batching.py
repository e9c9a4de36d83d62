"""Server-side batching: concurrent /search requests merged into one fan-out per (version, k, nprobe, filter).

The router's @serve.batch method collects Jobs (one per request); `group` sorts them into
fan-outs and `search_groups` runs those concurrently and hands each request its slice.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import numpy as np

from shards.search.fanout import fan_out
from shards.serve.swap import Live

MAX_CONCURRENT_BATCHES = 4  # fan-outs the router keeps in flight at once
MAX_QUERIES = 4096          # the most --max-queries may be: queries in one request and in one server batch


@dataclass
class Job:
    """One request's queries, waiting in a server batch with the version the request holds."""

    live: Live
    xq: np.ndarray
    k: int
    nprobe: int | None
    flt: list | None
    refine: int | None = None

    def key(self):
        return (id(self.live), self.k, self.nprobe, self.refine, json.dumps(self.flt, sort_keys=True))


def job_size(jobs: list[Job]) -> int:
    return sum(len(j.xq) for j in jobs)


def group(jobs: list[Job]) -> list[list[int]]:
    """The jobs that can share one fan-out, as lists of their positions, in order of first arrival."""
    groups: dict = {}
    for i, j in enumerate(jobs):
        groups.setdefault(j.key(), []).append(i)
    return list(groups.values())


async def search_groups(jobs: list[Job], groups: list[list[int]], timeout: float) -> list:
    """Each job's Outcome (its rows of its group's fan-out), or the exception its fan-out raised."""
    results: list = [None] * len(jobs)

    async def one(idx: list[int]):
        j0 = jobs[idx[0]]
        xq = j0.xq if len(idx) == 1 else np.concatenate([jobs[i].xq for i in idx])
        try:
            out = await fan_out(j0.live.view, xq, j0.k, j0.nprobe, j0.flt, j0.live.call, timeout, j0.refine)
        except Exception as e:  # noqa: BLE001 - handed to each waiting request, which raises it
            for i in idx:
                results[i] = e
            return
        a = 0
        for i in idx:
            b = a + len(jobs[i].xq)
            results[i] = out.slice(a, b)
            a = b

    await asyncio.gather(*[one(idx) for idx in groups])
    return results

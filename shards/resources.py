"""How many CPUs to reserve and threads to run per shard replica: a pure function, and the cluster's size."""
from __future__ import annotations

import math
from dataclasses import dataclass

VERSION_CPU_SHARE = 0.4     # of the cluster's CPUs one version may reserve: a second fits beside it in a swap


@dataclass(frozen=True)
class Resources:
    shard_cpus: float      # Ray CPUs reserved per shard replica
    threads: int           # faiss threads per shard replica
    encoder_cpus: float
    encoder_threads: int


def plan_resources(cluster_cpus: float, node_cpus: float, shards: int, replicas: int, encoder_replicas: int,
                   text: bool, shard_cpus: float | None = None, threads: int | None = None) -> Resources:
    """CPUs to reserve and threads to run, per replica.

    One version reserves at most VERSION_CPU_SHARE of the cluster, so the next version
    can come up beside it during a hot swap; a replica reserves at most one CPU (Ray
    schedules fractions), and runs as many threads as its share of the cluster's CPUs
    (more threads than that lose to contention under load: measured in bench/README.md).
    """
    units = shards * replicas + (encoder_replicas if text else 0)
    share = max(0.01, min(1.0, math.floor(VERSION_CPU_SHARE * cluster_cpus / units * 100) / 100))
    th = max(1, min(int(node_cpus), int(cluster_cpus // units)))
    return Resources(shard_cpus if shard_cpus is not None else share, threads or th, share, th)


def cluster_cpus() -> tuple[float, float]:
    """(CPUs of the whole Ray cluster, CPUs of its largest node)."""
    import ray

    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    return (sum(nodes) or 1, max(nodes, default=1))

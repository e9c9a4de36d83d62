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
    schedules fractions). Shard replicas search at the same time, so each runs its share
    of the cluster's CPUs in threads; a request is encoded before it is searched, so the
    encoder replicas share the CPUs among themselves only.
    """
    units = shards * replicas + (encoder_replicas if text else 0)
    share = max(0.01, min(1.0, math.floor(VERSION_CPU_SHARE * cluster_cpus / units * 100) / 100))
    th = max(1, min(int(node_cpus), int(cluster_cpus // (shards * replicas))))
    eth = max(1, min(int(node_cpus), int(cluster_cpus // max(encoder_replicas, 1))))
    return Resources(shard_cpus if shard_cpus is not None else share, threads or th, share, eth)


def cluster_cpus() -> tuple[float, float]:
    """(CPUs of the whole Ray cluster, CPUs of its largest node)."""
    import ray

    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    return (sum(nodes) or 1, max(nodes, default=1))

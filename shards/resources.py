"""What a shard replica asks Ray for (CPUs, threads, memory) and how its replicas spread over nodes:
pure functions, and the cluster's size."""
from __future__ import annotations

import math
from dataclasses import dataclass

VERSION_CPU_SHARE = 0.4     # of the cluster's CPUs one version may reserve: a second fits beside it in a swap
PROCESS_BYTES = 256 << 20   # a replica's own process: Python, Ray's worker, faiss and numpy loaded
MEMORY_SLACK = 1.25         # above the bytes held: faiss's search buffers, a swap's next segments


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


def shard_memory(ram_bytes: int, rows: int, attributes: int) -> int:
    """Bytes of memory one replica of a shard asks Ray for, so that Ray never places on a node more
    shards than it holds: the files read into RAM (ram_bytes; an on-disk shard's lists are mmapped,
    page cache the kernel may drop, and not counted), its filter columns (8 bytes a row each, ids
    too) and the process itself."""
    return int(PROCESS_BYTES + MEMORY_SLACK * (ram_bytes + 8 * rows * (attributes + 1)))


def replicas_per_node(replicas: int, nodes: int) -> int | None:
    """The most replicas of one shard a node may hold: as few as the nodes allow, so that losing a node
    loses at most that many (None: one replica, nothing to spread)."""
    return None if replicas <= 1 else max(1, math.ceil(replicas / max(1, nodes)))


def cluster_nodes() -> list[float]:
    """The CPUs of each live node of the Ray cluster that has any (a KubeRay head with 0 CPUs runs no replica)."""
    import ray

    return [c for n in ray.nodes() if n["Alive"] and (c := n["Resources"].get("CPU", 0)) > 0]


def cluster_cpus() -> tuple[float, float]:
    """(CPUs of the whole Ray cluster, CPUs of its largest node)."""
    nodes = cluster_nodes()
    return (sum(nodes) or 1, max(nodes, default=1))

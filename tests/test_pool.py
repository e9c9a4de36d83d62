"""index_builder/encode/sizing.py: the encoder pool, node by node (actors, CPUs, threads, tokenizer
processes, GPUs), for a table of cluster shapes."""
from __future__ import annotations

import pytest

from index_builder.encode.sizing import Node, Slot, describe, slots


def cluster(*shapes: tuple[int, float, int]) -> list[Node]:
    """Nodes from (cpus, gpus, how many) rows, named n0, n1, ..."""
    return [Node(f"n{i}", c, g) for i, (c, g) in enumerate((c, g) for c, g, k in shapes for _ in range(k))]


def summary(pool: list[Slot]) -> list[tuple]:
    """(node, cpus, threads, tokenizer processes, gpus, how many) per distinct slot, in node order."""
    out: list[list] = []
    for s in pool:
        row = (s.node, s.cpus, s.threads, s.feeders, s.gpus)
        if out and tuple(out[-1][:5]) == row:
            out[-1][5] += 1
        else:
            out.append([*row, 1])
    return [tuple(r) for r in out]


# (node shapes (cpus, gpus, count), GPUs per actor, --actors, --tokenizer-workers) -> the pool
ROWS = [
    # CPU: 4 torch threads per actor, the node's CPUs all used; no tokenizer processes
    ([(1, 0, 1)], 0.0, None, None, [("n0", 1, 1, 0, 0.0, 1)]),
    ([(2, 0, 1)], 0.0, None, None, [("n0", 2, 2, 0, 0.0, 1)]),
    ([(6, 0, 1)], 0.0, None, None, [("n0", 6, 6, 0, 0.0, 1)]),
    ([(16, 0, 1)], 0.0, None, None, [("n0", 4, 4, 0, 0.0, 4)]),
    ([(16, 0, 4)], 0.0, None, None, [(f"n{i}", 4, 4, 0, 0.0, 4) for i in range(4)]),
    ([(16, 0, 1), (3, 0, 1)], 0.0, None, None, [("n0", 4, 4, 0, 0.0, 4), ("n1", 3, 3, 0, 0.0, 1)]),
    # CPU, --actors: spread to the nodes that give each the most CPUs
    ([(16, 0, 1)], 0.0, 2, None, [("n0", 8, 8, 0, 0.0, 2)]),
    ([(16, 0, 1)], 0.0, 3, None, [("n0", 5, 5, 0, 0.0, 3)]),
    ([(16, 0, 4)], 0.0, 2, None, [("n0", 16, 16, 0, 0.0, 1), ("n1", 16, 16, 0, 0.0, 1)]),
    ([(16, 0, 1), (4, 0, 1)], 0.0, 2, None, [("n0", 16, 16, 0, 0.0, 1), ("n1", 4, 4, 0, 0.0, 1)]),
    ([(16, 0, 1), (4, 0, 1)], 0.0, 5, None, [("n0", 4, 4, 0, 0.0, 4), ("n1", 4, 4, 0, 0.0, 1)]),
    ([(2, 0, 1)], 0.0, 3, None, [("n0", 1, 1, 0, 0.0, 2), (None, 1, 1, 0, 0.0, 1)]),  # more than CPUs
    # GPU: one actor per GPU, the node's CPUs shared among its GPUs: 1 thread, the rest tokenize
    ([(8, 1, 1)], 1.0, None, None, [("n0", 8, 1, 7, 1.0, 1)]),
    ([(96, 8, 32)], 1.0, None, None, [(f"n{i}", 12, 1, 11, 1.0, 8) for i in range(32)]),  # not 1 thread
    ([(8, 4, 1)], 1.0, None, None, [("n0", 2, 1, 1, 1.0, 4)]),
    ([(4, 1, 1)], 1.0, None, None, [("n0", 4, 1, 3, 1.0, 1)]),
    ([(1, 1, 1)], 1.0, None, None, [("n0", 1, 1, 0, 1.0, 1)]),
    ([(32, 2, 1)], 0.5, None, None, [("n0", 8, 1, 7, 0.5, 4)]),
    ([(16, 4, 1)], 0.25, None, None, [("n0", 1, 1, 0, 0.25, 16)]),
    ([(16, 4, 1)], 1.0, 2, None, [("n0", 8, 1, 7, 1.0, 2)]),
    ([(16, 4, 1)], 1.0, None, 2, [("n0", 4, 2, 2, 1.0, 4)]),     # --tokenizer-workers given
    ([(16, 4, 1)], 1.0, None, 0, [("n0", 4, 4, 0, 1.0, 4)]),     # none: tokenized in the actor
    # a mixed cluster: GPU actors only where the GPUs are, each with its own node's CPUs
    ([(8, 1, 1), (64, 4, 1), (32, 0, 2)], 1.0, None, None, [("n0", 8, 1, 7, 1.0, 1), ("n1", 16, 1, 15, 1.0, 4)]),
    # autoscaling: no GPU node up yet, --actors and --gpus-per-actor given: Ray places them later
    ([(0, 0, 1)], 1.0, 4, 7, [(None, 8, 1, 7, 1.0, 4)]),
    ([(0, 0, 1)], 1.0, 2, None, [(None, 1, 1, 0, 1.0, 2)]),
    ([(8, 1, 2)], 1.0, 3, None, [("n0", 8, 1, 7, 1.0, 1), ("n1", 8, 1, 7, 1.0, 1), (None, 1, 1, 0, 1.0, 1)]),
    # no node with CPUs (a head with num-cpus 0): one actor asking for 1 CPU, so a worker comes up
    ([(0, 0, 1)], 0.0, None, None, [(None, 1, 1, 0, 0.0, 1)]),
    ([], 0.0, None, None, [(None, 1, 1, 0, 0.0, 1)]),
]


@pytest.mark.parametrize("shapes,gpa,actors,feeders,want", ROWS)
def test_pool_slots(shapes, gpa, actors, feeders, want):
    assert summary(slots(cluster(*shapes), gpa, actors, feeders)) == want


@pytest.mark.parametrize("shapes,gpa,actors,feeders,want", ROWS)
def test_pool_never_oversubscribes_a_node(shapes, gpa, actors, feeders, want):
    nodes = {n.id: n for n in cluster(*shapes)}
    pool = slots(list(nodes.values()), gpa, actors, feeders)
    assert actors is None or len(pool) == actors
    for n in nodes.values():
        mine = [s for s in pool if s.node == n.id]
        assert sum(s.cpus for s in mine) <= n.cpus and sum(s.gpus for s in mine) <= n.gpus + 1e-9
    for s in pool:
        assert s.cpus >= 1 and s.threads >= 1
        assert s.threads + s.feeders <= s.cpus or feeders is not None


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 5, 8, 16, 48])
def test_pool_sweep(cpus):
    for count in (1, 2, 3, 8):
        nodes = cluster((cpus, 0, count))
        for actors in (None, *range(1, cpus * count + 1)):
            pool = slots(nodes, 0.0, actors)
            assert all(s.node is not None for s in pool) and (actors is None or len(pool) == actors)
            per = {n.id: sum(s.cpus for s in pool if s.node == n.id) for n in nodes}
            assert all(v <= cpus for v in per.values()), (cpus, count, actors)
        for gpus in (1, 2, 4, 8):
            pool = slots(cluster((cpus, gpus, count)), 1.0)
            assert len(pool) == gpus * count and all(s.gpus == 1.0 for s in pool)
            assert all(s.cpus == max(1, cpus // gpus) and s.threads == 1 for s in pool)


def test_describe():
    assert describe(slots(cluster((8, 1, 2)), 1.0)) == \
        "2 actor(s) on 2 node(s): 1 thread(s) + 7 tokenizer process(es), 1.0 GPU each"
    assert describe(slots(cluster((2, 0, 1)), 0.0)) == "1 actor(s) on 1 node(s): 2 thread(s) on CPU each"

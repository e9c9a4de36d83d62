"""index_builder/encode/pool.py: the encoder pool's shape (actors, threads, GPUs) for a cluster."""
from __future__ import annotations

import pytest

from index_builder.encode.pool import shape

# (total CPUs, CPUs of the largest node, GPUs, GPUs per actor, --actors) -> (actors, threads, GPUs per actor)
SHAPE_ROWS = [
    # CPU: 4 threads per actor, fewer on small nodes
    (1, 1, 0, 0.0, None, (1, 1, 0.0)),
    (2, 2, 0, 0.0, None, (1, 2, 0.0)),
    (6, 6, 0, 0.0, None, (1, 4, 0.0)),
    (16, 16, 0, 0.0, None, (4, 4, 0.0)),
    (64, 16, 0, 0.0, None, (16, 4, 0.0)),
    (12, 3, 0, 0.0, None, (4, 3, 0.0)),      # 4 nodes of 3 CPUs
    # CPU, --actors given: the CPUs shared between them, at most one node's worth each
    (16, 16, 0, 0.0, 2, (2, 8, 0.0)),
    (16, 16, 0, 0.0, 3, (3, 5, 0.0)),
    (16, 16, 0, 0.0, 16, (16, 1, 0.0)),
    (64, 16, 0, 0.0, 2, (2, 16, 0.0)),
    (2, 2, 0, 0.0, 1, (1, 2, 0.0)),
    # GPU: one actor per GPU share, up to 4 tokenising threads each
    (8, 8, 4, 1.0, None, (4, 2, 1.0)),
    (16, 16, 8, 1.0, None, (8, 2, 1.0)),
    (32, 16, 2, 0.5, None, (4, 4, 0.5)),
    (64, 32, 2, 1.0, None, (2, 4, 1.0)),
    (4, 4, 1, 1.0, None, (1, 4, 1.0)),
    (2, 1, 1, 1.0, None, (1, 1, 1.0)),
    (16, 16, 4, 1.0, 2, (2, 4, 1.0)),
    (16, 16, 4, 0.25, None, (16, 1, 0.25)),
]


@pytest.mark.parametrize("total,node,gpus,gpa,actors,want", SHAPE_ROWS)
def test_pool_shape(total, node, gpus, gpa, actors, want):
    assert shape(total, node, gpus, gpa, actors) == want


@pytest.mark.parametrize("total,node,gpus,gpa,actors,want", SHAPE_ROWS)
def test_pool_shape_never_oversubscribes(total, node, gpus, gpa, actors, want):
    n, threads, g = shape(total, node, gpus, gpa, actors)
    assert n >= 1 and threads >= 1
    assert threads <= node                     # one actor's threads fit on one node
    assert n * threads <= total                # the pool fits the cluster's CPUs
    if g:
        assert threads <= 4
        assert n * g <= gpus


@pytest.mark.parametrize("node", [1, 2, 3, 4, 5, 8, 16, 48])
def test_pool_shape_sweep(node):
    for nodes in (1, 2, 3, 8):
        total = node * nodes
        for actors in (None, *range(1, total + 1)):
            n, threads, _ = shape(total, node, 0, 0.0, actors)
            assert n * threads <= total and threads <= node, (total, node, actors)
            assert actors is None or n == actors
        for gpus in (1, 2, 4, 8):
            n, threads, g = shape(total, node, gpus, 1.0, None)
            assert (n, g) == (gpus, 1.0) and 1 <= threads <= min(4, node)

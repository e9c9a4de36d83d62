"""How many encoder actors go on each node, and what each one holds: a pure function of the nodes.

GPU: one actor per GPU share of a node, and that node's CPUs split among its actors: one thread
launches kernels, the rest are tokenizer processes (encode/feed.py), since on a GPU the host side
sets the pace. A node's CPUs are its own: a cluster of 32 nodes of 8 GPUs and 96 CPUs gives each
actor 12 CPUs, not the cluster's 3,072 CPUs over 256 actors rounded to 1 thread each.
CPU: the forward pass is the cost, so torch threads do the work: 4 per actor (more scale poorly),
fewer on small nodes, and no tokenizer processes (tokenizing is about 1% of the time there).
"""
from __future__ import annotations

from dataclasses import dataclass

CPU_THREADS = 4


@dataclass(frozen=True)
class Node:
    id: str
    cpus: int
    gpus: float = 0.0


@dataclass(frozen=True)
class Slot:
    """One encoder actor: its node (None: wherever Ray finds room, e.g. before any worker is up),
    the CPUs it asks for, torch threads, tokenizer processes and GPUs."""

    node: str | None
    cpus: int
    threads: int
    feeders: int = 0
    gpus: float = 0.0


def slots(nodes: list[Node], gpa: float, actors: int | None = None, feeders: int | None = None) -> list[Slot]:
    """The pool for these nodes. gpa: GPUs per actor (0: a CPU pool); actors: how many, spread over
    the nodes (default: every GPU share, or every node's CPUs); feeders: tokenizer processes per
    actor (default: a GPU actor's CPUs but one, none on CPU)."""
    if gpa > 0:
        cap = {n.id: int(n.gpus // gpa) for n in nodes if n.gpus >= gpa}
        default = cap
    else:
        cap = {n.id: n.cpus for n in nodes if n.cpus > 0}
        default = {i: max(1, c // CPU_THREADS) for i, c in cap.items()}
    count = default if actors is None else place(cap, {n.id: n.cpus for n in nodes}, actors)
    out = []
    for n in nodes:
        k = count.get(n.id, 0)
        share = max(1, n.cpus // k) if k else 0
        out += [_slot(n.id, share, gpa, feeders)] * k
    # More actors than the nodes have room for (or no node up yet, on an autoscaling cluster): Ray
    # places them as room appears. Their node's shape is not known: a GPU actor asks for its
    # tokenizer processes' CPUs and one more.
    away = _slot(None, 1 + (feeders or 0) if gpa > 0 else 1, gpa, feeders)
    out += [away] * ((actors or (0 if out else 1)) - len(out))
    return out


def _slot(node: str | None, share: int, gpa: float, feeders: int | None) -> Slot:
    f = (max(0, share - 1) if gpa > 0 else 0) if feeders is None else feeders
    return Slot(node, share, max(1, share - f), f, max(gpa, 0.0))


def place(cap: dict[str, int], cpus: dict[str, int], actors: int) -> dict[str, int]:
    """`actors` actors over the nodes, at most cap[node] on each: first one on every node (biggest
    first: each brings its node's CPUs into use), then each to the node that gives it the most CPUs
    (2 actors on nodes of 16 and 4 CPUs go one to each, a third joins the 16; ties: the first node)."""
    count = dict.fromkeys(cap, 0)
    for _ in range(actors):
        free = [i for i in cap if count[i] < cap[i]]
        if not free:
            break
        count[max(free, key=lambda i: (count[i] == 0, cpus[i] / (count[i] + 1)))] += 1
    return count


def describe(pool: list[Slot]) -> str:
    """'4 actor(s) on 2 node(s): 1 thread + 3 tokenizer processes, 1 GPU each'; mixed shapes are listed."""
    shapes = sorted({(s.threads, s.feeders, s.gpus) for s in pool})
    nodes = len({s.node for s in pool})
    each = "; ".join(f"{t} thread(s)" + (f" + {f} tokenizer process(es)" if f else "")
                     + (f", {g} GPU" if g else " on CPU") for t, f, g in shapes)
    return f"{len(pool)} actor(s) on {nodes} node(s): {each}" + (" each" if len(shapes) == 1 else "")

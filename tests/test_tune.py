"""The nprobe ladder tune climbs, the plateau it stops on, and the default nprobe it publishes."""
from __future__ import annotations

import pytest

from index_builder.eval.measures import choose_nprobe, nprobe_ladder, plateaued


@pytest.mark.parametrize("nl,ladder", [(1, [1]), (2, [1, 2]), (8, [1, 2, 4, 8]), (100, [1, 2, 4, 8, 16, 32, 64, 100])])
def test_nprobe_ladder(nl, ladder):
    assert nprobe_ladder(nl) == ladder


def _rows(recalls):
    return [{"nprobe": 2 ** i, "recall": r} for i, r in enumerate(recalls)]


# (recall at nprobe 1, 2, 4, ..., target, the default nprobe)
@pytest.mark.parametrize("recalls,target,want", [
    ([0.5, 0.8, 0.96], 0.95, 4),               # the smallest reaching the target
    ([0.95], 0.95, 1),
    ([0.5, 0.7, 0.83, 0.84, 0.841], 0.95, 8),  # PQ caps recall: the smallest within 0.005 of the best
    ([0.5, 0.7, 0.836, 0.8395, 0.84], 0.95, 4),
    ([0.3], 0.95, 1),
])
def test_choose_nprobe(recalls, target, want):
    assert choose_nprobe(_rows(recalls), target)["nprobe"] == want


@pytest.mark.parametrize("recalls,want", [([0.5, 0.8], False), ([0.5, 0.8, 0.801], False),
                                          ([0.83, 0.831, 0.832], True), ([0.7, 0.83, 0.831, 0.8319], True),
                                          ([0.9, 0.9, 0.95], False)])
def test_the_ladder_stops_on_a_plateau(recalls, want):
    assert plateaued(_rows(recalls)) == want

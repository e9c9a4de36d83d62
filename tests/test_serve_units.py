"""Pure parts of serving: resource plans, routing masks, batch slices, the serve config (tables)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from shards.config import ServeConfig, load_yaml, make
from shards.errors import ConfigError, SearchError
from shards.resources import PROCESS_BYTES, Resources, plan_resources, replicas_per_node, shard_memory
from shards.search.fanout import Outcome, ShardFailure, _call_one
from shards.search.router import route_mask
from shards.search.shard_selection import scan_order, shard_mask, shards_for_lists
from shards.serve.lifecycle import settings


@pytest.mark.parametrize("cluster,node,S,R,E,text,cpus,threads,want", [
    # one version reserves at most 40% of the cluster, at most 1 CPU a replica
    (2, 2, 2, 1, 1, True, None, None, Resources(0.26, 1, 0.26, 1)),
    (2, 2, 2, 1, 1, False, None, None, Resources(0.4, 1, 0.4, 1)),
    (2, 2, 8, 1, 1, False, None, None, Resources(0.1, 1, 0.1, 1)),
    (64, 16, 4, 2, 1, False, None, None, Resources(1.0, 8, 1.0, 8)),
    (64, 16, 2, 1, 1, False, None, None, Resources(1.0, 16, 1.0, 16)),   # threads: at most a node's CPUs
    (1, 1, 64, 4, 1, False, None, None, Resources(0.01, 1, 0.01, 1)),   # never below 0.01
    (16, 16, 2, 1, 2, True, 2.0, 4, Resources(2.0, 4, 1.0, 4)),        # given values win
    (4, 4, 2, 1, 0, False, None, None, Resources(0.8, 2, 0.8, 2)),      # the Python API: no encoder replicas
])
def test_plan_resources(cluster, node, S, R, E, text, cpus, threads, want):
    assert plan_resources(cluster, node, S, R, E, text, cpus, threads) == want


@pytest.mark.parametrize("ram,rows,attrs,want", [
    (0, 0, 0, PROCESS_BYTES),                                   # an empty shard: the process alone
    (4 << 30, 0, 0, PROCESS_BYTES + (5 << 30)),                 # a 4 GiB shard in RAM, 25% over
    (0, 1_000_000, 3, PROCESS_BYTES + 40_000_000),              # on disk: its filter columns and ids
    (1 << 20, 1000, 1, PROCESS_BYTES + int(1.25 * ((1 << 20) + 16_000))),
])
def test_shard_memory(ram, rows, attrs, want):
    assert shard_memory(ram, rows, attrs) == want


@pytest.mark.parametrize("replicas,nodes,want", [
    (1, 3, None),       # nothing to spread
    (2, 3, 1),          # apart: a lost node takes one replica
    (2, 1, 2),          # one node: both there
    (3, 2, 2),
    (4, 0, 4),          # no node counted yet
])
def test_replicas_per_node(replicas, nodes, want):
    assert replicas_per_node(replicas, nodes) == want


@pytest.mark.parametrize("need,want", [
    ([{0}, {1, 2}, set()], [[1, 0, 0], [0, 1, 1], [0, 0, 0]]),
    ([[2], [0, 2]], [[0, 0, 1], [1, 0, 1]]),
    (np.array([[True, False, True]]), [[1, 0, 1]]),
])
def test_route_mask(need, want):
    want = np.array(want, dtype=bool)
    np.testing.assert_array_equal(route_mask(need, len(want), 3), want)


def test_route_mask_shape_is_checked():
    with pytest.raises(SearchError, match="shape"):
        route_mask(np.ones((2, 2), bool), 2, 3)


@pytest.mark.parametrize("lists,ranges,want", [
    ([[0, 1]], [[0, 2], [2, 4]], [[1, 0]]),
    ([[3, 2], [1, -1]], [[0, 2], [2, 4]], [[0, 1], [1, 0]]),    # -1: the quantizer found no more lists
    ([[-1, -1]], [[0, 4]], [[0]]),
    ([[5, 0, 9], [7, 7, 7]], [[0, 1], [1, 6], [6, 10]], [[1, 1, 1], [0, 0, 1]]),
])
def test_shard_mask(lists, ranges, want):
    np.testing.assert_array_equal(shard_mask(np.array(lists), ranges), np.array(want, dtype=bool))


@pytest.mark.parametrize("seed,S", [(0, 2), (1, 5), (2, 16)])
def test_shard_mask_is_shards_for_lists(seed, S):
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, 256), S - 1, replace=False))
    ranges = [[int(a), int(b)] for a, b in zip([0, *cuts], [*cuts, 256])]
    lists = rng.integers(-1, 256, (300, 8))
    np.testing.assert_array_equal(shard_mask(lists, ranges), route_mask(shards_for_lists(lists, ranges), 300, S))


@pytest.mark.parametrize("lists,want", [
    ([[3, 1], [0, 2], [3, 0], [1, 1]], [1, 3, 0, 2]),      # by nearest list; ties keep their order
    ([[5, 4]], [0]),
    ([[-1, -1], [2, 0]], [0, 1]),
])
def test_scan_order(lists, want):
    np.testing.assert_array_equal(scan_order(np.array(lists)), want)


def test_outcome_unordered_puts_every_row_back():
    order = np.array([2, 0, 3, 1])
    D = np.arange(8, dtype=np.float32).reshape(4, 2)
    asked = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=bool)
    o = Outcome(D[order], D[order].astype(np.int64), asked[order].sum(1), {0, 1}, {}, asked[order]).unordered(order)
    np.testing.assert_array_equal(o.D, D)
    np.testing.assert_array_equal(o.I, D.astype(np.int64))
    np.testing.assert_array_equal(o.asked, asked)
    np.testing.assert_array_equal(o.touched, [1, 1, 2, 0])


def test_outcome_keeps_each_answer_with_its_rows_through_order_slice_and_remerge():
    """got's rows follow the queries when they are put back in order and when a request is sliced
    out; remerge without a failed shard is the other shards' merge, owners included."""
    order = np.array([1, 0, 2])
    I0 = np.array([[10, 11], [20, 21], [30, 31]])
    D0 = np.array([[0.1, 0.4], [0.2, 0.5], [0.3, 0.6]], np.float32)
    I1, D1 = np.array([[12, 13], [22, 23]]), np.array([[0.0, 0.2], [0.1, 0.3]], np.float32)
    got = [(0, np.arange(3), D0[order], I0[order]), (1, np.array([0, 1]), D1, I1)]  # shard 1: queries 1, 0
    o = Outcome(np.zeros((3, 2), np.float32), np.zeros((3, 2), np.int64), np.ones(3), {0, 1}, {},
                np.ones((3, 2), bool), np.zeros((3, 2), np.int64), got).unordered(order)
    o.failed[0] = "shard-0: gone"
    o.remerge(keep_max=False)
    np.testing.assert_array_equal(o.I, [[22, 23], [12, 13], [-1, -1]])
    np.testing.assert_array_equal(o.owners(), [[1, 1], [1, 1], [-1, -1]])
    del o.failed[0]
    o.remerge(keep_max=False)
    np.testing.assert_array_equal(o.I, [[10, 22], [12, 20], [30, 31]])
    np.testing.assert_array_equal(o.slice(1, 3).owners(), [[1, 0], [0, 0]])
    s = o.slice(1, 3)
    s.remerge(keep_max=False)
    np.testing.assert_array_equal(s.I, [[12, 20], [30, 31]])


def test_outcome_slice_blames_only_shards_a_request_used():
    asked = np.array([[1, 0, 1], [1, 0, 1], [0, 1, 0]], dtype=bool)
    o = Outcome(np.arange(6, dtype=np.float32).reshape(3, 2), np.arange(6).reshape(3, 2), asked.sum(1),
                {0, 1, 2}, {1: "shard-1: no answer within 1 s"}, asked)
    a, b = o.slice(0, 2), o.slice(2, 3)
    assert a.report() == {"queried": 2, "answered": 2, "missing": [], "touched": [2, 2]}
    assert b.report() == {"queried": 1, "answered": 0, "missing": ["shard-1"], "touched": [1]}
    np.testing.assert_array_equal(b.I, [[4, 5]])


def test_call_one_times_out_and_retries_a_dead_replica_once():
    import ray.exceptions as rx

    calls = []

    def dies_then_answers(s, *a):
        calls.append(s)

        async def go():
            if len(calls) == 1:
                raise rx.ActorDiedError()
            return "ok"
        return go()

    assert asyncio.run(_call_one(dies_then_answers, 3, None, None, 1, None, None, 5.0)) == "ok" and calls == [3, 3]

    def slow(s, *a):
        return asyncio.sleep(10)

    with pytest.raises(ShardFailure, match="shard-0: no answer within 0.05 s"):
        asyncio.run(_call_one(slow, 0, None, None, 1, None, None, 0.05))

    def broken(s, *a):
        async def go():
            raise ValueError("bad shard")
        return go()

    with pytest.raises(ShardFailure, match="shard-2: ValueError: bad shard"):
        asyncio.run(_call_one(broken, 2, None, None, 1, None, None, 1.0))


@pytest.mark.parametrize("data,msg", [
    ({"port": 0}, "port: Input should be greater than or equal to 1"),
    ({"replicas": 0}, "replicas"),
    ({"shard_timeout": 0}, "shard_timeout"),
    ({"token": "short"}, "token: shorter than 8 characters"),
    ({"shard_cpus": 1.5}, "shard_cpus: 1.5: Ray reserves fractions"),
    ({"max_queries": 5000}, "max_queries"),
    ({"name": "a b"}, "name"),
    ({"route_prefix": "api"}, "route_prefix"),
    ({"bogus": 1}, "bogus: unknown option"),
])
def test_serve_config_errors_name_the_field(data, msg):
    with pytest.raises(ConfigError, match=msg):
        make(ServeConfig, {"index_root": "x", **data}, where="serve")


def test_serve_config_token_from_env_yaml_and_never_shown(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDEX_TOKEN", "from-the-environment")
    cfg = make(ServeConfig, {"index_root": "x", "filter_fields": "year, cat"})
    assert cfg.token.get_secret_value() == "from-the-environment" and cfg.filter_fields == ["year", "cat"]
    assert "from-the-environment" not in repr(cfg)
    s = settings(cfg)
    assert "token" not in s and len(s["token_sha256"]) == 64
    y = tmp_path / "serve.yaml"
    y.write_text("index_root: idx\nport: 9001\nreplicas: 2\nrequire_all_shards: true\ntoken: given-in-yaml\n")
    cfg = load_yaml(ServeConfig, str(y), port=9002)
    assert (cfg.port, cfg.replicas, cfg.require_all_shards) == (9002, 2, True)
    assert cfg.token.get_secret_value() == "given-in-yaml"
    monkeypatch.delenv("SHARDEX_TOKEN")
    assert settings(make(ServeConfig, {"index_root": "x"}))["token_sha256"] is None

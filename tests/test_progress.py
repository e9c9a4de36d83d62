"""index_builder/progress.py: a stage's units done of total, rate and ETA at a steady pace, in the log
and in INDEX_ROOT/_progress.json; `shardex status` of a running, failed and finished build (a
killed one: tests/test_publish.py)."""
from __future__ import annotations

import io
import re
from contextlib import redirect_stdout

import pytest

from index_builder import progress
from index_builder.cli import main
from index_builder.progress import PROGRESS, Progress, describe, status, tracking
from shards.storage.lease import hold
from shards.storage.store import Store

from helpers import build


@pytest.mark.parametrize("u, want", [
    (dict(done=12, total=50, rate=0.5, eta_s=76, elapsed_s=24), "add: 12/50 units (24%), 0.50 units/s, ETA 1 min 16 s"),
    (dict(done=50, total=50, rate=40.0, eta_s=0, elapsed_s=1.25), "add: 50/50 units (100%), 40 units/s, 1.2 s"),
    (dict(done=0, total=4, rate=0.0, eta_s=None, elapsed_s=95), "add: 0/4 units (0%), 1 min 35 s in"),
])
def test_describe(u, want):
    assert describe({"what": "add", "unit": "units", "items": 0, **u}) == want


def test_one_task_says_how_long_it_runs(monkeypatch, capfd):
    monkeypatch.setenv("SHARDEX_PROGRESS_S", "0.01")
    p = Progress("train", 1, "task")
    p.t0 -= 125
    p.last -= 1
    p.tick()
    assert "train: running, 2 min 5 s in" in capfd.readouterr().err
    p.add()
    assert capfd.readouterr().err == ""  # the stage's own line says when it ended
    q = Progress("train", 1, "task", expect=600)
    q.t0 -= 120
    q.last -= 1
    q.tick()
    assert "train: running, 2 min 0 s in, 10 min 0 s by the plan's rates, ETA 8 min 0 s" in capfd.readouterr().err
    q.t0 -= 600
    q.last -= 1
    q.tick()
    assert "train: running, 12 min 0 s in, past the 10 min 0 s the plan's rates give" in capfd.readouterr().err


def test_the_plan_gives_training_its_time():
    from index_builder.plan.capacity import train_seconds

    small, big = (train_seconds(n, 128, "IVF4096,PQ16", 2) for n in (1_000_000, 100_000_000))
    assert 10 < small < 200  # measured here: 45 s at 1M (bench/results/scale_stages.json)
    assert big == small  # the sample, not the corpus, sets it (factory.train_size)
    assert train_seconds(1_000_000, 128, "IVF4096,PQ16", 16) < small


def test_lines_come_at_the_pace_and_at_the_end(monkeypatch, capfd):
    monkeypatch.setenv("SHARDEX_PROGRESS_S", "3600")
    p = Progress("encode", 3, "parts", items="docs")
    p.add(1, 100)
    p.add(1, 100)
    assert capfd.readouterr().err == ""  # within one pace: nothing yet
    p.add(1, 50)
    assert re.search(r"encode: 3/3 parts \(100%\), 250 docs \([\d,]+/s\), 0.0 s", capfd.readouterr().err)
    monkeypatch.setenv("SHARDEX_PROGRESS_S", "0.1")
    q = Progress("add", 2, "units")
    q.t0 -= 10  # a unit that took 10 s: the ETA is the other's 10 s
    q.last -= 1
    q.add()
    assert "add: 1/2 units (50%), 0.10 units/s, ETA 10.0 s" in capfd.readouterr().err


def test_build_logs_progress_and_status_reports_it(ray_session, vector_corpus, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("SHARDEX_PROGRESS_S", "0.1")
    src, ids, _ = vector_corpus
    root = tmp_path / "index"
    build(ray_session, source=src, index_root=str(root), vector_column="vector", factory="IVF16,Flat", shards=2,
          add_rows=500)
    err = capfd.readouterr().err
    assert re.search(r"vectors: 4/4 parts \(100%\), 3,000 docs", err), err[-3000:]
    assert "add: 6/6 units (100%)" in err  # the lines between depend on timing: test_lines_come_at_the_pace
    assert "merge: 2/2 shards (100%)" in err and re.search(r"publish: (\d+)/\1 files \(100%\)", err)
    st = status(Store(str(root)))
    assert st["state"] == "idle" and st["progress"]["outcome"] == "done"
    assert list(st["progress"]["stages"]) == ["plan", "encode", "train", "add", "merge", "fields", "tune",
                                               "baseline", "publish"]
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["status", str(root)]) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == f"{root}: no build running" and lines[1].startswith("done     plan ")
    assert re.match(r"ended    done, .+ ago, after .+", lines[2])


def test_status_of_a_running_and_a_failed_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDEX_PROGRESS_S", "0.01")
    store = Store(str(tmp_path / "root"))
    with hold(store, "shardex build"), tracking(store, "shardex build"):
        progress.stage_started("add")
        p = Progress("add", 8, "units")
        p.last -= 1
        p.add(3)
        st = status(store)
        assert st["state"] == "running" and st["progress"]["units"]["done"] == 3
        assert store.exists(PROGRESS)
    with pytest.raises(RuntimeError), hold(store, "shardex reindex"), tracking(store, "shardex reindex"):
        progress.stage_started("train")
        raise RuntimeError("the trainer fell over")
    st = status(store)
    assert st["state"] == "failed" and st["progress"]["outcome"] == "failed (RuntimeError: the trainer fell over)"

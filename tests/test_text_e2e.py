"""Real text through the real encoder: a killed build leaves CURRENT alone, and its re-run resumes.

Invariant 2: CURRENT moves last, so a build killed before publish leaves the previous version served.
Invariant 3: re-running reuses the parts the killed run finished, and duplicates nothing.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from index_builder.demo.textcorpus import write_corpus
from shards.search.router import Router
from shards.storage.manifest import current_version, list_versions
from shards.storage.store import Store

from helpers import build, cli_env, wait_until

pytestmark = pytest.mark.slow
SHARDEX = os.path.join(os.path.dirname(sys.executable), "shardex")


@pytest.fixture(scope="module")
def text_index(ray_session, tmp_path_factory):
    """v1 from one corpus file; then a build of the whole corpus killed mid-encode, then resumed."""
    tmp = tmp_path_factory.mktemp("text")
    src, root = str(tmp / "corpus"), str(tmp / "index")
    info = write_corpus(src, limit=400, files=2)
    common = dict(index_root=root, fields=["title", "text"], shards=2, part_rows=50)
    v1 = build(ray_session, source=info["files"][0], **common)

    cmd = [SHARDEX, "build", src, root, "--fields", "title,text", "--shards", "2", "--part-rows", "50"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env=cli_env())
    done_before_kill = _wait_for_new_parts(Store(root), v1_parts=4, proc=proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    after_kill = {"current": current_version(Store(root)), "versions": list_versions(Store(root))}

    v2 = build(ray_session, source=src, **common)
    return dict(root=root, src=src, v1=v1, v2=v2, killed=done_before_kill, after_kill=after_kill, info=info)


def _wait_for_new_parts(store: Store, v1_parts: int, proc, timeout: float = 240) -> dict:
    """Poll until the killed run has committed at least one part of its own; return {path: mtime}."""
    def committed():
        parts = {p: os.path.getmtime(p) for p in _part_files(store)}
        if len(parts) > v1_parts:
            return parts
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        return None

    return wait_until(committed, timeout, what="the killed build to commit a part of its own")


def _part_files(store: Store) -> list[str]:
    root = store.path("embeddings")
    if not os.path.isdir(root):
        return []
    return [os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs
            if f.startswith("part-") and f.endswith(".parquet") and os.path.basename(dp) != "docs"
            and os.path.basename(dp) != "rejected"]


def test_killed_build_leaves_previous_version_current(text_index):
    after = text_index["after_kill"]
    assert after["current"] == text_index["v1"].version
    assert [v["version"] for v in after["versions"]] == [text_index["v1"].version]


def test_rerun_reuses_finished_parts_and_duplicates_nothing(text_index):
    v2 = text_index["v2"]
    # every part the killed run committed is reused, byte for byte untouched
    assert v2.reused["encode"] >= len(text_index["killed"]) - 4
    for path, mtime in text_index["killed"].items():
        assert os.path.getmtime(path) == mtime, f"{path} was rewritten"
    r = Router(text_index["root"], backend="local")
    got = np.concatenate([s.ids() for s in r.shards])
    assert len(got) == len(np.unique(got)) == text_index["info"]["documents"] == v2.documents
    assert current_version(Store(text_index["root"])) == v2.version


def test_python_api_text_search(text_index):
    r = Router(text_index["root"], backend="ray")
    hits = r.search(["compress and decompress data with gzip"], k=5)[0]
    assert len(hits) == 5
    assert hits[0].score >= hits[-1].score  # inner product: best first
    assert {"title", "text"} <= set(hits[0].fields)
    assert isinstance(hits[0].id, str) and ":" in hits[0].id or "." in hits[0].id
    r.close()


def test_cli_search_json(text_index):
    out = subprocess.run([SHARDEX, "search", text_index["root"], "send an email message", "-k", "3", "--json"],
                         capture_output=True, text=True, timeout=300, env=cli_env())
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["version"] == text_index["v2"].version
    assert len(res["results"]) == 1 and len(res["results"][0]) == 3
    assert {"id", "score", "fields"} == set(res["results"][0][0])

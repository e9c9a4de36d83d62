"""build/publish.py: one version per run, resumed when killed; files referred to, not copied; prune keeps them.

A real `shardex build` process kills itself (SIGKILL, shards/storage/store.py SHARDEX_CRASH_AT) just
before it writes the manifest, every file in place; the next build of the same corpus and options
publishes under the version name the killed one recorded, and ends with every id once.
"""
from __future__ import annotations

import io
import json
import subprocess
from contextlib import redirect_stdout

import numpy as np

from index_builder.cli import main
from shards.search.router import Router
from shards.storage.manifest import current_version, list_versions, load_manifest, vdir, verify
from shards.storage.retention import prune
from shards.storage.store import Store

from helpers import SHARDEX, build, cli_env, write_vector_corpus

N, D = 2000, 16
OPTS = dict(vector_column="vector", factory="IVF16,Flat", shards=2, fields=["title"], part_rows=500)


def _args(src, root) -> list[str]:
    return [SHARDEX, "build", str(src), str(root), "--vector-column", "vector", "--factory", "IVF16,Flat",
            "--shards", "2", "--fields", "title", "--part-rows", "500"]


def _ids(root: str, version: str | None = None) -> np.ndarray:
    r = Router(root, version=version, backend="local")
    return np.concatenate([sh.ids() for sh in r.shards])


def _corpus(tmp_path, seed: int = 3):
    src, root = tmp_path / "corpus", tmp_path / "index"
    ids, x = write_vector_corpus(str(src), n=N, d=D, files=2, seed=seed)
    return src, root, ids, x


def status_of(root) -> list[str]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["status", str(root)]) == 0
    return out.getvalue().splitlines()


def test_killed_publish_resumes_under_its_version(ray_session, tmp_path):
    src, root, ids, x = _corpus(tmp_path)
    p = subprocess.run(_args(src, root), env=cli_env(SHARDEX_CRASH_AT="versions/*/manifest.json"),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == -9, p.stderr[-3000:]
    store = Store(str(root))
    (run,) = store.ls("work")
    v = json.loads(store.read_text(f"work/{run}/version.json"))["version"]
    assert list_versions(store) == [] and not store.exists("CURRENT")       # nothing published, nothing listed
    assert {"shard-0.index", "shard-1.index", "trained.index"} <= set(store.ls(vdir(v)))
    # a copy killed before it ran leaves no file (every write is atomic): the resumed publish redoes it
    store.rm(f"{vdir(v)}/trained.index")
    said = status_of(root)  # `shardex status` of the killed build: where it stopped, how to go on
    assert said[0].startswith(f"{root}: stopped: shardex build by pid ") and "is gone from this host" in said[0]
    assert "run the same command again to resume" in said[0]
    assert said[1].startswith("stage    publish") and said[2].startswith("done     plan ") and "baseline" in said[2]

    s = build(ray_session, source=str(src), index_root=str(root), **OPTS)
    assert status_of(root)[0] == f"{root}: no build running" and status_of(root)[-1].startswith("ended    done")
    assert s.version == v and current_version(store) == v
    assert [r["version"] for r in list_versions(store)] == [v]
    m = load_manifest(store, v)
    verify(store, m)
    assert m.format == "shardex-index/2" and m.trained.file == "trained.index"
    got = _ids(str(root))
    assert len(got) == len(np.unique(got)) == N and set(got.tolist()) == set(ids.tolist())
    # stored fields are not stored twice: the docs parts are encode's, referred to by path
    assert all(f.startswith("/embeddings/") for f in m.docs.files) and "docs" not in store.ls(vdir(v))
    assert len(m.docs.sha256) == len(m.docs.files) and all(store.exists(m.path(f)) for f in m.docs.files)
    hit = Router(str(root), backend="local").search(x[:1], k=1, nprobe=16, fields=["title"])[0][0]
    assert hit.id == ids[0] and hit.fields["title"]


def test_rerun_refers_to_the_published_files_and_prune_keeps_them(ray_session, tmp_path):
    """A finished run rerun as it was publishes a version holding only its manifest; another build
    shares the docs parts; pruning the first version leaves every file the kept ones refer to."""
    src, root, ids, x = _corpus(tmp_path, seed=5)
    store = Store(str(root))
    v1 = build(ray_session, source=str(src), index_root=str(root), **OPTS).version
    v2 = build(ray_session, source=str(src), index_root=str(root), **OPTS).version
    assert v2 != v1 and store.ls(vdir(v2)) == ["manifest.json"]               # nothing copied
    m2 = load_manifest(store, v2)
    assert m2.trained.file == f"/versions/{v1}/trained.index"
    assert [sh.file for sh in m2.shards] == [f"/versions/{v1}/shard-{s}.index" for s in range(2)]
    assert m2.docs.files == load_manifest(store, v1).docs.files
    verify(store, m2)
    v3 = build(ray_session, source=str(src), index_root=str(root), **{**OPTS, "shards": 3}).version
    m3 = load_manifest(store, v3)
    assert m3.docs.files == m2.docs.files and len(m3.shards) == 3                # the same docs parts

    out = prune(store, keep=1, grace_s=0)                                       # kept: v3 and the one before
    assert out.versions == [v1] and set(out.kept) == {v2, v3}
    assert "manifest.json" not in store.ls(vdir(v1))                            # v1 is gone from the list...
    assert [r["version"] for r in list_versions(store)] == [v2, v3]
    verify(store, load_manifest(store, v2))                                     # ...but not what v2 refers to
    for v in (v2, v3):
        got = _ids(str(root), v)
        assert len(got) == len(np.unique(got)) == N
        hit = Router(str(root), version=v, backend="local").search(x[:1], k=1, nprobe=16, fields=["title"])[0][0]
        assert hit.id == ids[0] and hit.fields["title"]

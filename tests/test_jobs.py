"""The Ray job entry point, as a user runs it:

    ray start --head
    ray job submit --working-dir . -- python -m jobs.build_index --config build.yaml

against a real head started with `ray start` (tests/rayhead.py, shared by the session), plus
what `--working-dir .` uploads (Ray's own packaging code over this repo): the packages, never
venvs, data or tests.
"""
from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, write_vector_corpus
from rayhead import NEVER, PACKAGES, RAY, write_config
from rayhead import env as _env
from rayhead import uploaded_dirs as _uploaded_dirs

pytestmark = pytest.mark.slow


@pytest.fixture
def head(ray_head):
    """The session's `ray start --head` (conftest.py)."""
    return ray_head


def submit(head, config: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """The README's command, from the repo root."""
    cmd = [str(RAY), "job", "submit", "--address", head["address"], "--working-dir", ".",
           "--", "python", "-m", "jobs.build_index", "--config", str(config)]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_job_submit_builds_and_publishes(head, tmp_path):
    from shards.search.router import Router
    from shards.storage.manifest import current_version, load_manifest
    from shards.storage.store import Store

    n, d = 2000, 32
    ids, x = write_vector_corpus(str(tmp_path / "corpus"), n=n, d=d, files=2, seed=3)
    root = tmp_path / "index"
    cfg = write_config(tmp_path / "build.yaml", source=str(tmp_path / "corpus"), index_root=str(root),
                       vector_column="vector", factory="IVF16,Flat", shards=2, part_rows=500)

    p = submit(head, cfg)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-8000:]
    assert "succeeded" in out
    # The build summary, printed by the job's driver and tailed back by `ray job submit`.
    assert f"CURRENT of {root}" in out and f"{n:,} indexed, 0 rejected" in out
    assert "IVF16,Flat, 2 shard(s)" in out

    # Published: CURRENT names a complete version that a fresh reader can search.
    assert (root / "CURRENT").is_file()
    store = Store(str(root))
    m = load_manifest(store, current_version(store))
    assert m.source.documents == n and m.ntotal == n and len(m.shards) == 2
    assert m.version in out
    r = Router(str(root), backend="local")
    rows = [0, 777, n - 1]
    hits = r.search(x[rows], k=5, nprobe=16)
    assert [h[0].id for h in hits] == [int(ids[i]) for i in rows]

    # What reached the cluster: the packages, no venvs, data, tests or git history.
    dirs = _uploaded_dirs(head["temp_dir"])
    assert dirs, "the cluster unpacked no working_dir upload"
    for wd in dirs:
        names = [f.relative_to(wd).as_posix() + ("/" if f.is_dir() else "") for f in wd.rglob("*")]
        for pkg in PACKAGES:
            want = {f.relative_to(REPO).as_posix() for f in (REPO / pkg).glob("*.py")}
            assert want and want <= set(names), f"{pkg}: not uploaded: {sorted(want - set(names))}"
        leaked = [f for f in names if f.startswith(NEVER) or f.endswith(".md")]
        assert not leaked, f"uploaded but not needed: {leaked[:20]}"
        size = sum(f.stat().st_size for f in wd.rglob("*") if f.is_file())
        assert size < 1 << 20, f"working dir upload is {size:,} bytes"


def test_failing_job_exits_non_zero_with_one_line_error(head, tmp_path):
    missing = tmp_path / "no-such-corpus"
    cfg = write_config(tmp_path / "build.yaml", source=str(missing), index_root=str(tmp_path / "index"),
                       vector_column="vector", factory="Flat")

    p = submit(head, cfg)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-8000:]
    assert "failed" in out
    errors = [ln for ln in out.splitlines() if ln.startswith("shardex: error:")]
    assert errors and all(str(missing) in ln for ln in errors), out[-8000:]
    assert "Traceback" not in out  # one clear line, not a stack
    assert not (tmp_path / "index" / "CURRENT").exists()


# --- what `--working-dir .` packs, with Ray's own packaging code (no cluster) -------------------

def _repo_copy(dst: Path) -> Path:
    """This repo's files (without the real venv, git history or data), plus the things a
    working checkout has lying about: a big venv, data, git objects, tests, bench outputs."""
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(
        ".venv", "venv", ".git", "data", "__pycache__", ".pytest_cache", "out", ".venv*"))
    rng = np.random.default_rng(0)

    def blob(rel: str, size: int = 2 << 20) -> None:
        f = dst / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(rng.bytes(size))          # incompressible: a leak shows in the zip's size

    blob(".venv/lib/python3.11/site-packages/torch/lib/libtorch.so")
    blob("data/demo/corpus/part-0.parquet")
    blob("data/demo/index/versions/v1/shard-0.faiss")
    blob(".git/objects/pack/pack-0.pack")
    blob("bench/out/results.json", 4096)
    blob("bench/.venv-gpu/lib/big.so")
    blob("tests/fixtures/corpus.parquet")
    blob("index_builder/__pycache__/cli.cpython-311.pyc", 4096)
    blob("shardex.egg-info/SOURCES.txt", 4096)
    blob("build/lib/shards/search/router.py", 4096)
    blob("dist/shardex-0.1.0-py3-none-any.whl")
    return dst


@pytest.mark.parametrize("ray_default_excludes", [True, False], ids=["as-submitted", "repo-ignore-files-only"])
def test_working_dir_package_holds_only_what_the_job_needs(tmp_path, monkeypatch, ray_default_excludes):
    """as-submitted: the exact path of `ray job submit --working-dir` (upload_working_dir_if_needed
    -> create_package, with Ray's default excludes); repo-ignore-files-only: Ray's defaults
    turned off, so this repo's .gitignore and .rayignore alone must keep venvs and data out."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    monkeypatch.delenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", raising=False)
    if not ray_default_excludes:
        monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    else:
        monkeypatch.delenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", raising=False)
    wd = _repo_copy(tmp_path / "checkout")
    pkg = tmp_path / "pkg.zip"

    def upload(working_dir, excludes, is_file=False):   # what the job SDK's upload_fn does, minus the PUT
        assert not is_file
        create_package(working_dir, pkg, include_gitignore=True, excludes=excludes)

    env = upload_working_dir_if_needed({"working_dir": str(wd)}, include_gitignore=True, upload_fn=upload)
    assert env["working_dir"].startswith("gcs://_ray_pkg_")

    names = zipfile.ZipFile(pkg).namelist()
    for pkg_name in PACKAGES:
        want = {f.relative_to(REPO).as_posix() for f in (REPO / pkg_name).glob("*.py")}
        assert want and want <= set(names), f"{pkg_name}: missing {sorted(want - set(names))}"
    leaked = [f for f in names if f.startswith(NEVER + ("build/", "dist/")) or ".egg-info/" in f
              or f.endswith((".md", ".pyc"))]
    assert not leaked, f"packed but not needed: {leaked}"
    assert pkg.stat().st_size < 1 << 20, f"{pkg.stat().st_size:,} bytes: {names}"

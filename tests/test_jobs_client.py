"""The job entrypoints through Ray's JobSubmissionClient, against the session's `ray start --head`.

A build, then the nightly reindex as a job: both end SUCCEEDED with progress in their logs; so
does an eval. A serve job answers over HTTP until `ray job stop`, which ends it STOPPED with its
Serve apps deleted. A job that fails ends FAILED with the one-line cause in its logs. Each job's runtime env (the
working dir, filtered by .gitignore and .rayignore) holds the code the job imports and nothing else.
"""
from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

from helpers import REPO, build, clustered, free_port, vector_table, wait_until, write_vector_corpus
from rayhead import NEVER, uploaded_dirs, wait_job, write_config

pytestmark = pytest.mark.slow
JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if p.stem != "__init__")


@pytest.fixture(scope="module")
def client(ray_head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray_head["address"])


def submit(client, module: str, config: Path, *flags: str) -> tuple[str, str, str]:
    """Submit `python -m <module> --config X`, as a user of the SDK does; (status, logs, job id)."""
    job = client.submit_job(entrypoint=f"python -m {module} --config {config} {' '.join(flags)}".strip(),
                            runtime_env={"working_dir": str(REPO)})
    status = wait_job(client, job)
    return status, client.get_job_logs(job), job


def test_build_then_reindex_as_jobs(client, tmp_path):
    from shards.storage.manifest import current_version, list_versions, load_manifest
    from shards.storage.store import Store

    src, root = tmp_path / "corpus", tmp_path / "index"
    write_vector_corpus(str(src), n=2000, d=16, files=2, seed=4)
    build = write_config(tmp_path / "build.yaml", source=str(src), index_root=str(root), vector_column="vector",
                         fields=["title"], factory="IVF16,Flat", shards=2, part_rows=500)
    status, logs, _ = submit(client, "jobs.build_index", build)
    assert status == "SUCCEEDED", logs[-4000:]
    v1 = current_version(Store(str(root)))

    new = np.arange(100, dtype=np.int64) * 3 + 10**6
    pq.write_table(vector_table(new, clustered(100, 16, seed=9), title=[f"new {i}" for i in new]),
                   src / "part-2.parquet")
    reindex = write_config(tmp_path / "reindex.yaml", source=str(src), index_root=str(root), keep=1, grace="0")
    status, logs, _ = submit(client, "jobs.reindex", reindex)
    assert status == "SUCCEEDED", logs[-4000:]
    # progress while it ran, then the summary
    for line in ("plan: 3 file(s), 2,100 rows", "parts (100%)", "reindex: 100 new, 0 changed, 0 deleted",
                 "quantizer: reuse", "publish: start", "prune: 0 version(s)"):
        assert line in logs, f"{line!r} not in the job's logs:\n{logs[-4000:]}"
    v2 = current_version(Store(str(root)))
    assert v2 != v1 and f"reindex      from {v1}: 100 new" in logs
    m = load_manifest(Store(str(root)), v2)
    assert m.source.documents == 2100 and m.docs.fields == ["title"] and m.lineage.parent == v1
    assert [v["version"] for v in list_versions(Store(str(root)))] == [v1, v2]


@pytest.fixture(scope="module")
def small_index(ray_session, tmp_path_factory):
    """2,000 x 16 vectors, IVF16,Flat in 2 shards, built in this process (the jobs below only read it)."""
    tmp = tmp_path_factory.mktemp("jobs-index")
    src, root = tmp / "corpus", tmp / "index"
    _, x = write_vector_corpus(str(src), n=2000, d=16, files=2, seed=5)
    s = build(ray_session, source=str(src), index_root=str(root), vector_column="vector", fields=["title"],
              factory="IVF16,Flat", shards=2, part_rows=500)
    return {"root": str(root), "version": s.version, "x": x}


def test_eval_as_a_job(client, small_index, tmp_path):
    out = tmp_path / "report"
    cfg = write_config(tmp_path / "eval.yaml", index_root=small_index["root"], k=5, nprobe=[1, 4, 16],
                       num_queries=200, latency_queries=20, out=str(out))
    status, logs, _ = submit(client, "jobs.eval", cfg)
    assert status == "SUCCEEDED", logs[-4000:]
    v = small_index["version"]
    for line in (f"eval: {v}: 2 shard(s), 2,000 vectors loaded", "eval: exact top-5 of 200 queries over",
                 "eval: nprobe 1: recall@5", "eval: nprobe 4: recall@5", "eval: nprobe 16: recall@5"):
        assert line in logs, f"{line!r} not in the job's logs:\n{logs[-4000:]}"
    report = json.loads((out / "eval.json").read_text())
    assert report["version"] == v and [r["nprobe"] for r in report["results"]] == [1, 4, 16]
    assert report["results"][-1]["recall"] >= 0.99            # every list probed: IVF-Flat is exact
    assert (out / "eval.png").stat().st_size > 0 and f"version      {v}" in logs


def wait_for_log(client, job: str, text: str, timeout: float = 180) -> str:
    from ray.job_submission import JobStatus

    def logged():
        logs = client.get_job_logs(job)
        if text in logs:
            return logs
        assert client.get_job_status(job) in (JobStatus.PENDING, JobStatus.RUNNING), logs[-4000:]
        return None

    return wait_until(logged, timeout, 0.5,
                      what=lambda: f"{text!r} in the logs of {job}:\n{client.get_job_logs(job)[-4000:]}")


def serve_apps(address: str) -> list[str]:
    """The Serve applications on the cluster, from the dashboard's Serve REST API."""
    r = requests.get(f"{address}/api/serve/applications/", timeout=30)
    r.raise_for_status()
    return sorted(r.json().get("applications") or {})


def test_serve_as_a_job_answers_until_stopped(client, ray_head, small_index, tmp_path):
    port = free_port()
    cfg = write_config(tmp_path / "serve.yaml", index_root=small_index["root"], port=port, poll_seconds=0,
                       shard_cpus=0.05, threads=1)
    job = client.submit_job(entrypoint=f"python -m jobs.serve --config {cfg}", runtime_env={"working_dir": str(REPO)})
    try:
        logs = wait_for_log(client, job, "serving ")
        v = small_index["version"]
        assert f"serving {v} of {small_index['root']} at http://127.0.0.1:{port}" in logs
        base = f"http://127.0.0.1:{port}"
        assert requests.get(base + "/health", timeout=30).json()["version"] == v
        r = requests.post(base + "/search", json={"vectors": small_index["x"][:2].tolist(), "k": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["version"] == v and r.json()["results"][0][0]["id"] == 1
        assert serve_apps(ray_head["address"]) == ["shardex", f"shardex--{v}"]
    finally:
        client.stop_job(job)
    assert wait_job(client, job, timeout=60) == "STOPPED"
    assert "stopping" in client.get_job_logs(job)
    # Within `ray job stop`'s 3 s grace (RAY_JOB_STOP_WAIT_TIME_S) the job deletes its apps; Serve's proxy
    # itself may outlive it (jobs/serve.py says how to give it longer), but shardex answers no more.
    assert serve_apps(ray_head["address"]) == []
    try:
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 404
    except requests.ConnectionError:
        pass
    requests.delete(f"{ray_head['address']}/api/serve/applications/", timeout=60).raise_for_status()  # Serve too


def test_failing_job_ends_failed_with_its_cause(client, tmp_path):
    cfg = write_config(tmp_path / "reindex.yaml", source=str(tmp_path / "corpus"), index_root=str(tmp_path / "i"),
                       kepp=3)
    status, logs, job = submit(client, "jobs.reindex", cfg)
    assert status == "FAILED", logs[-4000:]
    errors = [ln for ln in logs.splitlines() if ln.startswith("shardex: error:")]
    assert errors == [f"shardex: error: {cfg}: kepp: unknown option (check the spelling and the command's --help)"]
    assert "Traceback" not in logs
    assert "exit code 1" in (client.get_job_info(job).message or "")

    # a failure deep inside a run: no live version can be read, the corpus is missing
    cfg = write_config(tmp_path / "reindex2.yaml", source=str(tmp_path / "nowhere"), index_root=str(tmp_path / "i"))
    status, logs, _ = submit(client, "jobs.reindex", cfg)
    assert status == "FAILED" and "Traceback" not in logs
    (err,) = [ln for ln in logs.splitlines() if ln.startswith("shardex: error:")]
    assert str(tmp_path / "nowhere") in err


def repo_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """The repo's source files a module imports, transitively (lazy imports inside functions included)."""
    seen = seen if seen is not None else set()
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:   # `from pkg.mod import name`: name is not a module
        return set()
    origin = Path(spec.origin).resolve() if spec and spec.origin else None
    if origin is None or not origin.is_relative_to(REPO) or module in seen:
        return set()
    seen.add(module)
    files = {origin.relative_to(REPO).as_posix()}
    tree = ast.parse(origin.read_text())
    pkg = module if spec.submodule_search_locations else module.rpartition(".")[0]
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            if n.split(".")[0] in ("index_builder", "shards", "jobs"):
                files |= repo_imports(n, seen)
    return files


@pytest.mark.parametrize("job", JOBS)
def test_job_runtime_env_holds_what_it_imports_and_nothing_else(job, ray_head, client, tmp_path):
    """After the jobs above ran: the uploaded working dir has every file the job's imports reach
    (packages' __init__ included), no venvs, data, tests, benchmarks, docs or deployment files."""
    need = repo_imports(f"jobs.{job}") | {f"{p}/__init__.py" for p in ("index_builder", "shards", "jobs")}
    assert f"jobs/{job}.py" in need and "index_builder/cli.py" in need
    dirs = uploaded_dirs(ray_head["temp_dir"])
    if not dirs:  # this job's own upload: submit its --help
        status, logs, _ = submit(client, f"jobs.{job}", tmp_path / "unused.yaml", "--help")
        dirs = uploaded_dirs(ray_head["temp_dir"])
    assert dirs
    for wd in dirs:
        names = {f.relative_to(wd).as_posix() for f in wd.rglob("*") if f.is_file()}
        assert need <= names, f"jobs.{job} imports files not uploaded: {sorted(need - names)}"
        extra = [n for n in names if n.startswith(NEVER) or n.endswith((".md", ".yaml", ".pyc"))
                 or n.startswith(("cluster/", "bench/"))]
        assert not extra, f"uploaded but no job needs them: {extra[:20]}"
        code = {n for n in names if n.endswith(".py")}
        assert code <= {f.relative_to(REPO).as_posix() for p in ("index_builder", "shards", "jobs")
                        for f in (REPO / p).rglob("*.py")}, sorted(code)[:20]

"""cluster/: every deployment file loads and checks out, without a cloud account or a Kubernetes cluster.

- the `ray up` YAML passes Ray's own cluster-config validation (what `ray up` runs);
- every rayVersion and every image is the Ray that pyproject.toml pins;
- every entrypoint (in the manifests and in cluster/README.md) names an existing jobs.* module,
  and its config (the file the ConfigMap mounts, plus any flags) is valid for that job: it is
  parsed by the job's own CLI code, into the config model of that job;
- the RayService's serveConfigV2 passes Serve's own schema (what the dashboard checks on the
  PUT KubeRay sends), its import path resolves to shardex's app builder, and its args are a
  valid `shardex serve` config;
- resources are consistent: GPU groups ask for GPUs, the encoder actors a job's config asks for
  fit on one GPU node and within the GPU group, a driver that asks for CPUs fits a node that has
  its config mounted, serving replicas fit a node, and every Ray cluster spec is the same one.

test_cluster_schemas.py checks every document under kuberay/ against KubeRay's own CRD schemas
(vendored in tests/kuberay-crds/), strict about unknown fields as `kubectl apply --validate=strict`.
"""
from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from helpers import CLUSTER, REPO, docs, manifests, rayservice

JOB_CONFIGS = CLUSTER / "jobs"        # the shardex-jobs ConfigMap, mounted at /config
CONFIG_MOUNT = "/config"
CONFIGMAP = "shardex-jobs"


def pinned_ray() -> str:
    m = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (REPO / "pyproject.toml").read_text())
    return m.group(1)


def cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayCluster spec) of every RayCluster, RayJob, RayCronJob and RayService."""
    out = []
    for where, d in manifests():
        spec = d.get("spec", {})
        found = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
                 "RayCronJob": spec.get("jobTemplate", {}).get("rayClusterSpec"),
                 "RayService": spec.get("rayClusterConfig")}.get(d["kind"])
        if found:
            out.append((f"{where} {d['kind']}", found))
    return out


def entrypoints() -> list[tuple[str, str, dict]]:
    """(where, entrypoint, its RayJob spec) of every RayJob and RayCronJob."""
    out = []
    for where, d in manifests():
        if d["kind"] == "RayJob":
            out.append((where, d["spec"]["entrypoint"], d["spec"]))
        elif d["kind"] == "RayCronJob":
            out.append((where, d["spec"]["jobTemplate"]["entrypoint"], d["spec"]["jobTemplate"]))
    return out


def readme_commands() -> list[str]:
    """The `python -m jobs.* --config X` commands cluster/README.md tells an operator to submit."""
    text = (CLUSTER / "README.md").read_text()
    return [m.group(0).strip() for m in re.finditer(r"python -m jobs\.\w+ --config \S+", text)]


def walk(node, key: str):
    """Every value stored under `key` anywhere in a nested mapping."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)


# ---------------------------------------------------------------- loading

def test_every_file_loads():
    files = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
    names = {p.relative_to(CLUSTER).as_posix() for p in files}
    assert {"aws.yaml", "Dockerfile", "README.md", "kuberay/raycluster.yaml", "kuberay/rayjob-build.yaml",
            "kuberay/rayjob-eval.yaml", "kuberay/rayservice.yaml", "kuberay/raycronjob-reindex.yaml",
            "kuberay/cronjob-reindex.yaml", "jobs/build.yaml", "jobs/reindex.yaml", "jobs/serve.yaml",
            "jobs/eval.yaml"} <= names
    for p in files:
        if p.suffix == ".yaml":
            assert docs(p), f"{p}: empty"
    kinds = {d["kind"] for _, d in manifests()}
    assert {"RayCluster", "RayJob", "RayCronJob", "RayService", "CronJob"} <= kinds
    for where, d in manifests():
        meta = d.get("metadata", {})
        assert d.get("apiVersion") and (meta.get("name") or meta.get("generateName")), where


def test_launcher_yaml_passes_rays_validation():
    """What `ray up` does before it touches AWS: fill in the defaults, then validate against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = docs(CLUSTER / "aws.yaml")[0]
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] == "head"

    broken = copy.deepcopy(raw)                       # the validation is real: a bad value is refused
    broken["available_node_types"]["gpu_encode"]["resources"]["GPU"] = "one"
    with pytest.raises(Exception, match="not of type"):
        validate_config(prepare_config(broken))


def test_ray_version_and_images_match_the_pin():
    import ray

    pin = pinned_ray()
    assert ray.__version__ == pin
    versions = [v for _, d in manifests() for v in walk(d, "rayVersion")]
    assert versions and set(versions) == {pin}
    images = [i for _, d in manifests() for i in walk(d, "image") if "kubectl" not in i]
    aws = docs(CLUSTER / "aws.yaml")[0]
    images += list(walk(aws, "image")) + list(walk(aws, "worker_image"))
    assert images
    for img in images:
        assert f"ray:{pin}-" in img or f"-ray{pin}-" in img, f"{img}: not built on Ray {pin}"
    base = re.search(r"ARG RAY_IMAGE=(\S+)", (CLUSTER / "Dockerfile").read_text()).group(1)
    assert base == f"rayproject/ray:{pin}-py311"


# ---------------------------------------------------------------- entrypoints and their configs

def job_command(module: str) -> str:
    """The `shardex` subcommand a jobs.* module runs: main(["<cmd>", *sys.argv[1:]])."""
    spec = importlib.util.find_spec(module)
    assert spec and spec.origin, f"{module}: no such module"
    m = re.search(r'main\(\[\s*"(\w+)"', Path(spec.origin).read_text())
    assert m, f"{module}: does not run a shardex command"
    return m.group(1)


def validated(entrypoint: str):
    """Parse an entrypoint as the job would, with /config/* (a manifest's) or a bare file name (the
    README's copy of a template) read from cluster/jobs/; the job's config model."""
    from index_builder.cli import _config_from, parser

    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), entrypoint
    cmd = job_command(argv[2])
    args = [str(JOB_CONFIGS / Path(a).relative_to(CONFIG_MOUNT)) if a.startswith(CONFIG_MOUNT + "/")
            else str(JOB_CONFIGS / a) if a.endswith(".yaml") and "/" not in a else a for a in argv[3:]]
    ns = parser().parse_args([cmd, *args])
    assert ns.config and Path(ns.config).is_file(), f"{entrypoint}: its --config is not in {JOB_CONFIGS}"
    return _config_from(ns)


def config_mounted(group: dict) -> bool:
    spec = group["template"]["spec"]
    mounts = [m for c in spec["containers"] for m in c.get("volumeMounts", [])]
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    return any(m["mountPath"] == CONFIG_MOUNT and vols[m["name"]].get("configMap", {}).get("name") == CONFIGMAP
               for m in mounts)


def driver_groups(job: dict) -> list[tuple[str, dict]]:
    """The groups whose pods may run a RayJob's driver: the head, unless the entrypoint asks for
    resources (entrypointNumCpus/Gpus), which a head with num-cpus 0 never has."""
    spec = job["rayClusterSpec"]
    cpus, gpus = float(job.get("entrypointNumCpus", 0)), float(job.get("entrypointNumGpus", 0))
    if not cpus and not gpus:
        return [("head", spec["headGroupSpec"])]
    return [(g["groupName"], g) for g in spec["workerGroupSpecs"]
            if ray_resources(g)[0] >= cpus and ray_resources(g)[1] >= gpus]


# what each job's YAML is parsed into
JOB_MODELS = {"jobs.build_index": "BuildConfig", "jobs.reindex": "ReindexConfig", "jobs.serve": "ServeConfig",
              "jobs.eval": "EvalConfig"}


def test_every_entrypoint_names_a_job_and_a_valid_config():
    from index_builder.cli import config_model

    seen, used = {}, set()
    for where, ep, job in entrypoints():
        cfg = validated(ep)
        seen[shlex.split(ep)[2]] = type(cfg)
        used.add(Path(shlex.split(ep)[shlex.split(ep).index("--config") + 1]).name)
        groups = driver_groups(job)
        assert groups, f"{where}: no group of its cluster can run the driver ({job.get('entrypointNumCpus')} CPUs)"
        for name, g in groups:
            assert config_mounted(g), f"{where}: {name} may run the driver but has no {CONFIG_MOUNT} from {CONFIGMAP}"
    for ep in readme_commands():
        cfg = validated(ep)
        seen[shlex.split(ep)[2]] = type(cfg)
        used.add(shlex.split(ep)[shlex.split(ep).index("--config") + 1])
    jobs = sorted(f"jobs.{p.stem}" for p in (REPO / "jobs").glob("*.py") if p.stem != "__init__")
    assert sorted(JOB_MODELS) == jobs, "a jobs.* module this test does not know"
    assert {k: v.__name__ for k, v in seen.items()} == JOB_MODELS   # every job is deployed, with its own model
    assert {m: config_model(n) for m, n in JOB_MODELS.items()} == seen
    assert used == {p.name for p in JOB_CONFIGS.glob("*.yaml")}, "a config in cluster/jobs/ that no job uses"


def test_a_bad_config_key_is_caught(tmp_path, monkeypatch):
    """The check above can fail: a misspelt key in a job config is an error naming it."""
    from shards.errors import ConfigError

    bad = tmp_path / "reindex.yaml"
    bad.write_text((JOB_CONFIGS / "reindex.yaml").read_text() + "kepp: 3\n")
    monkeypatch.setattr(sys.modules[__name__], "JOB_CONFIGS", tmp_path)
    with pytest.raises(ConfigError, match="kepp: unknown option"):
        validated("python -m jobs.reindex --config /config/reindex.yaml")


# ---------------------------------------------------------------- resources

def ray_resources(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees on one pod of a group: rayStartParams, else the container's limits."""
    c = group["template"]["spec"]["containers"][0]
    lim = c["resources"]["limits"]
    assert c["resources"]["requests"] == lim, f"{group.get('groupName', 'head')}: requests != limits"
    params = group.get("rayStartParams", {})
    cpu = float(params.get("num-cpus", lim["cpu"]))
    gpu = float(params.get("num-gpus", lim.get("nvidia.com/gpu", 0)))
    return cpu, gpu


def test_every_ray_cluster_spec_is_the_same_and_gpu_groups_ask_for_gpus():
    specs = cluster_specs()
    assert len(specs) >= 4
    first = specs[0][1]
    for where, spec in specs:
        assert spec == first, f"{where}: differs from {specs[0][0]}; keep them one cluster shape"
    head_cpu, _ = ray_resources(first["headGroupSpec"])
    assert head_cpu == 0  # nothing but drivers on the head
    groups = {g["groupName"]: g for g in first["workerGroupSpecs"]}
    assert {"gpu-encode", "cpu-index"} <= set(groups)
    for name, g in groups.items():
        cpu, gpu = ray_resources(g)
        image = g["template"]["spec"]["containers"][0]["image"]
        if "gpu" in name:
            assert gpu >= 1 and image.endswith("-gpu"), name
            assert any(t["key"] == "nvidia.com/gpu" for t in g["template"]["spec"].get("tolerations", []))
        else:
            assert gpu == 0 and image.endswith("-cpu"), name
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and cpu >= 1


def fits(cfg, nodes: dict[str, tuple[float, float, int]]) -> list[str]:
    """What is wrong with the encoder pool cfg asks for on these node types {name: (cpus, gpus, max)},
    sized by the pipeline's own rule (index_builder.encode.sizing.slots) for the cluster at full size."""
    from index_builder.encode.sizing import Node, slots

    full = [Node(f"{name}-{i}", int(c), g) for name, (c, g, n) in nodes.items() for i in range(n)]
    gpus = sum(n.gpus for n in full)
    pool = slots(full, cfg.gpus_per_actor or 0.0, cfg.actors, cfg.tokenizer_workers)
    bad = []
    if any(s.gpus == 0 for s in pool):
        bad.append("the encoder actors would run on CPUs: give gpus_per_actor")
    by_id = {n.id: n for n in full}
    for s in pool:
        if s.node and (s.cpus > by_id[s.node].cpus or s.gpus > by_id[s.node].gpus):
            bad.append(f"an encoder actor ({s.cpus} CPU, {s.gpus} GPU) does not fit node {by_id[s.node]}")
    if any(s.node is None for s in pool):
        bad.append(f"{len(pool)} actors x {pool[0].gpus} GPU: more than the {gpus} GPUs at full size hold")
    return bad


def test_encoder_actors_fit_the_gpu_group():
    checked = 0
    for where, ep, job in entrypoints():
        cfg = validated(ep)
        if "actors" not in type(cfg).model_fields:
            continue  # serve and eval run no encoder pool
        groups = job["rayClusterSpec"]["workerGroupSpecs"]
        nodes = {g["groupName"]: (*ray_resources(g), g["maxReplicas"]) for g in groups}
        assert fits(cfg, nodes) == [], where
        checked += 1
    assert checked >= 3
    # the check can fail: more actors than the group can hold
    cfg = validated("python -m jobs.build_index --config /config/build.yaml").model_copy(update={"actors": 9})
    assert fits(cfg, nodes) and "more than the" in fits(cfg, nodes)[-1]


def test_launcher_node_types_fit_the_jobs():
    aws = docs(CLUSTER / "aws.yaml")[0]
    types = aws["available_node_types"]
    head = types.pop(aws["head_node_type"])
    assert head["resources"].get("CPU") == 0 and "--num-cpus=0" in " ".join(aws["head_start_ray_commands"])
    nodes = {k: (t["resources"].get("CPU", 0), t["resources"].get("GPU", 0), t["max_workers"])
             for k, t in types.items()}
    assert nodes["gpu_encode"][1] >= 1 and nodes["cpu_index"][1] == 0
    assert sum(t["max_workers"] for t in types.values()) <= aws["max_workers"]
    # GPU nodes: the GPU image and faiss-gpu; CPU nodes and the head: faiss-cpu
    assert types["gpu_encode"]["docker"]["worker_image"].endswith("-gpu")
    assert "[gpu]" in " ".join(types["gpu_encode"]["worker_setup_commands"])
    assert "[cpu]" in " ".join(types["cpu_index"]["worker_setup_commands"]) + " ".join(aws["setup_commands"])
    for ep in ("python -m jobs.build_index --config /config/build.yaml",
               "python -m jobs.reindex --config /config/reindex.yaml"):
        assert fits(validated(ep), nodes) == [], ep


# ---------------------------------------------------------------- the RayService

def serve_config() -> dict:
    return yaml.safe_load(rayservice()["spec"]["serveConfigV2"])


def test_rayservice_config_passes_serves_schema_and_names_shardex_app():
    """What the dashboard checks when KubeRay PUTs serveConfigV2, then what Serve's build task does:
    import the path, and shardex's builder turns the args into a valid `shardex serve` config."""
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    from shards import serve_app
    from shards.config import ServeConfig

    raw = serve_config()
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert import_attr(app.import_path) is serve_app.app
    cfg = serve_app.config(app.args)
    assert isinstance(cfg, ServeConfig) and cfg.index_root.startswith("s3://")
    assert cfg.name == app.name and app.route_prefix == "/"           # the version apps are <name>--<version>
    head = rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert schema.http_options.port == ports["serve"] and schema.http_options.host == "0.0.0.0"

    broken = copy.deepcopy(raw)                                       # the schema check is real
    broken["applications"][0]["import_path"] = "shards"
    with pytest.raises(Exception, match="invalid import path"):
        ServeDeploySchema.model_validate(broken)


@pytest.mark.parametrize("change,error", [
    ({"poll_secs": 30}, "poll_secs: unknown option"),
    ({"replicas": 0}, "replicas: Input should be greater than or equal to 1"),
    ({"port": 8000}, "port: set by http_options.port"),
    ({"token": "0123456789abcdef"}, "token: would be logged"),
])
def test_rayservice_bad_args_are_refused_naming_the_key(change, error):
    from shards import serve_app
    from shards.errors import ConfigError

    (app,) = serve_config()["applications"]
    with pytest.raises(ConfigError, match=error):
        serve_app.config({**app["args"], **change})


def test_serving_replicas_fit_a_node():
    """A shard replica (shard_cpus, threads) fits a cpu-index node; two versions fit the group at its
    maximum size during a swap; the same for serve.yaml on the launcher's cpu_index nodes."""
    from shards import serve_app

    (app,) = serve_config()["applications"]
    cfg = serve_app.config(app["args"])
    spec = rayservice()["spec"]["rayClusterConfig"]
    (cpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "cpu-index"]
    node_cpus, _ = ray_resources(cpu)
    assert cfg.threads <= cfg.shard_cpus <= node_cpus
    replicas_per_node = node_cpus // cfg.shard_cpus
    assert 2 * cfg.replicas <= replicas_per_node * cpu["maxReplicas"]    # one shard, two versions at once

    aws = docs(CLUSTER / "aws.yaml")[0]["available_node_types"]["cpu_index"]
    job = validated("python -m jobs.serve --config serve.yaml")
    assert job.threads <= job.shard_cpus <= aws["resources"]["CPU"] and job.host == "0.0.0.0"
    assert {k: v for k, v in app["args"].items() if k not in ("name", "shard_timeout")} == \
        {k: v for k, v in yaml.safe_load((JOB_CONFIGS / "serve.yaml").read_text()).items()
         if k not in ("host", "port")}, "serve.yaml and the RayService's args serve the same way"


def test_eval_driver_runs_where_its_threads_are():
    (job,) = [j for _, ep, j in entrypoints() if "jobs.eval" in ep]
    cfg = validated(job["entrypoint"])
    groups = driver_groups(job)
    assert float(job["entrypointNumCpus"]) == cfg.threads and [n for n, _ in groups] == ["cpu-index"]

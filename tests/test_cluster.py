"""cluster/: every deployment file loads and checks out, without a cloud account or a Kubernetes cluster.

- the `ray up` YAML passes Ray's own cluster-config validation (what `ray up` runs);
- every rayVersion and every image is the Ray that pyproject.toml pins;
- every entrypoint names an existing jobs.* module, and its config (the file the ConfigMap
  mounts, plus any flags) is valid for that job: it is parsed by the job's own CLI code;
- resources are consistent: GPU groups ask for GPUs, the encoder actors a job's config asks for
  fit on one GPU node and within the GPU group, and every Ray cluster spec is the same one.
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

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
JOB_CONFIGS = CLUSTER / "jobs"        # the shardex-jobs ConfigMap, mounted at /config
CONFIG_MOUNT = "/config"
CONFIGMAP = "shardex-jobs"


def pinned_ray() -> str:
    m = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (REPO / "pyproject.toml").read_text())
    return m.group(1)


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[tuple[str, dict]]:
    """Every Kubernetes object under cluster/kuberay, with the RayJobs embedded in ConfigMaps."""
    out = []
    for f in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for d in docs(f):
            out.append((f.name, d))
            if d["kind"] == "ConfigMap":
                for key, text in d.get("data", {}).items():
                    if key.endswith(".yaml"):
                        out += [(f"{f.name}:{key}", e) for e in yaml.safe_load_all(text) if e]
    return out


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
    """(where, entrypoint, its RayCluster spec) of every RayJob and RayCronJob."""
    out = []
    for where, d in manifests():
        if d["kind"] == "RayJob":
            out.append((where, d["spec"]["entrypoint"], d["spec"]["rayClusterSpec"]))
        elif d["kind"] == "RayCronJob":
            t = d["spec"]["jobTemplate"]
            out.append((where, t["entrypoint"], t["rayClusterSpec"]))
    return out


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
            "kuberay/raycronjob-reindex.yaml", "kuberay/cronjob-reindex.yaml"} <= names
    for p in files:
        if p.suffix == ".yaml":
            assert docs(p), f"{p}: empty"
    kinds = {d["kind"] for _, d in manifests()}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob"} <= kinds
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
    """Parse an entrypoint as the job would, with /config/* read from cluster/jobs/; the config model."""
    from index_builder.cli import _config_from, parser

    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), entrypoint
    cmd = job_command(argv[2])
    args = [str(JOB_CONFIGS / Path(a).relative_to(CONFIG_MOUNT)) if a.startswith(CONFIG_MOUNT + "/") else a
            for a in argv[3:]]
    ns = parser().parse_args([cmd, *args])
    assert ns.config and Path(ns.config).is_file(), f"{entrypoint}: its --config is not in {JOB_CONFIGS}"
    return _config_from(ns)


def test_every_entrypoint_names_a_job_and_a_valid_config():
    from index_builder.config import BuildConfig, ReindexConfig

    seen, used = {}, set()
    for where, ep, spec in entrypoints():
        cfg = validated(ep)
        seen[shlex.split(ep)[2]] = type(cfg)
        used.add(Path(shlex.split(ep)[shlex.split(ep).index("--config") + 1]).name)
        mounts = [m for c in spec["headGroupSpec"]["template"]["spec"]["containers"] for m in c["volumeMounts"]]
        vols = {v["name"]: v for v in spec["headGroupSpec"]["template"]["spec"]["volumes"]}
        (m,) = [m for m in mounts if m["mountPath"] == CONFIG_MOUNT]
        assert vols[m["name"]]["configMap"]["name"] == CONFIGMAP, where
    assert seen["jobs.build_index"] is BuildConfig and seen["jobs.reindex"] is ReindexConfig
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
    sized by the pipeline's own rule (encode_pool.shape) for the cluster at full size."""
    from index_builder.encode_pool import shape

    total_cpu = sum(c * n for c, _, n in nodes.values())
    total_gpu = sum(g * n for _, g, n in nodes.values())
    node_cpus = int(max(c for c, _, _ in nodes.values()))
    gpa = cfg.gpus_per_actor or 0.0
    actors, threads, gpa = shape(int(total_cpu), node_cpus, total_gpu, gpa, cfg.actors)
    gpu_nodes = [(c, g) for c, g, _ in nodes.values() if g > 0]
    bad = []
    if gpa == 0:
        bad.append("the encoder actors would run on CPUs: give gpus_per_actor")
    if not any(threads <= c and gpa <= g for c, g in gpu_nodes):
        bad.append(f"an encoder actor ({threads} CPU, {gpa} GPU) fits no GPU node {gpu_nodes}")
    if actors * gpa > total_gpu:
        bad.append(f"{actors} actors x {gpa} GPU > {total_gpu} GPUs at full size")
    return bad


def test_encoder_actors_fit_the_gpu_group():
    for where, ep, spec in entrypoints():
        cfg = validated(ep)
        nodes = {g["groupName"]: (*ray_resources(g), g["maxReplicas"]) for g in spec["workerGroupSpecs"]}
        assert fits(cfg, nodes) == [], where
    # the check can fail: more actors than the group can hold
    cfg = validated(entrypoints()[0][1]).model_copy(update={"actors": 9})
    assert fits(cfg, nodes) and "actors" in fits(cfg, nodes)[-1]


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

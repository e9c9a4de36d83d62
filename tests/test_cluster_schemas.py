"""cluster/kuberay/: every document checked as a cluster would check it, beside test_cluster.py's
checks of keys and entrypoints.

- A KubeRay kind (RayCluster, RayJob, RayCronJob, RayService; the RayJob a ConfigMap carries too)
  validates against the openAPIV3Schema of its apiVersion in KubeRay's own CRDs, vendored unchanged
  in tests/kuberay-crds/ (its README says from where), strict as `kubectl apply --validate=strict`:
  a field the schema does not know is an error, where the API server would prune it silently and
  the operator would never see it.
- A built-in kind (ServiceAccount, Role, RoleBinding, ConfigMap, CronJob) is not a CRD and its
  schema is the API server's own, not here: its apiVersion/kind must be one Kubernetes serves
  today, its top-level and spec fields the ones that kind has (BUILTIN), and a pod template (the
  CronJob's) is checked against the PodTemplateSpec schema the KubeRay CRDs embed, which is
  core/v1's.
- The validator is real: a misspelled field, a string for an int, a bad quantity, an unknown
  kind are refused (test_a_broken_document_is_refused).
"""
from __future__ import annotations

import copy
import functools

import jsonschema
import pytest
import yaml

from helpers import REPO, manifests

CRDS = REPO / "tests" / "kuberay-crds"

OBJECT_META = {  # what the API server itself checks of metadata (the CRDs say only "type: object")
    "type": "object", "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "generateName": {"type": "string"}, "namespace": {"type": "string"},
                   "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                   "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                   "finalizers": {"type": "array", "items": {"type": "string"}},
                   "ownerReferences": {"type": "array", "items": {"type": "object"}}}}


LITERAL = ("enum", "required", "default", "example", "x-kubernetes-validations")  # values, not schemas


def strict(node):
    """An openAPIV3Schema as a JSON Schema (draft 4, which OpenAPI 3.0's schema objects follow):
    - an object's unknown fields are errors (additionalProperties false) unless the schema says
      x-kubernetes-preserve-unknown-fields, or gives additionalProperties itself (a map);
    - x-kubernetes-int-or-string: an int or a string (a quantity's pattern then checks strings only,
      as the API server does);
    - nullable: null is allowed too;
    - x-kubernetes-embedded-resource: apiVersion, kind and metadata are implied.
    The other x-kubernetes-* keys (list and map types) say how lists merge, not what a value may
    be; CEL rules (x-kubernetes-validations) are refused where a document reaches them (RULES)."""
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    s = {k: {p: strict(x) for p, x in v.items()} if k == "properties" else v if k in LITERAL else strict(v)
         for k, v in node.items()}
    if s.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if s.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    if s.get("x-kubernetes-embedded-resource"):
        s.setdefault("properties", {}).update(apiVersion={"type": "string"}, kind={"type": "string"},
                                              metadata=OBJECT_META)
    if s.get("type") == "object" and "additionalProperties" not in s \
            and not s.get("x-kubernetes-preserve-unknown-fields"):
        s["additionalProperties"] = False
    return s


def cel(validator, rules, instance, schema):
    """A document that reaches a CEL rule: not evaluated here, so not passed silently either."""
    yield jsonschema.ValidationError(f"sets a field with a CEL rule this test does not evaluate "
                                     f"({'; '.join(r['rule'] for r in rules)}): check it by hand")


FORMATS = jsonschema.FormatChecker()
FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -2**31 <= v < 2**31)
FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -2**63 <= v < 2**63)
Validator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"x-kubernetes-validations": cel})


@functools.cache
def crd_schemas() -> dict:
    """(apiVersion, kind) -> the strict schema of every served version of every vendored CRD."""
    out = {}
    for f in sorted(CRDS.glob("ray.io_*.yaml")):
        crd = yaml.load(f.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if v["served"]:
                s = strict(v["schema"]["openAPIV3Schema"])
                s["properties"]["metadata"] = OBJECT_META
                out[(f"{group}/{v['name']}", kind)] = s
    return out


def pod_template() -> dict:
    """core/v1 PodTemplateSpec, as the RayCluster CRD embeds it for its head."""
    s = crd_schemas()[("ray.io/v1", "RayCluster")]
    return s["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]


def obj(props: dict, required: tuple = ()) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": props, **({"required": list(required)}
                                                                                     if required else {})}


INT, STR, BOOL = {"type": "integer"}, {"type": "string"}, {"type": "boolean"}


def builtin() -> dict:
    """(apiVersion, kind) -> the fields of the built-in kinds used here, from the Kubernetes API
    reference (v1.31): the top level and a CronJob's spec down to its pod template."""
    top = {"apiVersion": STR, "kind": STR, "metadata": OBJECT_META}
    rule = obj({"apiGroups": {"type": "array", "items": STR}, "resources": {"type": "array", "items": STR},
                "verbs": {"type": "array", "items": STR}, "resourceNames": {"type": "array", "items": STR},
                "nonResourceURLs": {"type": "array", "items": STR}}, ("verbs",))
    ints = dict.fromkeys(("parallelism", "completions", "activeDeadlineSeconds", "backoffLimit",
                          "backoffLimitPerIndex", "maxFailedIndexes", "ttlSecondsAfterFinished"), INT)
    job = obj({"template": pod_template(), **ints, "suspend": BOOL, "manualSelector": BOOL,
        "completionMode": {"enum": ["NonIndexed", "Indexed"]}, "selector": {"type": "object"},
        "podFailurePolicy": {"type": "object"}, "successPolicy": {"type": "object"},
        "podReplacementPolicy": {"enum": ["TerminatingOrFailed", "Failed"]}, "managedBy": STR}, ("template",))
    cron = obj({"schedule": STR, "timeZone": STR, "startingDeadlineSeconds": INT, "suspend": BOOL,
                "concurrencyPolicy": {"enum": ["Allow", "Forbid", "Replace"]},
                "successfulJobsHistoryLimit": INT, "failedJobsHistoryLimit": INT,
                "jobTemplate": obj({"metadata": OBJECT_META, "spec": job}, ("spec",))}, ("schedule", "jobTemplate"))
    return {
        ("v1", "ServiceAccount"): obj({**top, "automountServiceAccountToken": BOOL,
                                       "secrets": {"type": "array"}, "imagePullSecrets": {"type": "array"}}),
        ("v1", "ConfigMap"): obj({**top, "immutable": BOOL, "data": {"type": "object", "additionalProperties": STR},
                                  "binaryData": {"type": "object", "additionalProperties": STR}}),
        ("rbac.authorization.k8s.io/v1", "Role"): obj({**top, "rules": {"type": "array", "items": rule}}),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"): obj(
            {**top, "subjects": {"type": "array", "items": obj({"kind": STR, "name": STR, "namespace": STR,
                                                                "apiGroup": STR}, ("kind", "name"))},
             "roleRef": obj({"apiGroup": STR, "kind": STR, "name": STR}, ("apiGroup", "kind", "name"))},
            ("roleRef",)),
        ("batch/v1", "CronJob"): obj({**top, "spec": cron}, ("spec",)),
    }


def schema_of(doc: dict) -> dict:
    key = (doc.get("apiVersion"), doc.get("kind"))
    s = crd_schemas().get(key) or builtin().get(key)
    if s is None:
        raise AssertionError(f"apiVersion {key[0]} kind {key[1]}: neither a KubeRay CRD version served "
                             f"by tests/kuberay-crds/ nor a built-in kind these manifests may use")
    return s


def problems(doc: dict) -> list[str]:
    """Every way doc fails its schema, one line each: the field's path and what is wrong."""
    try:
        s = schema_of(doc)
    except AssertionError as e:
        return [str(e)]
    errs = Validator(s, format_checker=FORMATS).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:300]}" for e in errs)


DOCS = manifests()


@pytest.mark.parametrize("where,doc", DOCS, ids=[f"{w}:{d['kind']}:{i}" for i, (w, d) in enumerate(DOCS)])
def test_every_manifest_validates_against_its_schema(where, doc):
    assert not (p := problems(doc)), f"cluster/kuberay/{where} {doc['kind']}: " + "; ".join(p)


def test_every_kuberay_kind_is_checked_against_a_crd():
    """Each KubeRay kind used is one the vendored CRDs serve, at the version they store (v1)."""
    used = {(d["apiVersion"], d["kind"]) for _, d in DOCS if d["apiVersion"].startswith("ray.io/")}
    assert used == {("ray.io/v1", k) for k in ("RayCluster", "RayJob", "RayCronJob", "RayService")}
    assert used <= set(crd_schemas())


def _set(doc: dict, path: str, value) -> dict:
    """doc with the value at a /-separated path (ints index lists); value DELETE removes the key."""
    d = copy.deepcopy(doc)
    *head, last = [int(p) if p.isdigit() else p for p in path.split("/")]
    node = functools.reduce(lambda n, p: n[p], head, d)
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return d


DELETE = object()
BAD = [  # (kind, a change to the manifest's document, what the error names)
    ("RayJob", ("spec/shutdownAfterJobFinish", True), "'shutdownAfterJobFinish' was unexpected"),
    ("RayJob", ("spec/rayClusterSpec/workerGroupSpecs/0/replicas", "two"), "'two' is not of type 'integer'"),
    ("RayJob", ("spec/rayClusterSpec/workerGroupSpecs/0/maxReplicas", 2**31), "is not a 'int32'"),
    ("RayService", ("spec/rayClusterConfig/headGroupSpec/rayStartParams/num-cpus", 0), "0 is not of type 'string'"),
    ("RayCluster", ("spec/headGroupSpec/template/spec/containers/0/resource", {}), "'resource' was unexpected"),
    ("RayCluster", ("spec/headGroupSpec/template/spec/containers/0/resources/limits/memory", "16 GB"),
     "does not match"),
    ("RayCluster", ("metadata/label", {"a": "b"}), "'label' was unexpected"),
    ("RayCluster", ("spec/managedBy", "me"), "CEL rule"),
    ("RayCronJob", ("spec/jobTemplate/entrypoint", ["python"]), "is not of type 'string'"),
    ("RayCronJob", ("apiVersion", "ray.io/v1alpha1"), "neither a KubeRay CRD"),
    ("CronJob", ("spec/concurrencyPolicy", "Never"), "is not one of"),
    ("CronJob", ("spec/jobTemplate/spec/template/spec/containers/0/comand", []), "'comand' was unexpected"),
    ("CronJob", ("apiVersion", "batch/v1beta1"), "neither a KubeRay CRD"),
    ("RoleBinding", ("roleRef", DELETE), "'roleRef' is a required property"),
    ("ConfigMap", ("data/rayjob.yaml", None), "None is not of type 'string'"),
]


def _doc(kind: str) -> dict:
    return next(d for _, d in DOCS if d["kind"] == kind)


@pytest.mark.parametrize("kind,change,match", BAD, ids=[f"{k}:{c[0]}" for k, c, _ in BAD])
def test_a_broken_document_is_refused(kind, change, match):
    got = problems(_set(_doc(kind), *change))
    assert any(match in p for p in got), got


@pytest.mark.parametrize("kind,change", [
    ("RayCluster", ("spec/headGroupSpec/template/spec/containers/0/resources/limits/cpu", 4)),   # int-or-string
    ("RayCluster", ("spec/headGroupSpec/template/spec/containers/0/resources/limits/cpu", "500m")),
    ("RayCluster", ("spec/headGroupSpec/template/spec/containers/0/ports/0/containerPort", 6380)),
])
def test_what_kubernetes_accepts_is_accepted(kind, change):
    assert problems(_set(_doc(kind), *change)) == []

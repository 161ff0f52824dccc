"""KubeRay manifests (cluster/kuberay/) against the vendored KubeRay CRDs (tests/data/kuberay/, see its README), plus
the rules the schema cannot express: non-root pods, resource requests and limits on every container, the GPU group,
the shared run volume, no secrets, and a RayJob whose entrypoint names files that exist in this repository.

The CRDs' OpenAPI v3 schemas are checked with jsonschema, made as strict as ``kubectl apply`` (which rejects unknown
fields): every object schema that lists its properties gets ``additionalProperties: false``. Kubernetes extensions
that jsonschema ignores are handled here: ``x-kubernetes-int-or-string`` becomes integer-or-string (quantities keep
their pattern, which applies to strings), and ``x-kubernetes-list-type: map`` / ``set`` lists are checked for
duplicate keys. Not evaluated: the CRDs' CEL rules (``x-kubernetes-validations``, on fields these manifests leave
out) and the core API server's own Pod validation beyond the checks below. Each check is shown to fail on a
mutated copy of the manifest, so a passing run means something. No network: everything is read from the repo.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from raydora.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "tests" / "data" / "kuberay"
KUBERAY = ROOT / "cluster" / "kuberay"
SHARED_MOUNT = "/mnt/raydora"
GPU = "nvidia.com/gpu"
MANIFESTS = {"RayCluster": KUBERAY / "raycluster.yaml", "RayJob": KUBERAY / "rayjob.yaml"}
CRD_FILES = {"RayCluster": CRDS / "ray.io_rayclusters.yaml", "RayJob": CRDS / "ray.io_rayjobs.yaml"}
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB of YAML


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)


def manifest(kind: str) -> dict[str, Any]:
    return copy.deepcopy(_manifest(kind))


@functools.cache
def _manifest(kind: str) -> dict[str, Any]:
    return load_yaml(MANIFESTS[kind])


# ---- schema -------------------------------------------------------------------------------------------------------
def strict(schema: Any) -> Any:
    """A copy of a Kubernetes structural schema that jsonschema checks the way the API server does (see above)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd(kind: str) -> tuple[dict[str, Any], Any]:
    """(the v1 openAPIV3Schema, made strict; a Draft 7 validator for it) of the vendored CRD for ``kind``."""
    doc = load_yaml(CRD_FILES[kind])
    assert doc["kind"] == "CustomResourceDefinition" and doc["spec"]["names"]["kind"] == kind
    assert doc["spec"]["group"] == "ray.io"
    (version,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"], "ray.io/v1 must be the served storage version"
    schema = strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return schema, jsonschema.Draft7Validator(schema)


def list_problems(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    """Duplicate keys in ``x-kubernetes-list-type: map`` lists (container, port, env, volume names...) and duplicate
    items in ``set`` lists, anywhere in ``value``."""
    out: list[str] = []
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, sub in value.items():
            sub_schema = props.get(key, extra if isinstance(extra, dict) else None)
            if sub_schema:
                out += list_problems(sub_schema, sub, f"{path}.{key}")
    elif isinstance(value, list):
        items = schema.get("items", {})
        kind = schema.get("x-kubernetes-list-type")
        if kind == "map":
            names = schema.get("x-kubernetes-list-map-keys", [])
            defaults = {k: items.get("properties", {}).get(k, {}).get("default") for k in names}
            keys = [tuple(v.get(k, defaults[k]) for k in names) for v in value if isinstance(v, dict)]
            dups = sorted({k for k in keys if keys.count(k) > 1}, key=str)
            if dups:
                out.append(f"{path}: duplicate {'/'.join(names)} {dups}")
        elif kind == "set":
            seen = [json.dumps(v, sort_keys=True) for v in value]
            if len(set(seen)) != len(seen):
                out.append(f"{path}: duplicate items in a set")
        for i, v in enumerate(value):
            out += list_problems(items, v, f"{path}[{i}]")
    return out


def schema_errors(doc: dict[str, Any], kind: str) -> list[str]:
    schema, validator = crd(kind)
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion: {doc.get('apiVersion')!r}, expected 'ray.io/v1'")
    if doc.get("kind") != kind:
        errors.append(f"kind: {doc.get('kind')!r}, expected {kind!r}")
    name = (doc.get("metadata") or {}).get("name", "")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", str(name)):
        errors.append(f"metadata.name: {name!r} is not a DNS-1035 label")
    return errors + list_problems(schema, doc, "")


# ---- pod templates ------------------------------------------------------------------------------------------------
def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def ray_pods(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{group: pod template} of the Ray nodes: ``head`` and each worker group."""
    spec = cluster_spec(doc)
    pods = {"head": spec["headGroupSpec"]["template"]}
    pods.update({g["groupName"]: g["template"] for g in spec.get("workerGroupSpecs", [])})
    return pods


def all_pods(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The Ray nodes' pod templates plus the RayJob's submitter pod."""
    pods = ray_pods(doc)
    if doc["kind"] == "RayJob":
        pods["submitter"] = doc["spec"]["submitterPodTemplate"]
    return pods


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity ("500m", "32Gi", 8) as a number."""
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
    units |= {"n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix) and text[: -len(suffix)]:
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def security_problems(doc: dict[str, Any]) -> list[str]:
    out = []
    for group, pod in all_pods(doc).items():
        spec = pod["spec"]
        psc = spec.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            out.append(f"{group}: pod securityContext.runAsNonRoot is not true")
        if psc.get("runAsUser", 0) == 0:
            out.append(f"{group}: pod securityContext.runAsUser is missing or 0 (root)")
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            out.append(f"{group}: shares a host namespace")
        if spec.get("automountServiceAccountToken") is not False:
            out.append(f"{group}: mounts a Kubernetes API token (automountServiceAccountToken is not false)")
        for c in containers(pod):
            sc = c.get("securityContext") or {}
            where = f"{group}/{c['name']}"
            if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
                out.append(f"{where}: runAsNonRoot is not true")
            if sc.get("runAsUser", psc.get("runAsUser", 0)) == 0:
                out.append(f"{where}: runs as uid 0")
            if sc.get("privileged"):
                out.append(f"{where}: privileged")
            if sc.get("allowPrivilegeEscalation") is not False:
                out.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in (sc.get("capabilities") or {}).get("drop", []):
                out.append(f"{where}: capabilities.drop lacks ALL")
            if (sc.get("capabilities") or {}).get("add"):
                out.append(f"{where}: adds capabilities")
    return out


def resource_problems(doc: dict[str, Any]) -> list[str]:
    out = []
    for group, pod in all_pods(doc).items():
        for c in containers(pod):
            where = f"{group}/{c['name']}"
            res = c.get("resources") or {}
            requests, limits = res.get("requests") or {}, res.get("limits") or {}
            for key in ("cpu", "memory"):
                if key not in requests or key not in limits:
                    out.append(f"{where}: resources.requests and resources.limits must both set {key}")
                elif quantity(requests[key]) > quantity(limits[key]):
                    out.append(f"{where}: {key} request {requests[key]} exceeds its limit {limits[key]}")
            if GPU in requests or GPU in limits:  # extended resources: the request must equal the limit
                if quantity(requests.get(GPU, 0)) != quantity(limits.get(GPU, 0)):
                    out.append(f"{where}: {GPU} request and limit differ")
            if not c.get("image"):
                out.append(f"{where}: no image")
    return out


def volume_problems(doc: dict[str, Any], claim: str) -> list[str]:
    """Every Ray pod mounts the shared claim at SHARED_MOUNT and a memory-backed /dev/shm; mounts name volumes."""
    out = []
    for group, pod in all_pods(doc).items():
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for c in containers(pod):
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    out.append(f"{group}/{c['name']}: volumeMount {m['name']!r} names no volume of the pod")
        if group == "submitter":
            continue
        ray = pod["spec"]["containers"][0]  # KubeRay runs Ray in a pod template's first container
        mounts = {m["mountPath"]: volumes.get(m["name"], {}) for m in ray.get("volumeMounts", [])}
        if (mounts.get(SHARED_MOUNT, {}).get("persistentVolumeClaim") or {}).get("claimName") != claim:
            out.append(f"{group}: {SHARED_MOUNT} is not the shared claim {claim!r}")
        shm = mounts.get("/dev/shm", {}).get("emptyDir") or {}
        if shm.get("medium") != "Memory":
            out.append(f"{group}: /dev/shm is not a memory-backed emptyDir")
        elif "sizeLimit" in shm and quantity(shm["sizeLimit"]) > quantity(ray["resources"]["limits"]["memory"]):
            out.append(f"{group}: /dev/shm sizeLimit exceeds the container's memory limit")
    return out


SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret variable": r"AWS_SECRET|aws_secret_access_key|AWS_SESSION_TOKEN",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "credential assignment": r"(?i)\b(password|passwd|secret|token|api[_-]?key|access[_-]?key)\s*[:=]\s*\S",
    "token literal": r"\b(ghp_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|hf_[A-Za-z0-9]{20,}|xox[abprs]-[A-Za-z0-9-]+)",
}


def secret_findings(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if re.search(pattern, text)]


def secret_refs(node: Any, path: str = "") -> list[str]:
    """Kubernetes references to Secrets (env secretKeyRef, envFrom secretRef, secret volumes, kind: Secret)."""
    out = []
    if isinstance(node, dict):
        if node.get("kind") == "Secret":
            out.append(f"{path}: kind Secret")
        for key, value in node.items():
            if key in ("secretKeyRef", "secretRef", "secret", "imagePullSecrets"):
                out.append(f"{path}.{key}")
            out += secret_refs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += secret_refs(value, f"{path}[{i}]")
    return out


def gpu_groups(doc: dict[str, Any]) -> dict[str, float]:
    """{worker group: GPUs per pod} for the groups whose Ray container asks for GPUs."""
    out = {}
    for group in cluster_spec(doc).get("workerGroupSpecs", []):
        for c in group["template"]["spec"]["containers"]:
            if GPU in (c.get("resources") or {}).get("limits", {}):
                out[group["groupName"]] = quantity(c["resources"]["limits"][GPU])
    return out


def quantity_schema() -> dict[str, Any]:
    """The CRD's schema of a resource quantity (integer, or a string matching Kubernetes' quantity pattern)."""
    spec = crd("RayCluster")[0]["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
    container = spec["properties"]["spec"]["properties"]["containers"]["items"]
    schema: dict[str, Any] = container["properties"]["resources"]["properties"]["limits"]["additionalProperties"]
    assert schema["x-kubernetes-int-or-string"] and "pattern" in schema
    return schema


def pvc() -> dict[str, Any]:
    return load_yaml(KUBERAY / "pvc.yaml")


# ---- the manifests pass ----------------------------------------------------------------------------------------
def test_vendored_crds_are_the_recorded_release() -> None:
    """The CRD files are byte for byte the ones tests/data/kuberay/README.md names (release, commit, sha256)."""
    readme = (CRDS / "README.md").read_text(encoding="utf-8")
    recorded = {name: digest for digest, name in re.findall(r"`([0-9a-f]{64})\s+(\S+\.yaml)`", readme)}
    actual = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in CRD_FILES.values()}
    assert recorded == actual


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_matches_the_kuberay_crd(kind: str) -> None:
    assert schema_errors(manifest(kind), kind) == []


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_every_pod_runs_as_non_root_without_privileges(kind: str) -> None:
    doc = manifest(kind)
    assert set(ray_pods(doc)) >= {"head", "gpu-workers", "cpu-workers"}
    assert security_problems(doc) == []


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_every_container_has_requests_and_limits(kind: str) -> None:
    assert resource_problems(manifest(kind)) == []


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_cpu_head_gpu_group_and_cpu_group(kind: str) -> None:
    doc = manifest(kind)
    spec = cluster_spec(doc)
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the head runs no tasks"
    assert all(GPU not in (c.get("resources") or {}).get("limits", {}) for c in containers(head["template"]))
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the dashboard must not leave the cluster"
    assert gpu_groups(doc) == {"gpu-workers": 8}
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]
    assert quantity(gpu["requests"][GPU]) == quantity(gpu["limits"][GPU]) == 8
    for name, group in groups.items():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
    assert groups["cpu-workers"]["replicas"] >= 1, "Ray Data stages need CPU workers (the head has num-cpus 0)"


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_shared_run_volume_and_shm_on_every_node(kind: str) -> None:
    claim = pvc()["metadata"]["name"]
    assert volume_problems(manifest(kind), claim) == []


def test_pvc_is_a_read_write_many_claim() -> None:
    schema = {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "v1"},
            "kind": {"const": "PersistentVolumeClaim"},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}},
            },
            "spec": {
                "type": "object",
                "required": ["accessModes", "resources"],
                "additionalProperties": False,
                "properties": {
                    "accessModes": {"type": "array", "contains": {"const": "ReadWriteMany"}},
                    "storageClassName": {"type": "string"},
                    "volumeMode": {"enum": ["Filesystem"]},
                    "resources": {
                        "type": "object",
                        "required": ["requests"],
                        "properties": {
                            "requests": {
                                "type": "object",
                                "required": ["storage"],
                                "properties": {"storage": quantity_schema()},
                            }
                        },
                    },
                },
            },
        },
    }
    doc = pvc()
    assert list(jsonschema.Draft7Validator(schema).iter_errors(doc)) == []
    broken = copy.deepcopy(doc)
    broken["spec"]["accessModes"] = ["ReadWriteOnce"]  # one node only: the other nodes could not read the run
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


def test_rayjob_runs_the_pipeline_and_cleans_up() -> None:
    spec = manifest("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def entrypoint() -> tuple[str, str, list[str]]:
    """(script, --config file, dotted overrides) of the RayJob's entrypoint."""
    argv = shlex.split(manifest("RayJob")["spec"]["entrypoint"])
    assert argv[0] in ("python", "python3"), argv
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    return argv[1], config, overrides


def test_rayjob_entrypoint_config_exists_and_loads_onto_the_shared_volume() -> None:
    _, config, overrides = entrypoint()
    assert config.startswith("jobs/configs/") and config.endswith(".yaml")
    assert (ROOT / config).is_file(), f"{config} (named by the RayJob's entrypoint) is not in the repository"
    cfg = load_config(ROOT / config, overrides)
    assert str(cfg.run_dir).startswith(SHARED_MOUNT + "/"), "runs must land on the shared volume"


def test_rayjob_entrypoint_script_exists() -> None:
    """Path existence only: the script runs inside the image, from the working_dir below."""
    script, _, _ = entrypoint()
    assert script == "jobs/pipeline.py"
    assert (ROOT / script).is_file(), f"{script} (named by the RayJob's entrypoint) is not in the repository"


def dockerfile() -> str:
    return (ROOT / "cluster" / "Dockerfile").read_text(encoding="utf-8")


def test_rayjob_working_dir_is_the_code_in_the_image() -> None:
    runtime_env = yaml.safe_load(manifest("RayJob")["spec"]["runtimeEnvYAML"])
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", dockerfile(), re.M)
    assert runtime_env["working_dir"] == f"local://{workdir}"
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)", dockerfile(), re.M)
    assert {"raydora/", "jobs/", "pyproject.toml"} <= set(copied), "the entrypoint's files must be in the image"


def test_dockerfile_pins_ray_and_torch_and_runs_as_non_root() -> None:
    text = dockerfile()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    version = manifest("RayCluster")["spec"]["rayVersion"]
    assert base.startswith(f"rayproject/ray:{version}-py311"), (base, version)
    (pip,) = [line for line in re.split(r"(?<!\\)\n", text) if re.match(r"RUN .*pip install", line)]
    assert '"torch==2.13.0"' in pip and '".[' in pip, "torch must be pinned in the same pip command as raydora"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "trust_remote_code" not in text


def test_rayjob_cluster_has_the_raycluster_shape() -> None:
    """The RayJob embeds the same cluster as raycluster.yaml; only the replica counts may differ."""

    def shape(spec: dict[str, Any]) -> dict[str, Any]:
        spec = copy.deepcopy(spec)
        for group in spec["workerGroupSpecs"]:
            group.pop("replicas")
        return spec

    assert shape(manifest("RayJob")["spec"]["rayClusterSpec"]) == shape(manifest("RayCluster")["spec"])
    images = {c["image"] for kind in MANIFESTS for p in all_pods(manifest(kind)).values() for c in containers(p)}
    assert len(images) == 1, f"one image everywhere (head, workers, submitter), got {images}"


def secret_scanned_files() -> list[Path]:
    files = [p for p in (ROOT / "cluster").rglob("*") if p.is_file()]
    return sorted(files + list((ROOT / "jobs" / "configs").glob("*.yaml")))


def test_no_secrets_in_cluster_files_or_presets() -> None:
    files = secret_scanned_files()
    assert KUBERAY / "raycluster.yaml" in files and KUBERAY / "rayjob.yaml" in files
    found = {str(p.relative_to(ROOT)): secret_findings(p.read_text(encoding="utf-8")) for p in files}
    assert {k: v for k, v in found.items() if v} == {}
    for path in [*MANIFESTS.values(), KUBERAY / "pvc.yaml"]:
        assert secret_refs(load_yaml(path)) == [], path


# ---- each check bites on a mutated copy ---------------------------------------------------------------------------
def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node: Any = doc
    *parents, leaf = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DELETE:
        del node[leaf]
    else:
        node[int(leaf) if isinstance(node, list) else leaf] = value
    return doc


_DELETE = object()
HEAD = "spec.headGroupSpec"
JOB_HEAD = "spec.rayClusterSpec.headGroupSpec"


@pytest.mark.parametrize(
    ("kind", "path", "value", "expected"),
    [
        ("RayCluster", HEAD, _DELETE, "'headGroupSpec' is a required property"),
        ("RayCluster", "spec.workerGroupSpecs.0.maxReplicas", _DELETE, "'maxReplicas' is a required property"),
        ("RayCluster", "spec.workerGroupSpecs.0.replicas", "two", "is not of type 'integer'"),
        ("RayCluster", f"{HEAD}.rayStartParams.num-cpus", 0, "is not of type 'string'"),
        ("RayCluster", f"{HEAD}.template.spec.containers.0.resources.limits.memory", "32GB", "does not match"),
        ("RayCluster", f"{HEAD}.template.spec.containers.0.name", _DELETE, "'name' is a required property"),
        ("RayCluster", f"{HEAD}.template.spec.containers.0.securityContext.runAsNonroot", True, "unexpected"),
        ("RayCluster", "spec.enableInTreeAutoscaler", True, "Additional properties are not allowed"),
        ("RayCluster", "apiVersion", "ray.io/v1alpha2", "expected 'ray.io/v1'"),
        ("RayJob", "spec.shutdownAfterJobFinish", True, "Additional properties are not allowed"),
        ("RayJob", "spec.ttlSecondsAfterFinished", "600", "is not of type 'integer'"),
        ("RayJob", "spec.runtimeEnvYAML", {"working_dir": "local:///home/ray/raydora"}, "is not of type 'string'"),
        ("RayJob", "spec.rayClusterSpec.workerGroupSpecs.1.groupName", _DELETE, "'groupName' is a required property"),
        ("RayJob", "spec.rayClusterSpec.autoscalerOptions", {"upscalingMode": "Fast"}, "is not one of"),
        ("RayJob", f"{JOB_HEAD}.template.spec.containers.0.resources.requests.cpu", "eight", "does not match"),
        ("RayJob", f"{JOB_HEAD}.template.spec.volumes.1.name", "shared", "duplicate name"),
        ("RayJob", f"{JOB_HEAD}.template.spec.containers.0.ports.1.containerPort", 6379, "duplicate containerPort"),
    ],
)
def test_schema_check_rejects_a_mutated_manifest(kind: str, path: str, value: Any, expected: str) -> None:
    doc = _set(manifest(kind), path, value)
    errors = schema_errors(doc, kind)
    assert errors, f"mutating {path} went unnoticed"
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (f"{HEAD}.template.spec.securityContext.runAsNonRoot", _DELETE, "head: pod securityContext.runAsNonRoot"),
        (f"{HEAD}.template.spec.securityContext.runAsUser", 0, "runAsUser is missing or 0"),
        ("spec.workerGroupSpecs.0.template.spec.containers.0.securityContext.runAsUser", 0, "runs as uid 0"),
        ("spec.workerGroupSpecs.1.template.spec.containers.0.securityContext.privileged", True, "privileged"),
        (f"{HEAD}.template.spec.containers.0.securityContext.allowPrivilegeEscalation", True, "allowPrivilegeEsc"),
        (f"{HEAD}.template.spec.containers.0.securityContext.capabilities.drop", ["NET_RAW"], "drop lacks ALL"),
        (f"{HEAD}.template.spec.automountServiceAccountToken", True, "Kubernetes API token"),
    ],
)
def test_security_check_rejects_a_mutated_manifest(path: str, value: Any, expected: str) -> None:
    problems = security_problems(_set(manifest("RayCluster"), path, value))
    assert any(expected in p for p in problems), problems


def test_submitter_pod_is_checked_too() -> None:
    doc = _set(manifest("RayJob"), "spec.submitterPodTemplate.spec.securityContext.runAsUser", 0)
    assert any(p.startswith("submitter:") for p in security_problems(doc))
    doc = _set(manifest("RayJob"), "spec.submitterPodTemplate.spec.containers.0.resources.limits", _DELETE)
    assert any(p.startswith("submitter/") for p in resource_problems(doc))


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.workerGroupSpecs.1.template.spec.containers.0.resources.limits", _DELETE, "must both set cpu"),
        (f"{HEAD}.template.spec.containers.0.resources.requests.memory", _DELETE, "must both set memory"),
        (f"{HEAD}.template.spec.containers.0.resources.requests.cpu", "9", "exceeds its limit"),
        ("spec.workerGroupSpecs.0.template.spec.containers.0.resources.requests.nvidia.com/gpu", "4", "differ"),
    ],
)
def test_resource_check_rejects_a_mutated_manifest(path: str, value: Any, expected: str) -> None:
    doc = manifest("RayCluster")
    if path.endswith(GPU):  # the key holds dots
        doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["requests"][GPU] = value
    else:
        _set(doc, path, value)
    problems = resource_problems(doc)
    assert any(expected in p for p in problems), problems


def test_gpu_group_and_volume_checks_bite() -> None:
    doc = manifest("RayCluster")
    for key in ("requests", "limits"):
        del doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][key][GPU]
    assert gpu_groups(doc) == {}
    claim = pvc()["metadata"]["name"]
    doc = _set(manifest("RayCluster"), "spec.workerGroupSpecs.1.template.spec.volumes.0.persistentVolumeClaim",
               {"claimName": "someone-elses"})  # fmt: skip
    assert volume_problems(doc, claim) == [f"cpu-workers: {SHARED_MOUNT} is not the shared claim {claim!r}"]
    doc = _set(manifest("RayCluster"), f"{HEAD}.template.spec.containers.0.volumeMounts.0.mountPath", "/data")
    assert volume_problems(doc, claim) == [f"head: {SHARED_MOUNT} is not the shared claim {claim!r}"]
    doc = _set(manifest("RayCluster"), f"{HEAD}.template.spec.volumes.1.emptyDir", {})
    assert volume_problems(doc, claim) == ["head: /dev/shm is not a memory-backed emptyDir"]
    doc = _set(manifest("RayCluster"), f"{HEAD}.template.spec.containers.0.volumeMounts.1.name", "scratch")
    assert any("names no volume" in p for p in volume_problems(doc, claim))


@pytest.mark.parametrize(
    "leak",
    [
        "AWS_SECRET_ACCESS_KEY=abc",
        "aws_access_key_id: AKIAABCDEFGHIJKLMNOP",
        "password: hunter2",
        "token: 0123456789abcdef",
        "-----BEGIN RSA PRIVATE KEY-----",
        "hf_abcdefghijklmnopqrstuvwxyz0123",
    ],
)
def test_secret_scan_flags_a_planted_credential(leak: str) -> None:
    text = (KUBERAY / "rayjob.yaml").read_text(encoding="utf-8")
    assert secret_findings(text) == []
    assert secret_findings(text + f"\n# {leak}\n")


def test_secret_reference_check_flags_secret_use() -> None:
    doc = manifest("RayCluster")
    env = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "AWS_KEY", "valueFrom": {"secretKeyRef": {"name": "aws", "key": "id"}}})
    assert secret_refs(doc) == [".spec.headGroupSpec.template.spec.containers[0].env[2].valueFrom.secretKeyRef"]

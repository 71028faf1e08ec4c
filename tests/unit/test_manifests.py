"""The cluster manifests in deploy/ and the Dockerfile, checked without a cluster: every field is one
KubeRay / Kubernetes knows (a schema of the fields used, from KubeRay's ray.io/v1 CRDs), every genseg
command they run parses, every config file they name exists in the image, the Serve config validates
against Ray Serve's own schema and genseg's AppOptions, and the names that tie the files together
(image, Ray version, volume claim, MLflow service, GPU groups) agree."""
import importlib
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
IMAGE_ROOT = "/home/ray/genseg/"          # the Dockerfile's WORKDIR: the source tree in the image
ANY = None

# ---- the fields used, by KubeRay's ray.io/v1 CRD names (RayJob, RayService, RayCluster) and core/v1
RESOURCES = {"requests": ANY, "limits": ANY}
CONTAINER = {"name": str, "image": str, "command": [str], "args": [str], "resources": RESOURCES,
             "ports": [{"containerPort": int, "name": str, "protocol": str}],
             "env": [{"name": str, "value": str, "valueFrom": {"secretKeyRef": {"name": str, "key": str}}}],
             "volumeMounts": [{"mountPath": str, "name": str, "readOnly": bool}],
             "readinessProbe": {"httpGet": {"path": str, "port": int}, "periodSeconds": int},
             "livenessProbe": {"httpGet": {"path": str, "port": int}, "periodSeconds": int}}
VOLUME = {"name": str, "persistentVolumeClaim": {"claimName": str}, "emptyDir": {"medium": str, "sizeLimit": str}}
POD_TEMPLATE = {"metadata": {"labels": ANY, "annotations": ANY},
                "spec": {"containers": [CONTAINER], "volumes": [VOLUME], "nodeSelector": ANY, "affinity": ANY,
                         "restartPolicy": str,
                         "tolerations": [{"key": str, "operator": str, "value": str, "effect": str}]}}
HEAD_GROUP = {"rayStartParams": ANY, "template": POD_TEMPLATE, "serviceType": str}
WORKER_GROUP = {"groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int, "rayStartParams": ANY,
                "template": POD_TEMPLATE, "suspend": bool}
RAY_CLUSTER_SPEC = {"rayVersion": str, "enableInTreeAutoscaling": bool,
                    "autoscalerOptions": {"idleTimeoutSeconds": int, "upscalingMode": str, "resources": RESOURCES},
                    "headGroupSpec": HEAD_GROUP, "workerGroupSpecs": [WORKER_GROUP]}
META = {"name": str, "namespace": str, "labels": ANY, "annotations": ANY, "generateName": str}
SCHEMAS = {
    ("ray.io/v1", "RayJob"): {"apiVersion": str, "kind": str, "metadata": META, "spec": {
        "entrypoint": str, "runtimeEnvYAML": str, "shutdownAfterJobFinishes": bool, "ttlSecondsAfterFinished": int,
        "activeDeadlineSeconds": int, "backoffLimit": int, "submissionMode": str, "entrypointNumCpus": ANY,
        "entrypointNumGpus": ANY, "suspend": bool, "clusterSelector": ANY, "submitterPodTemplate": POD_TEMPLATE,
        "rayClusterSpec": RAY_CLUSTER_SPEC}},
    ("ray.io/v1", "RayService"): {"apiVersion": str, "kind": str, "metadata": META, "spec": {
        "serveConfigV2": str, "serviceUnhealthySecondThreshold": int, "deploymentUnhealthySecondThreshold": int,
        "excludeHeadPodFromServeSvc": bool, "upgradeStrategy": ANY, "rayClusterConfig": RAY_CLUSTER_SPEC}},
    ("v1", "PersistentVolumeClaim"): {"apiVersion": str, "kind": str, "metadata": META, "spec": {
        "accessModes": [str], "storageClassName": str, "resources": RESOURCES}},
    ("apps/v1", "Deployment"): {"apiVersion": str, "kind": str, "metadata": META, "spec": {
        "replicas": int, "selector": {"matchLabels": ANY}, "template": POD_TEMPLATE}},
    ("v1", "Service"): {"apiVersion": str, "kind": str, "metadata": META, "spec": {
        "selector": ANY, "type": str,
        "ports": [{"port": int, "targetPort": ANY, "name": str, "protocol": str}]}},
}


def check(obj, schema, path="") -> list[str]:
    """Fields of ``obj`` that ``schema`` does not have, or of the wrong kind."""
    if schema is ANY:
        return []
    if isinstance(schema, dict):
        if not isinstance(obj, dict):
            return [f"{path}: expected a mapping"]
        errs = [f"{path}.{k}: not a field here" for k in obj if k not in schema]
        return errs + [e for k, v in obj.items() if k in schema for e in check(v, schema[k], f"{path}.{k}")]
    if isinstance(schema, list):
        if not isinstance(obj, list):
            return [f"{path}: expected a list"]
        return [e for i, v in enumerate(obj) for e in check(v, schema[0], f"{path}[{i}]")]
    return [] if isinstance(obj, schema) else [f"{path}: expected {schema.__name__}, got {type(obj).__name__}"]


def documents() -> list[tuple[str, dict]]:
    files = sorted((ROOT / "deploy").glob("*.yaml"))
    assert files, "deploy/ has no manifests"
    return [(f.name, d) for f in files for d in yaml.safe_load_all(f.read_text()) if d]


def by_kind(kind: str) -> list[tuple[str, dict]]:
    return [(n, d) for n, d in documents() if d["kind"] == kind]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]


def containers(doc: dict) -> list[dict]:
    if doc["kind"] in ("RayJob", "RayService"):
        spec = cluster_spec(doc)
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    else:
        templates = [doc["spec"]["template"]] if "template" in doc["spec"] else []
    return [c for t in templates for c in t["spec"]["containers"]]


def test_every_field_is_a_kuberay_or_kubernetes_field():
    for name, doc in documents():
        schema = SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        assert schema is not None, f"{name}: {doc['apiVersion']} {doc['kind']} is not a kind these tests know"
        assert check(doc, schema, f"{name}:{doc['kind']}") == []
    # the checker itself catches a misspelt field (e.g. KubeRay's `workerGroupSpecs` as `workerGroups`)
    assert check({"spec": {"workerGroups": []}}, {"spec": {"workerGroupSpecs": [WORKER_GROUP]}})


def test_ray_version_image_and_dockerfile_agree():
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)", dockerfile, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py311"), base
    assert re.search(r"^FROM \$\{BASE\}", dockerfile, re.M)
    pinned = (ROOT / "pyproject.toml").read_text()
    assert f"ray[data,train,tune,serve,default]=={ray.__version__}" in pinned
    for name, doc in documents():
        if doc["kind"] in ("RayJob", "RayService"):
            assert cluster_spec(doc)["rayVersion"] == ray.__version__, name
        for c in containers(doc):
            assert re.fullmatch(r"genseg:0\.1\.0(-gpu)?", c["image"]), (name, c["image"])
    # what the Dockerfile copies is what the manifests run from
    for copied in re.findall(r"^COPY \S+ (\S+) \./", dockerfile, re.M):
        assert (ROOT / copied).exists(), copied


def _commands(entrypoint: str) -> list[list[str]]:
    return [shlex.split(part) for part in entrypoint.split("&&")]


def test_every_job_command_parses_and_names_files_that_exist():
    from jobs.cli import build_parser

    parser = build_parser()
    seen = 0
    for name, doc in by_kind("RayJob"):
        for argv in _commands(doc["spec"]["entrypoint"]):
            assert argv[0] == "genseg", (name, argv)
            args = parser.parse_args(argv[1:])       # exits on any flag genseg does not have
            seen += 1
            for flag in ("config", "space"):
                path = getattr(args, flag, None)
                if path:
                    assert path.startswith(IMAGE_ROOT), (name, path)
                    assert (ROOT / path[len(IMAGE_ROOT):]).is_file(), (name, path)
            # run data and outputs live on the shared volume, tracking goes to the MLflow service
            for flag in ("data", "out", "workdir", "root"):
                if getattr(args, flag, None):
                    assert getattr(args, flag).startswith("/mnt/shared/"), (name, flag, getattr(args, flag))
            assert args.tracking_uri == "http://genseg-mlflow:5000", (name, argv)
    assert seen >= 3


def test_names_that_tie_the_files_together():
    (_, pvc), = by_kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    (_, svc), = by_kind("Service")
    (_, mlflow), = by_kind("Deployment")
    assert svc["metadata"]["name"] == "genseg-mlflow" and svc["spec"]["ports"][0]["port"] == 5000
    assert svc["spec"]["selector"] == mlflow["spec"]["template"]["metadata"]["labels"]
    for name, doc in documents():
        for c in containers(doc):
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            assert mounts.get("shared") == "/mnt/shared", (name, c["name"])
        for t in ([cluster_spec(doc)["headGroupSpec"]["template"]] + [g["template"] for g in
                  cluster_spec(doc)["workerGroupSpecs"]] if doc["kind"] in ("RayJob", "RayService") else []):
            claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in t["spec"]["volumes"]}
            assert claims["shared"] == pvc["metadata"]["name"], name
    for name, doc in by_kind("RayJob") + by_kind("RayService"):
        for g in cluster_spec(doc)["workerGroupSpecs"]:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (name, g["groupName"])


def test_the_rayservice_serve_config_is_one_serve_and_genseg_accept():
    from ray.serve.schema import ServeDeploySchema

    from serve_app.app import DEPLOYMENTS
    from serve_app.options import AppOptions

    (name, doc), = by_kind("RayService")
    cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.parse_obj(cfg)                        # Ray Serve's own validation
    gpu_groups = [g for g in cluster_spec(doc)["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    for app in cfg["applications"]:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        opts = AppOptions.from_dict(app["args"])            # refuses unknown or mistyped fields
        assert opts.tracking_uri == "http://genseg-mlflow:5000"
        for d in app["deployments"]:
            assert d["name"] in DEPLOYMENTS, d["name"]
            if d.get("ray_actor_options", {}).get("num_gpus"):
                assert gpu_groups, f"{d['name']} asks for a GPU and no worker group has one"
    # the same application as `genseg serve` and serve_app/config.yaml: same deployments
    local = yaml.safe_load((ROOT / "serve_app" / "config.yaml").read_text())
    assert [d["name"] for d in local["applications"][0]["deployments"]] == \
        [d["name"] for d in cfg["applications"][0]["deployments"]]

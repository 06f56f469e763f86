"""cluster/ manifests: valid against the pinned KubeRay CRDs, the operator's own rules and
yamllint; and every check catches a mistake planted in a copy."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRDS = CLUSTER / "crds" / "v1.7.0"  # vendored: every clone has them

spec = importlib.util.spec_from_file_location("cluster_validate", CLUSTER / "validate.py")
validate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(validate)


@pytest.fixture(scope="module")
def schemas():
    return validate.load_schemas(CRDS)


def manifests() -> list[Path]:
    files = sorted(CLUSTER.glob("*.yaml"))
    assert {f.name for f in files} >= {
        "rayjob-gpu.yaml",
        "raycluster-gpu.yaml",
        "raycluster-cpu.yaml",
    }
    return files


def test_every_shipped_manifest_is_valid(schemas):
    for path in manifests():
        assert validate.validate_file(path, schemas) == [], path


def test_gpu_rayjob_has_the_operational_settings():
    job = yaml.safe_load((CLUSTER / "rayjob-gpu.yaml").read_text())
    s = job["spec"]
    assert s["submissionMode"] == "HTTPMode" and s["backoffLimit"] == 0
    assert s["shutdownAfterJobFinishes"] is True and s["ttlSecondsAfterFinished"] > 0
    cluster = s["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["serviceType"] == "ClusterIP"
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    res = worker["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    assert any(t["key"] == "nvidia.com/gpu" for t in worker["tolerations"])
    volumes = {v["name"]: v for v in worker["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["models"]["persistentVolumeClaim"]["readOnly"] is True
    mounts = {m["name"]: m for m in worker["containers"][0]["volumeMounts"]}
    assert mounts["models"]["readOnly"] is True and "checkpoints" in mounts
    for pod in (head["template"]["spec"], worker):
        assert pod["securityContext"]["runAsNonRoot"] is True


def _workers(doc):
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]


MISTAKES = {
    "misspelled top-level key": (
        lambda d: d["spec"].update(shutdownAfterJobFinish=True),
        "shutdownAfterJobFinish",
    ),
    "misspelled pod field": (
        lambda d: _workers(d)[0]["template"]["spec"]["containers"][0].update(resouces={}),
        "resouces",
    ),
    "wrong type": (lambda d: d["spec"].update(backoffLimit="zero"), "backoffLimit"),
    "bad enum": (lambda d: d["spec"].update(submissionMode="HttpMode"), "submissionMode"),
    "name over 47 characters": (lambda d: d["metadata"].update(name="e" * 48), "at most 47"),
    "ttl without shutdown": (
        lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
        "ttlSecondsAfterFinished",
    ),
    "non-string rayStartParams": (
        lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update(
            {"num-cpus": 0}
        ),
        "must be a string",
    ),
    "missing groupName": (lambda d: _workers(d)[0].pop("groupName"), "groupName"),
    "replicas outside min..max": (
        lambda d: _workers(d)[0].update(minReplicas=2, maxReplicas=3),
        "minReplicas <= replicas",
    ),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_each_planted_mistake_is_caught(schemas, tmp_path, mistake):
    plant, words = MISTAKES[mistake]
    doc = copy.deepcopy(yaml.safe_load((CLUSTER / "rayjob-gpu.yaml").read_text()))
    plant(doc)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    problems = validate.validate_file(path, schemas)
    assert any(words in p for p in problems), problems


def test_duplicate_key_is_caught_by_yamllint(schemas, tmp_path):
    text = (CLUSTER / "raycluster-cpu.yaml").read_text()
    path = tmp_path / "dup.yaml"
    path.write_text(
        text.replace(
            '  rayVersion: "2.60.0"\n', '  rayVersion: "2.60.0"\n  rayVersion: "2.9.0"\n', 1
        )
    )
    problems = validate.validate_file(path, schemas)
    assert any("duplication of key" in p for p in problems), problems


def test_command_line_reports_and_fails(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: x}\nspec: {nope: 1}\n")
    assert validate.main([str(bad)]) == 1
    assert "nope" in capsys.readouterr().out


def test_teacher_rayservice_serves_the_package_app_behind_a_token():
    """cluster/rayservice-teacher.yaml: the application is eopd_ray.serving.app:build_app with
    arguments the app accepts and a job config that exists; every pod that can host a replica
    has the token from a Secret (the proxy listens on 0.0.0.0 there)."""
    from eopd_ray.serving.app import ServeSettings

    doc = yaml.safe_load((CLUSTER / "rayservice-teacher.yaml").read_text())
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "eopd_ray.serving.app:build_app"
    settings = ServeSettings.from_args(app["args"])
    assert (REPO / settings.config).is_file()
    assert settings.min_replicas <= settings.max_replicas
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        env = {e["name"]: e for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert env[settings.token_env]["valueFrom"]["secretKeyRef"]["name"]


SERVICE_MISTAKES = {
    "misspelled RayService key": (
        lambda d: d["spec"].update(serviceUnhealthySecondThresold=900),
        "serviceUnhealthySecondThresold",
    ),
    "serve config not YAML": (lambda d: d["spec"].update(serveConfigV2="a: [b"), "not YAML"),
    "application without import path": (
        lambda d: d["spec"].update(serveConfigV2="applications:\n  - name: teacher\n"),
        "import_path: required",
    ),
    "misspelled cluster field": (
        lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"].update(serviceTyp="ClusterIP"),
        "serviceTyp",
    ),
}


@pytest.mark.parametrize("mistake", sorted(SERVICE_MISTAKES))
def test_each_planted_rayservice_mistake_is_caught(schemas, tmp_path, mistake):
    plant, words = SERVICE_MISTAKES[mistake]
    doc = copy.deepcopy(yaml.safe_load((CLUSTER / "rayservice-teacher.yaml").read_text()))
    plant(doc)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    problems = validate.validate_file(path, schemas)
    assert any(words in p for p in problems), problems

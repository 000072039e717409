"""QuantizationJobs and their volumes on a cluster, through the official Python client: create,
read, wait on; a statically provisioned PVC and a calibration ConfigMap; the small spec tests and
benchmarks start from."""

from __future__ import annotations

import json
import uuid
from typing import Any

import yaml
from qjob_api.v1alpha1 import GROUP, PLURAL, VERSION

from .localcluster import TERMINATION_MESSAGE_ANNOTATION
from .waits import wait_for


def custom_api(kube_api):
    from kubernetes import client

    return client.CustomObjectsApi(kube_api)


def qjob_manifest(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "QuantizationJob", "metadata": {"name": name}, "spec": spec}


def create_qjob(kube_api, namespace: str, spec: dict[str, Any], name: str | None = None) -> str:
    name = name or f"qj-{uuid.uuid4().hex[:6]}"
    custom_api(kube_api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, qjob_manifest(name, spec))
    return name


def get_qjob(kube_api, namespace: str, name: str) -> dict[str, Any]:
    return custom_api(kube_api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def wait_qjob(kube_api, namespace: str, name: str, pred, timeout: float = 60, what: str = "", operator=None):
    last = {}

    def check():
        last["obj"] = get_qjob(kube_api, namespace, name)
        return pred(last["obj"].get("status") or {})

    try:
        wait_for(check, timeout=timeout, what=what or f"{namespace}/{name}")
    except TimeoutError as exc:
        detail = yaml.safe_dump((last.get("obj") or {}).get("status"))
        logs = operator.log_tail() if operator else ""
        raise AssertionError(f"{exc}\nstatus:\n{detail}\noperator log:\n{logs}") from None
    return last["obj"]


def phase_is(*phases: str):
    return lambda status: status.get("phase") in phases


def make_artifacts_pvc(kube_api, namespace: str, name: str = "artifacts", host_path: str | None = None) -> str:
    """A statically provisioned PV bound to a PVC (the local cluster has no storage provisioner).
    The PV controller in the real kube-controller-manager does the binding."""
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    pv_name = f"{namespace}-{name}"[:63]
    core.create_persistent_volume(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "labels": {"qjob-test-namespace": namespace}},
            "spec": {
                "capacity": {"storage": "10Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Delete" if host_path is None else "Retain",
                "hostPath": {"path": host_path or f"/tmp/qjob-pv/{pv_name}"},
                "claimRef": {"namespace": namespace, "name": name},
            },
        }
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": pv_name,
                "resources": {"requests": {"storage": "10Gi"}},
            },
        },
    )
    wait_for(
        lambda: core.read_namespaced_persistent_volume_claim(name, namespace).status.phase == "Bound",
        timeout=60,
        what=f"PVC {namespace}/{name} Bound",
    )
    return name


def make_calibration_configmap(kube_api, namespace: str, name: str = "calibration") -> str:
    from kubernetes import client

    text = "\n".join(
        f'{{"text": "calibration sample {i}: the quick brown fox jumps over the lazy dog"}}' for i in range(64)
    )
    client.CoreV1Api(kube_api).create_namespaced_config_map(
        namespace,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"samples.jsonl": text}},
    )
    return name


def make_job_namespace(kube_api, name: str) -> str:
    """A new namespace holding what ``basic_spec`` refers to: the artifacts PVC and the calibration ConfigMap."""
    from kubernetes import client

    client.CoreV1Api(kube_api).create_namespace({"metadata": {"name": name}})
    make_artifacts_pvc(kube_api, name)
    make_calibration_configmap(kube_api, name)
    return name


def runner_summary(outcome: str = "Succeeded", uri: str = "pvc://artifacts/checkpoint-hf", **extra: Any) -> str:
    """The JSON summary a real runner leaves as its termination message (an artifact when it succeeded)."""
    artifacts = [{"kind": "checkpoint", "format": "hf", "uri": uri}] if outcome == "Succeeded" else []
    return json.dumps({"outcome": outcome, "stage": "quantize", "artifacts": artifacts, **extra})


def basic_spec(**overrides: Any) -> dict[str, Any]:
    """A small job whose simulated runner pods finish like the real runner: exit 0 with a summary
    naming an artifact (a pod that exits 0 without one fails the job: NoArtifacts)."""
    spec = {
        "model": {"huggingFace": {"repo": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"}},
        "quantization": {"format": "fp8"},
        "calibration": {"dataset": {"configMap": {"name": "calibration", "key": "samples.jsonl"}}, "samples": 64},
        "engines": [{"architecture": "hopper"}],
        "output": {"pvc": {"claimName": "artifacts"}},
        "resources": {"cpu": "1", "memory": "4Gi"},
    }
    scheduling = overrides.pop("scheduling", {})
    annotations = {TERMINATION_MESSAGE_ANNOTATION: runner_summary(), **scheduling.get("podAnnotations", {})}
    spec["scheduling"] = {**scheduling, "podAnnotations": annotations}
    spec.update(overrides)
    return spec

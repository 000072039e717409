"""pytest plugin: the real operator process (``qjob-operator``) against the local control plane,
plus helpers to create QuantizationJobs and wait on them.

The operator runs as a subprocess, exactly as in a pod (console script, config file, kubeconfig),
so tests can kill and restart it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster_fixtures import REPO_ROOT, localcluster, wait_for

GROUP, VERSION, PLURAL = "qjob.dev", "v1alpha1", "quantizationjobs"


@dataclass
class OperatorProcess:
    kubeconfig: Path
    workdir: Path
    config: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.config['metricsPort']}/metrics"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.config['healthPort']}/healthz"

    @property
    def log_path(self) -> Path:
        return self.workdir / "operator.log"

    def start(self) -> None:
        config_path = self.workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "QJOB_OPERATOR_CONFIG": str(config_path),
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        log = open(self.log_path, "a")
        self.starts += 1
        log.write(f"\n===== start #{self.starts} =====\n")
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qjob_operator.main"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        wait_for(self._healthy, timeout=60, what=f"operator liveness at {self.health_url} (log: {self.log_path})")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"operator exited with {self.proc.returncode}; log:\n{self.log_path.read_text()[-3000:]}"
            )
        with urllib.request.urlopen(self.health_url, timeout=2) as resp:
            return resp.status == 200

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, as when a node dies."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return resp.read().decode()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text()[-chars:] if self.log_path.exists() else ""


def install_crds(cluster) -> None:
    cluster.run_kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))
    # Established, and served: kubectl's own `wait` can race the CRD's first appearance.
    wait_for(
        lambda: cluster.run_kubectl("get", PLURAL, "-A", check=False).returncode == 0,
        timeout=60,
        what=f"{PLURAL} served by the apiserver",
    )


@pytest.fixture(scope="session")
def crds(cluster):
    install_crds(cluster)
    return cluster


def operator_config(**overrides: Any) -> dict[str, Any]:
    metrics_port, health_port = localcluster.free_ports(2)
    config = {
        "runner": {"image": "registry.example/qjob-runner:test"},
        "metricsPort": metrics_port,
        "healthPort": health_port,
        "resyncSeconds": 2,
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def operator(crds, tmp_path_factory):
    """One operator for the session, watching all namespaces (tests use one namespace each)."""
    op = OperatorProcess(
        kubeconfig=crds.kubeconfig, workdir=tmp_path_factory.mktemp("operator"), config=operator_config()
    )
    op.start()
    try:
        yield op
    finally:
        op.stop()


# ------------------------------------------------------------------------------------ helpers


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


def basic_spec(**overrides: Any) -> dict[str, Any]:
    spec = {
        "model": {"huggingFace": {"repo": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"}},
        "quantization": {"format": "fp8"},
        "calibration": {"dataset": {"configMap": {"name": "calibration", "key": "samples.jsonl"}}, "samples": 64},
        "engines": [{"architecture": "hopper"}],
        "output": {"pvc": {"claimName": "artifacts"}},
        "resources": {"cpu": "1", "memory": "4Gi"},
    }
    spec.update(overrides)
    return spec

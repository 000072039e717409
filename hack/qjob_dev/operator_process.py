"""The real operator (``python -m qjob_operator.main``) as a local process against a cluster,
exactly as in its pod (config file, kubeconfig), so tests and benchmarks can kill and restart it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from qjob_api.v1alpha1 import PLURAL

from .localcluster import REPO_ROOT, LocalCluster, free_ports, token_kubeconfig
from .waits import wait_for


@dataclass
class OperatorProcess:
    kubeconfig: Path
    workdir: Path
    config: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    starts: int = 0
    user: str = ""  # the apiserver's name for its identity, when known

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.config['metricsPort']}/metrics"

    @property
    def report_url(self) -> str:
        return self.config["reports"]["url"]

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
        self.starts += 1
        with open(self.log_path, "a") as log:  # the child keeps its own handle
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
        # Ready: a standby at once, the active replica once kopf has listed what it watches (a
        # restart in a cluster full of namespaces takes a while; tests must not count it).
        wait_for(self._ready, timeout=180, what=f"operator readiness at {self.health_url} (log: {self.log_path})")

    def health(self) -> dict[str, Any]:
        """What the operator's /healthz says (active: holds the Lease; listed: kopf has listed)."""
        with urllib.request.urlopen(self.health_url, timeout=2) as resp:
            return json.loads(resp.read())

    def active(self) -> bool:
        """Whether this replica reconciles now; False while it is down or standing by."""
        try:
            return self.health()["active"]
        except OSError:
            return False

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"operator exited with {self.proc.returncode}; log:\n{self.log_path.read_text()[-3000:]}"
            )
        state = self.health()  # /healthz answers 200 whenever the process serves
        return not state["active"] or state.get("listed", True)

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


def install_crds(cluster: LocalCluster) -> None:
    cluster.run_kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))
    # Established, and served: kubectl's own `wait` can race the CRD's first appearance.
    wait_for(
        lambda: cluster.run_kubectl("get", PLURAL, "-A", check=False).returncode == 0,
        timeout=60,
        what=f"{PLURAL} served by the apiserver",
    )


def operator_config(**overrides: Any) -> dict[str, Any]:
    """A config for an operator process on this machine: its report endpoint on loopback (runner
    processes of the pod runner reach it there) with an in-memory certificate, no Lease."""
    metrics_port, health_port, report_port = free_ports(3)
    config = {
        "runner": {"image": "registry.example/qjob-runner:test"},
        "metricsPort": metrics_port,
        "healthPort": health_port,
        "resyncSeconds": 2,
        "reports": {"port": report_port, "url": f"https://127.0.0.1:{report_port}", "tlsSecret": ""},
        "leaderElection": {"enabled": False},
    }
    config.update(overrides)
    return config


OPERATOR_NS = "qjob-test-operator"  # not qjob-system: test_chart.py creates and deletes that one


def chart_identity(
    cluster: LocalCluster, kube_api, workdir: Path, release: str = "qjob-operator", values: dict[str, Any] | None = None
) -> tuple[Path, str]:
    """The chart's ServiceAccount and RBAC (cluster-wide mode), applied as `helm template` renders
    them with ``values``; returns a kubeconfig with a token of that ServiceAccount, as the
    operator's pod has, and the user name the apiserver knows it by. Operators started with it have
    exactly the chart's permissions, not the admin's."""
    from kubernetes import client

    values_file = workdir / f"{release}-values.yaml"
    values_file.write_text(yaml.safe_dump(values or {}))
    rendered = subprocess.run(
        [str(cluster.helm), "template", release, str(REPO_ROOT / "charts" / "qjob-operator"),
         "--namespace", OPERATOR_NS, "--kube-version", "v1.36.3", "--values", str(values_file)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    rbac_kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    objects = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] in rbac_kinds]
    manifest = workdir / f"{release}-rbac.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    cluster.run_kubectl("create", "namespace", OPERATOR_NS, check=False)
    cluster.run_kubectl("apply", "-f", str(manifest))
    sa = next(o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount")
    token = (
        client.CoreV1Api(kube_api)
        .create_namespaced_service_account_token(sa, OPERATOR_NS, {"spec": {"expirationSeconds": 86400}})
        .status.token
    )
    kubeconfig = token_kubeconfig(cluster.kubeconfig, token, workdir / f"{release}.kubeconfig")
    return kubeconfig, f"system:serviceaccount:{OPERATOR_NS}:{sa}"

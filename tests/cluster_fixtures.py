"""pytest plugin: a real local Kubernetes control plane (hack/localcluster) for cluster tests.

Fixtures
  cluster    session: starts etcd + kube-apiserver + kube-controller-manager + kube-scheduler +
             kwok (simulated GPU nodes from hack/localcluster/topology.yaml) in a temp dir and
             stops it at session end. With QJOB_KUBECONFIG=<path> the tests use that running
             cluster instead (e.g. `make cluster-up` + QJOB_KUBECONFIG=.cluster/kubeconfig).
             Attributes: .kubeconfig .bin_dir .kubectl .helm .dir .server .version
  kube_api   session: kubernetes.client.ApiClient (official sync client) for the admin user
  namespace  function: a fresh namespace (default ServiceAccount present), deleted afterwards

Binaries are built (once, into ~/.cache/qjob-operator/bin) after collection when any collected
test uses the cluster, so the cold build does not count against a test's timeout.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
_LC_PATH = REPO_ROOT / "hack" / "localcluster" / "localcluster.py"


def _load_localcluster():
    mod = sys.modules.get("qjob_localcluster")
    if mod is None:
        spec = importlib.util.spec_from_file_location("qjob_localcluster", _LC_PATH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["qjob_localcluster"] = mod
        spec.loader.exec_module(mod)
    return mod


localcluster = _load_localcluster()


def pinned_k8s_version() -> str:
    text = (REPO_ROOT / "hack" / "localcluster" / "build.sh").read_text()
    return re.search(r"^K8S_VERSION=(\S+)", text, re.M).group(1)


def wait_for(pred: Callable[[], Any], timeout: float = 60, interval: float = 0.2, what: str = ""):
    """Poll pred() until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - keep polling, report the last error
            last_exc = e
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout}s waiting for {what or pred}"
            if last_exc:
                msg += f" (last error: {last_exc!r})"
            raise TimeoutError(msg)
        time.sleep(interval)


@dataclass
class Cluster:
    dir: Path
    kubeconfig: Path
    bin_dir: Path
    server: str
    version: str
    handle: Any = None  # LocalCluster when this session started it

    @property
    def kubectl(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def helm(self) -> Path:
        return self.bin_dir / "helm"

    def run_kubectl(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            check=check, capture_output=True, text=True, **kw,
        )  # fmt: skip


def _uses_cluster(item: pytest.Item) -> bool:
    return "cluster" in getattr(item, "fixturenames", ()) or item.get_closest_marker("cluster")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: needs the local control plane (hack/localcluster)")


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any(_uses_cluster(i) for i in session.items):
        # Build (first time only: ~25 min on 2 cores) outside any test's timeout.
        localcluster.locate_binaries()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    external = os.environ.get("QJOB_KUBECONFIG")
    if external:
        import yaml

        kc = Path(external).resolve()
        cfg = yaml.safe_load(kc.read_text())
        ctx = next(c for c in cfg["contexts"] if c["name"] == cfg["current-context"])["context"]
        server = next(c for c in cfg["clusters"] if c["name"] == ctx["cluster"])["cluster"]["server"]
        yield Cluster(
            dir=kc.parent,
            kubeconfig=kc,
            bin_dir=localcluster.locate_binaries(),
            server=server,
            version=pinned_k8s_version(),
        )
        return
    lc = localcluster.LocalCluster(tmp_path_factory.mktemp("localcluster"))
    lc.up(timeout=180)
    try:
        yield Cluster(
            dir=lc.dir,
            kubeconfig=lc.kubeconfig,
            bin_dir=lc.bin_dir,
            server=lc.server,
            version=pinned_k8s_version(),
            handle=lc,
        )
    finally:
        lc.down(keep_logs=True)  # processes stopped; logs stay in pytest's temp dir


@pytest.fixture(scope="session")
def kube_api(cluster: Cluster):
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def namespace(kube_api, request: pytest.FixtureRequest):
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base or 't'}-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_for(
        lambda: core.read_namespaced_service_account("default", name),
        timeout=60,
        what=f"default ServiceAccount in {name}",
    )
    try:
        yield name
    finally:
        core.delete_namespace(name, propagation_policy="Background")

"""pytest plugin: a real local Kubernetes control plane (``qjob_dev.localcluster``) for cluster tests.

Fixtures
  cluster    session: a ``LocalCluster`` (etcd + kube-apiserver + kube-controller-manager +
             kube-scheduler + kwok with the simulated GPU nodes of hack/localcluster/topology.yaml)
             started in a temp dir and stopped at session end. With QJOB_KUBECONFIG=<path> the
             tests use that running cluster instead (e.g. `make cluster-up` +
             QJOB_KUBECONFIG=.cluster/kubeconfig).
  kube_api   session: kubernetes.client.ApiClient (official sync client) for the admin user
  namespace  function: a fresh namespace (default ServiceAccount present), deleted afterwards

Binaries are built (once, into ~/.cache/qjob-operator/bin) after collection when any collected
test uses the cluster, so the cold build does not count against a test's timeout.
"""

from __future__ import annotations

import os
import re
import uuid

import pytest
from qjob_dev.localcluster import LocalCluster, locate_binaries
from qjob_dev.waits import wait_for


def _uses_cluster(item: pytest.Item) -> bool:
    return "cluster" in getattr(item, "fixturenames", ()) or item.get_closest_marker("cluster")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: needs the local control plane (hack/localcluster)")


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any(_uses_cluster(i) for i in session.items):
        # Build (first time only: ~25 min on 2 cores) outside any test's timeout.
        locate_binaries()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    external = os.environ.get("QJOB_KUBECONFIG")
    if external:
        yield LocalCluster.attach(external)
        return
    lc = LocalCluster(tmp_path_factory.mktemp("localcluster"))
    lc.up(timeout=180)
    try:
        yield lc
    finally:
        lc.down(keep_logs=True)  # processes stopped; logs stay in pytest's temp dir


@pytest.fixture(scope="session")
def kube_api(cluster: LocalCluster):
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

"""pytest plugin: the real operator process (``qjob_dev.operator_process``) against the local
control plane for the session, and the QuantizationJob spec the integration tests start from
(``basic_spec``, qjob_dev's: the benchmarks start from it too)."""

from __future__ import annotations

import pytest
from qjob_dev.operator_process import OperatorProcess, chart_identity, install_crds, operator_config
from qjob_dev.qjobs import basic_spec as basic_spec
from qjob_dev.qjobs import make_artifacts_pvc, make_calibration_configmap


@pytest.fixture(scope="session")
def crds(cluster):
    install_crds(cluster)
    return cluster


# Tests named test_operator_runs_with_* start an operator of their own (the namespace fixture names
# namespaces after the test); the session operator must not race it for their QuantizationJobs.
OWN_OPERATOR_NAMESPACES = "test-operator-runs-with-*"


@pytest.fixture(scope="session")
def operator(crds, kube_api, tmp_path_factory):
    """One operator for the session, with the chart's own RBAC (a ServiceAccount token), never the
    admin's, watching all namespaces (tests use one namespace each) but those of tests that bring their own."""
    workdir = tmp_path_factory.mktemp("operator")
    kubeconfig, user = chart_identity(crds, kube_api, workdir)
    op = OperatorProcess(
        kubeconfig=kubeconfig,
        workdir=workdir,
        # Multi-pod plans are opt-in (the default is 1); tests/integration/test_scaling.py needs 2.
        config=operator_config(namespaces=[f"!{OWN_OPERATOR_NAMESPACES}"], policy={"maxPodsPerStage": 2}),
        user=user,
    )
    op.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture
def ns(namespace, kube_api, operator):
    """A test's namespace with the operator running, an artifacts PVC and a calibration ConfigMap."""
    make_artifacts_pvc(kube_api, namespace)
    make_calibration_configmap(kube_api, namespace)
    return namespace

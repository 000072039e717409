"""A model cache shared by two namespaces (modelCache.shared), end to end: the real operator under
the chart's RBAC for that setting, the real PV controller binding each namespace's read-only view,
fill Jobs in the cache's namespace reading the platform's model registry on a real S3 server with
the platform's credentials, and the real runner in every pod (qjob_dev.podrunner)."""

from __future__ import annotations

import json
import uuid

import pytest
from kubernetes import client
from qjob_dev.operator_process import OperatorProcess, chart_identity, operator_config
from qjob_dev.qjobs import create_qjob, make_artifacts_pvc, phase_is, wait_qjob
from qjob_dev.tiny_models import make_tiny_llama
from qjob_dev.waits import wait_for

from .conftest import pv_folder
from .test_end_to_end import EXTERNAL, spec

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _namespace(core, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: core.read_namespaced_service_account("default", name), timeout=60, what=f"{name} ready")
    return name


def _not_reconciled(kube_api, namespace: str, job: dict, operator) -> str:
    """Creates the job and returns the message of its Reconciled=False condition."""
    name = create_qjob(kube_api, namespace, job, name="tiny-shared")

    def reconciled(status) -> dict:
        return next((c for c in status.get("conditions") or [] if c["type"] == "Reconciled"), {})

    obj = wait_qjob(kube_api, namespace, name, lambda s: reconciled(s).get("status") == "False", operator=operator)
    return reconciled(obj["status"])["message"]


def test_operator_runs_with_a_cache_two_namespaces_share_one_download(
    kube_api, cluster, e2e_ns, operator, s3_server, s3_bucket, tmp_path
):
    core = client.CoreV1Api(kube_api)
    s3_server.upload_folder(make_tiny_llama(tmp_path / "tiny"), s3_bucket, "registry/tiny")
    # The platform's namespace holds the cache and the only credential to its model registry.
    home = _namespace(core, "test-operator-runs-with-cache-home")
    other = _namespace(core, "test-operator-runs-with-cache-b")
    # A user of this namespace made a claim named like the view, on a volume of their own.
    squatted = _namespace(core, "test-operator-runs-with-cache-c")
    make_artifacts_pvc(kube_api, squatted, name="qjob-shared-model-cache")
    registry = {"endpoint": s3_server.endpoint, "bucket": s3_bucket, "prefix": "registry"}
    core.create_namespaced_secret(
        home,
        {
            "metadata": {"name": "model-registry"},
            "stringData": {"accessKeyId": s3_server.access_key, "secretAccessKey": s3_server.secret_key},
        },
    )
    shared = {
        "namespaces": [e2e_ns, other, squatted],
        "namespace": home,
        "claimName": "shared-models",
        "s3": [{**registry, "credentialsSecretRef": {"name": "model-registry"}}],
    }
    make_artifacts_pvc(kube_api, other)
    core.create_namespaced_config_map(
        other,
        {"metadata": {"name": "calibration"}, "data": core.read_namespaced_config_map("calibration", e2e_ns).data},
    )
    kubeconfig, user = chart_identity(
        cluster,
        kube_api,
        tmp_path,
        release="qjob-shared",
        values={"modelCache": {"shared": {"claimName": "shared-models"}}},
    )
    config = operator_config(
        namespaces=[e2e_ns, other, squatted],
        runner={"image": "registry.example/qjob-runner:test", "podLabels": EXTERNAL},
        modelCache={"shared": shared},
    )
    op = OperatorProcess(kubeconfig=kubeconfig, workdir=tmp_path / "operator", config=config, user=user)
    op.workdir.mkdir()
    op.start()
    # The tenants name the registry's objects only: no credential of theirs reaches it.
    job = spec(model={"s3": {**registry, "prefix": "registry/tiny"}})
    try:
        # Before the platform created the cache's claim: the job says so and waits (no stage yet).
        message = _not_reconciled(kube_api, e2e_ns, job, op)
        assert "modelCache.shared.claimName" in message and f"{home}/shared-models" in message, message
        make_artifacts_pvc(kube_api, home, name="shared-models")

        results = {}
        for namespace in (e2e_ns, other):  # one after the other: the second finds the first's download
            name = "tiny-shared" if namespace == e2e_ns else create_qjob(kube_api, namespace, job, name="tiny-shared")
            obj = wait_qjob(kube_api, namespace, name, phase_is("Succeeded", "Failed"), timeout=420, operator=op)
            assert obj["status"]["phase"] == "Succeeded", json.dumps(obj["status"], indent=2)
            results[namespace] = obj["status"]

        # The squatted claim could point the namespace's jobs at other data: refused, saying so.
        assert "is not the shared model cache's view" in _not_reconciled(kube_api, squatted, job, op)
        assert not client.BatchV1Api(kube_api).list_namespaced_job(squatted).items

        fills = client.BatchV1Api(kube_api).list_namespaced_job(home, label_selector="app.kubernetes.io/name=qjob-fill")
        assert sorted(j.metadata.labels["qjob.dev/fill-for-namespace"] for j in fills.items) == sorted([e2e_ns, other])
        for namespace, status in results.items():
            assert [s["name"] for s in status["stages"]] == ["fetch", "quantize"]
            view = core.read_namespaced_persistent_volume_claim("qjob-shared-model-cache", namespace)
            assert view.status.phase == "Bound" and view.spec.access_modes == ["ReadOnlyMany"]
            pv = core.read_persistent_volume(view.spec.volume_name)
            assert pv.spec.persistent_volume_reclaim_policy == "Retain"
            manifest = json.loads(
                (pv_folder(kube_api, namespace) / namespace / "tiny-shared" / "manifest.json").read_text()
            )
            assert manifest["metrics"]["modelBytesFetched"] == 0  # the GPU stage read the shared cache
        # Every tenant pod mounted the shared cache read-only; only the fill Jobs could write it.
        for namespace in (e2e_ns, other):
            for pod in core.list_namespaced_pod(namespace, label_selector="qjob.dev/job-name=tiny-shared").items:
                [cache] = [v for v in pod.spec.volumes if v.name == "model-cache"]
                assert cache.persistent_volume_claim.claim_name == "qjob-shared-model-cache"
                assert cache.persistent_volume_claim.read_only
        records = {
            p.name: json.loads(p.read_text())
            for p in (pv_folder(kube_api, home, "shared-models") / "fills").glob("*.json")
        }
        fetched = sorted(r["bytesFetched"] for r in records.values())
        assert len(fetched) == 2 and fetched[0] == 0 and fetched[1] > 0, records  # downloaded once for both
    finally:
        op.stop()
        for namespace in (home, other, squatted):
            core.delete_namespace(namespace, propagation_policy="Background")

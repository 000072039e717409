"""Tenancy suite: what an editor of namespace A can do, through QuantizationJobs, to namespace B
(its Secrets, ConfigMaps, PVCs, ServiceAccounts, jobs and their status) or to the operator.
The goal is nothing; each attempt below checks that it achieved nothing."""

from __future__ import annotations

import json
import uuid

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from qjob_dev.localcluster import HOLD_ANNOTATION as HOLD
from qjob_dev.qjobs import (
    GROUP,
    PLURAL,
    VERSION,
    create_qjob,
    custom_api,
    get_qjob,
    make_job_namespace,
    phase_is,
    qjob_manifest,
    wait_qjob,
)
from qjob_dev.waits import wait_for

from tests.operator_fixtures import basic_spec

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def tenants(kube_api, operator):
    """Namespace A (the attacker edits it) and B (the victim's, with a running job and a Secret),
    set up once: each attempt below creates objects of its own names in A."""
    core = client.CoreV1Api(kube_api)
    namespace, b = (make_job_namespace(kube_api, f"{who}-{uuid.uuid4().hex[:6]}") for who in ("tenant", "victim"))
    core.create_namespaced_secret(b, {"metadata": {"name": "hf-token"}, "stringData": {"token": "b-secret"}})
    victim = create_qjob(kube_api, b, basic_spec(engines=[], scheduling={"podAnnotations": {HOLD: "true"}}))
    wait_qjob(kube_api, b, victim, phase_is("Running"), timeout=60, operator=operator)
    # Alice edits namespace A: the built-in edit role plus QuantizationJobs (the chart aggregates
    # exactly this into edit: everything on quantizationjobs, only get on their status).
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "alice"}})
    rbac = client.RbacAuthorizationV1Api(kube_api)
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "qjob-edit"},
            "rules": [
                {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["*"]},
                {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get"]},
            ],
        },
    )
    for kind, role in (("ClusterRole", "edit"), ("Role", "qjob-edit")):
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": f"alice-{role}"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": "alice", "namespace": namespace}],
            },
        )
    token = core.create_namespaced_service_account_token(
        "alice", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    cfg = client.Configuration()
    cfg.host, cfg.ssl_ca_cert = kube_api.configuration.host, kube_api.configuration.ssl_ca_cert
    alice = client.ApiClient(cfg, header_name="Authorization", header_value=f"Bearer {token}")
    try:
        yield namespace, b, victim, alice
    finally:
        alice.close()
        for ns in (namespace, b):
            core.delete_namespace(ns, propagation_policy="Background")


def _denied(call) -> int:
    with pytest.raises(ApiException) as denied:
        call()
    return denied.value.status


def test_namespace_b_and_its_jobs_are_out_of_reach(kube_api, tenants):
    a, b, victim, alice = tenants
    custom = custom_api(alice)
    assert _denied(lambda: custom.get_namespaced_custom_object(GROUP, VERSION, b, PLURAL, victim)) == 403
    assert (
        _denied(
            lambda: custom.create_namespaced_custom_object(GROUP, VERSION, b, PLURAL, qjob_manifest("x", basic_spec()))
        )
        == 403
    )
    forged = {
        "status": {"phase": "Succeeded", "artifacts": [{"kind": "checkpoint", "format": "hf", "uri": "pvc://x/y"}]}
    }
    assert (
        _denied(lambda: custom.patch_namespaced_custom_object_status(GROUP, VERSION, b, PLURAL, victim, forged)) == 403
    )
    # Not even her own job's status: phase, artifacts and reasons are the operator's to write.
    mine = create_qjob(alice, a, basic_spec(engines=[], scheduling={"podAnnotations": {HOLD: "true"}}))
    assert _denied(lambda: custom.patch_namespaced_custom_object_status(GROUP, VERSION, a, PLURAL, mine, forged)) == 403
    assert get_qjob(kube_api, b, victim)["status"]["phase"] == "Running"


def test_references_resolve_in_the_jobs_own_namespace_only(kube_api, tenants, operator):
    a, b, _, alice = tenants
    spec = basic_spec(engines=[], scheduling={"podAnnotations": {HOLD: "true"}})
    # A namespace on each reference is not part of the API: the apiserver drops it.
    spec["model"]["huggingFace"]["tokenSecretRef"] = {"name": "hf-token", "namespace": b}
    spec["calibration"]["dataset"]["configMap"]["namespace"] = b
    spec["output"]["pvc"]["namespace"] = b
    spec["serviceAccountName"] = "default"
    name = create_qjob(alice, a, spec)
    stored = get_qjob(kube_api, a, name)["spec"]
    assert b not in json.dumps(stored) and "serviceAccountName" not in stored
    [job] = wait_for(
        lambda: client.BatchV1Api(kube_api).list_namespaced_job(a, label_selector=f"qjob.dev/job-name={name}").items,
        timeout=60,
    )
    pod = job.spec.template.spec
    assert b not in json.dumps(client.ApiClient().sanitize_for_serialization(job))
    # the operator's setting (runner.serviceAccountName), never one the author names, and no API token
    assert pod.service_account_name == "default" and pod.automount_service_account_token is False
    env = {e.name: e for e in pod.containers[0].env}
    assert env["HF_TOKEN"].value_from.secret_key_ref.name == "hf-token"  # resolved by the kubelet in A


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda s: s["output"]["pvc"].update(path="../victim"), "path must be relative"),
        (lambda s: s["model"].update(pvc={"claimName": "artifacts", "path": "/etc"}), "set exactly one model source"),
        (lambda s: s["scheduling"].update(podLabels={"qjob.dev/job-name": "victim"}), "must not set keys"),
        (lambda s: s["scheduling"].update(podLabels={"controller-uid": "x"}), "must not set keys"),
    ],
    ids=["output-escape", "model-escape", "impersonate-pods", "job-selector"],
)
def test_paths_and_labels_cannot_escape(tenants, mutate, fragment):
    a, _, _, alice = tenants
    spec = basic_spec(engines=[])
    mutate(spec)
    with pytest.raises(ApiException) as refused:
        custom_api(alice).create_namespaced_custom_object(GROUP, VERSION, a, PLURAL, qjob_manifest("escape", spec))
    assert refused.value.status == 422 and fragment in json.loads(refused.value.body)["message"]


def test_cluster_critical_priority_and_tolerating_every_taint_are_refused(kube_api, tenants, operator):
    """What runner pods may take of the cluster is the platform team's policy (the default: no
    system-* PriorityClass, no toleration without a key), not the job author's."""
    a, _, _, alice = tenants
    takes = [
        {"priorityClassName": "system-cluster-critical"},  # exists in every cluster
        {"tolerations": [{"operator": "Exists"}]},
    ]
    names = [create_qjob(alice, a, basic_spec(engines=[], scheduling=scheduling)) for scheduling in takes]
    for name, field in zip(names, ("priorityClassName", "toleration"), strict=True):
        obj = wait_qjob(kube_api, a, name, phase_is("Failed", "Running", "Succeeded"), timeout=60, operator=operator)
        assert obj["status"]["reason"] == "PolicyViolation" and field in obj["status"]["message"], obj["status"]
        assert not client.BatchV1Api(kube_api).list_namespaced_job(a, label_selector=f"qjob.dev/job-name={name}").items


def test_a_job_planted_under_a_future_jobs_name_is_not_adopted(kube_api, tenants, operator):
    """Alice (a namespace editor) plants a finished Job labelled as the operator's, then creates
    the QuantizationJob: the operator never takes the planted outcome."""
    a, _, _, alice = tenants
    name = f"planted-{uuid.uuid4().hex[:4]}"
    summary = json.dumps(
        {
            "outcome": "Succeeded",
            "stage": "quantize",
            "artifacts": [{"kind": "checkpoint", "format": "hf", "uri": "pvc://forged"}],
        }
    )
    labels = {"qjob.dev/job-name": name, "qjob.dev/stage": "quantize"}
    client.BatchV1Api(alice).create_namespaced_job(
        a,
        {
            "metadata": {"name": f"{name}-quantize", "labels": labels},
            "spec": {
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {"localcluster.qjob.dev/termination-message": summary},
                    },
                    "spec": {"restartPolicy": "Never", "containers": [{"name": "runner", "image": "x"}]},
                }
            },
        },
    )
    create_qjob(alice, a, basic_spec(engines=[]), name=name)
    obj = wait_qjob(kube_api, a, name, phase_is("Succeeded", "Failed"), timeout=60, operator=operator)
    assert obj["status"]["reason"] == "ObjectConflict"
    assert not obj["status"].get("artifacts")

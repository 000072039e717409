"""Least privilege of runner pods, proved with real tokens against the real apiserver.

Runner pods hold no Kubernetes API credential: only a projected ServiceAccount token for the
operator's report endpoint (audience qjob.dev/report, bound to the pod). The operator (running
with the chart's RBAC, not the admin's) checks each token with a TokenReview and accepts a
report only from a pod of the stage's own Job, and only as progress. Tokens here are minted with
the TokenRequest API exactly as the kubelet requests them for the pod's projected volume.
"""

from __future__ import annotations

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from qjob_dev.localcluster import HOLD_ANNOTATION
from qjob_dev.qjobs import (
    GROUP,
    PLURAL,
    VERSION,
    create_qjob,
    get_qjob,
    wait_qjob,
)
from qjob_dev.runner_reports import post_report, report_token, runner_reporting
from qjob_dev.waits import wait_for

from tests.operator_fixtures import basic_spec

pytestmark = pytest.mark.cluster

HELD = {"scheduling": {"podAnnotations": {HOLD_ANNOTATION: "true"}}}


def running_pod(kube_api, namespace, name, stage="quantize"):
    selector = f"qjob.dev/job-name={name},qjob.dev/stage={stage}"
    return wait_for(
        lambda: next(
            (p for p in client.CoreV1Api(kube_api).list_namespaced_pod(namespace, label_selector=selector).items
             if p.status.phase == "Running"),
            None,
        ),
        timeout=60, what=f"{stage} pod of {name} running",
    )  # fmt: skip


def stage_url(reporting_url: str, name: str, stage: str) -> str:
    """The report URL of another job or stage, built like the runner's own."""
    base, _, _ = reporting_url.partition("/v1/namespaces/")
    namespace = reporting_url.split("/v1/namespaces/")[1].split("/")[0]
    return f"{base}/v1/namespaces/{namespace}/quantizationjobs/{name}/stages/{stage}/progress"


def test_runner_pod_has_no_api_credential(kube_api, ns, operator):
    name = create_qjob(kube_api, ns, basic_spec(engines=[], **HELD))
    pod = running_pod(kube_api, ns, name)
    assert pod.spec.automount_service_account_token is False
    projected = [v for v in pod.spec.volumes if v.projected]
    assert [s.service_account_token.audience for v in projected for s in v.projected.sources] == ["qjob.dev/report"]
    # The pod's one token is useless against the Kubernetes API, whatever its ServiceAccount may do.
    cfg = client.Configuration()
    cfg.host = kube_api.configuration.host
    cfg.ssl_ca_cert = kube_api.configuration.ssl_ca_cert
    bearer = f"Bearer {report_token(kube_api, pod)}"
    with client.ApiClient(cfg, header_name="Authorization", header_value=bearer) as as_runner:
        for call in (
            lambda: client.CustomObjectsApi(as_runner).get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name),
            lambda: client.CustomObjectsApi(as_runner).patch_namespaced_custom_object_status(
                GROUP, VERSION, ns, PLURAL, name, {"status": {"phase": "Succeeded"}}
            ),
            lambda: client.CoreV1Api(as_runner).list_namespaced_secret(ns),
        ):
            with pytest.raises(ApiException) as refused:
                call()
            assert refused.value.status == 401


def test_a_runner_reports_progress_of_its_own_stage_and_nothing_else(kube_api, ns, operator):
    mine = create_qjob(kube_api, ns, basic_spec(engines=[{"architecture": "hopper"}], **HELD))
    other = create_qjob(kube_api, ns, basic_spec(engines=[], **HELD))
    pod, other_pod = running_pod(kube_api, ns, mine), running_pod(kube_api, ns, other)
    reporting = runner_reporting(kube_api, ns, f"{mine}-quantize")
    url, ca = reporting["url"], reporting["caCert"]
    token = report_token(kube_api, pod)

    # Its own stage's progress: accepted, and in status within the write interval.
    assert post_report(url, ca, token, {"step": "calibrate", "percent": 40, "message": "batch 2/5"})[0] == 200
    wait_qjob(kube_api, ns, mine, lambda s: (s.get("runnerReports") or {}).get("quantize", {}).get("percent") == 40,
              timeout=30, operator=operator)  # fmt: skip

    # Not another job's, nor another stage of its own job.
    for target in (stage_url(url, other, "quantize"), stage_url(url, mine, "build-hopper")):
        code, answer = post_report(target, ca, token, {"step": "report", "percent": 100})
        assert code == 403, answer
    # Not phase, conditions, artifacts or quality: a report is progress only (field named).
    for forged in (
        {"percent": 100, "phase": "Succeeded"},
        {"percent": 100, "artifacts": [{"kind": "checkpoint", "format": "hf", "uri": "pvc://x/y"}]},
        {"percent": 100, "conditions": [{"type": "Complete", "status": "True"}]},
        {"percent": 100, "quality": {"metric": "perplexity", "baseline": 1, "quantized": 1}},
        {"percent": 101},
    ):
        code, answer = post_report(url, ca, token, forged)
        assert code == 400, (forged, answer)
        assert next(k for k in forged if k != "percent" or len(forged) == 1) in answer["error"]
    # A token that is not the pod's report token: for the API's audience, or bound to no pod.
    for wrong in (report_token(kube_api, pod, audience="https://kubernetes.default.svc"),
                  report_token(kube_api, pod, bound=False), None, "not-a-token"):  # fmt: skip
        code, answer = post_report(url, ca, wrong, {"percent": 99})
        assert code == 401, answer
    # A pod someone else created with the job's labels (and a valid report token) is not its runner.
    impostor = client.CoreV1Api(kube_api).create_namespaced_pod(
        ns,
        {
            "metadata": {"name": "impostor", "labels": dict(pod.metadata.labels)},
            "spec": {"containers": [{"name": "runner", "image": "x"}], "serviceAccountName": "default",
                     "nodeName": pod.spec.node_name,
                     "tolerations": [{"operator": "Exists"}]},
        },
    )  # fmt: skip
    code, answer = post_report(url, ca, report_token(kube_api, impostor), {"percent": 99})
    assert code == 403, answer
    # The other job's own runner reports for itself, as before.
    other_reporting = runner_reporting(kube_api, ns, f"{other}-quantize")
    assert post_report(other_reporting["url"], ca, report_token(kube_api, other_pod), {"percent": 5})[0] == 200

    wait_qjob(kube_api, ns, other, lambda s: (s.get("runnerReports") or {}).get("quantize", {}).get("percent") == 5,
              timeout=30, operator=operator)  # fmt: skip
    status = get_qjob(kube_api, ns, mine)["status"]
    assert status["phase"] == "Running" and status["artifacts"] == [] and "quality" not in status
    assert status["runnerReports"]["quantize"]["percent"] == 40 and "build-hopper" not in status["runnerReports"]
    assert not any(c["type"] == "Complete" and c["status"] == "True" for c in status.get("conditions", []))
    metrics = operator.metrics()
    assert 'qjob_runner_reports_total{outcome="forbidden"}' in metrics


def test_a_preexisting_service_account_is_never_taken_over(kube_api, ns, operator):
    """The operator creates no ServiceAccount, Role or RoleBinding: a user's `<job>-runner`
    ServiceAccount (with permissions of its own) stays theirs, unused and unbound."""
    core, rbac = client.CoreV1Api(kube_api), client.RbacAuthorizationV1Api(kube_api)
    name = "taken"
    before = core.create_namespaced_service_account(ns, {"metadata": {"name": f"{name}-runner"}})
    create_qjob(kube_api, ns, basic_spec(engines=[], **HELD), name=name)
    pod = running_pod(kube_api, ns, name)
    assert pod.spec.service_account_name == "default"
    after = core.read_namespaced_service_account(f"{name}-runner", ns)
    assert after.metadata.resource_version == before.metadata.resource_version
    assert not after.metadata.owner_references
    assert rbac.list_namespaced_role(ns).items == []
    assert rbac.list_namespaced_role_binding(ns).items == []
    made = [sa.metadata.name for sa in core.list_namespaced_service_account(ns).items]
    assert sorted(made) == ["default", f"{name}-runner"]


def test_operator_needs_nothing_beyond_the_charts_rbac(kube_api, operator):
    """The session's operator runs with the chart's ServiceAccount token: no request of it was
    refused by RBAC (so runners got their reports through, jobs their Jobs and Events)."""
    assert operator.user.startswith("system:serviceaccount:")
    denied = [line for line in operator.log_path.read_text().splitlines() if f'User "{operator.user}" cannot' in line]
    assert denied == [], "\n".join(denied[:5])

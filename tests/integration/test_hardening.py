"""Hardening on the real control plane: nothing is adopted that the job did not create, no two
jobs share an output folder, what a Job or Pod would refuse is refused at apply, and every failure
(also those found by the periodic resync) ends in a reason, an Event and a metric."""

from __future__ import annotations

import json
import re
import time

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from qjob_dev.localcluster import FAIL_EXIT_CODE_ANNOTATION as FAIL
from qjob_dev.localcluster import HOLD_ANNOTATION as HOLD
from qjob_dev.localcluster import TERMINATION_MESSAGE_ANNOTATION
from qjob_dev.operator_process import OperatorProcess, operator_config
from qjob_dev.qjobs import (
    GROUP,
    PLURAL,
    VERSION,
    create_qjob,
    custom_api,
    get_qjob,
    make_artifacts_pvc,
    make_calibration_configmap,
    phase_is,
    qjob_manifest,
    wait_qjob,
)
from qjob_dev.waits import wait_for

from tests.integration.test_operator import jobs_of
from tests.operator_fixtures import basic_spec

pytestmark = pytest.mark.cluster


def release(kube_api, namespace, name, stage):
    core = client.CoreV1Api(kube_api)
    selector = f"qjob.dev/job-name={name},qjob.dev/stage={stage}"
    pods = wait_for(lambda: core.list_namespaced_pod(namespace, label_selector=selector).items, timeout=60)
    for pod in pods:
        core.patch_namespaced_pod(pod.metadata.name, namespace, {"metadata": {"annotations": {HOLD: "false"}}})


def _stage(status, name):
    return next((s for s in status.get("stages", []) if s["name"] == name), {})


def refusal(kube_api, namespace, spec, name="bad"):
    with pytest.raises(ApiException) as refused:
        custom_api(kube_api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, qjob_manifest(name, spec)
        )
    assert refused.value.status == 422, refused.value.body
    return json.loads(refused.value.body)["message"]


def events_of(kube_api, namespace, name):
    return (
        client.CoreV1Api(kube_api).list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    )


def gone(kube_api, namespace, name) -> bool:
    try:
        get_qjob(kube_api, namespace, name)
    except ApiException as exc:
        return exc.status == 404
    return False


def counter(metrics: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}{{{want}}} (\S+)$", metrics, re.M)
    return float(match.group(1)) if match else 0.0


# --------------------------------------------------------------------- refused when applied (5, 6, 8, 9)


@pytest.mark.parametrize(
    "name, mutate, fragment",
    [
        ("n" * 64, lambda s: None, "metadata.name must be at most 63 characters"),
        ("labels", lambda s: s["scheduling"].update(podLabels={"team": "v" * 64}), "spec.scheduling.podLabels.team"),
        ("keys", lambda s: s["scheduling"].update(podLabels={"-team": "nlp"}), "spec.scheduling.podLabels keys"),
        ("reserved", lambda s: s["scheduling"].update(podLabels={"job-name": "x"}), "the Job controller"),
        ("selector", lambda s: s["scheduling"].update(nodeSelector={"a b": "x"}), "spec.scheduling.nodeSelector"),
        (
            "toleration",
            lambda s: s["scheduling"].update(tolerations=[{"operator": "Exists", "value": "x"}]),
            "operator Exists matches any value",
        ),
        (
            "seconds",
            lambda s: s["scheduling"].update(tolerations=[{"key": "k", "value": "v", "tolerationSeconds": 5}]),
            "tolerationSeconds applies to NoExecute",
        ),
        ("priority", lambda s: s["scheduling"].update(priorityClassName="Not_A_Name"), "priorityClassName"),
        ("queue", lambda s: s["scheduling"].update(queueName="q" * 64), "queueName"),
        ("secret", lambda s: s["model"]["huggingFace"].update(tokenSecretRef={"name": "A/B"}), "tokenSecretRef.name"),
        ("huge", lambda s: s["quantization"].update(excludeModules=["m" * 1024] * 64), "excludeModules"),
        ("annotations", lambda s: s["scheduling"]["podAnnotations"].update(big="x" * 300_000), "podAnnotations"),
        ("deadline", lambda s: s.update(runPolicy={"pendingDeadlineSeconds": 10**12}), "pendingDeadlineSeconds"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None,
)
def test_what_a_job_or_pod_would_refuse_is_refused_at_apply(kube_api, namespace, crds, name, mutate, fragment):
    spec = basic_spec()
    mutate(spec)
    assert fragment in refusal(kube_api, namespace, spec, name=name)


def test_quantities_may_be_numbers_as_in_a_pod(kube_api, ns, operator):
    name = create_qjob(kube_api, ns, basic_spec(engines=[], resources={"cpu": 2, "memory": 4294967296}))
    [job] = wait_for(lambda: jobs_of(kube_api, ns, name), timeout=60, what="the quantize Job")
    requests = job.spec.template.spec.containers[0].resources.requests
    assert (requests["cpu"], requests["memory"]) == ("2", "4294967296")
    assert "between 0 and 999999999999" in refusal(kube_api, ns, basic_spec(resources={"cpu": -1}))


def test_the_largest_accepted_spec_runs_and_deletes(kube_api, ns, operator):
    spec = basic_spec(engines=[], scheduling={"podAnnotations": {f"example.com/a{i}": "x" * 512 for i in range(6)}})
    spec["quantization"]["excludeModules"] = ["m" * 256] * 64
    spec["scheduling"]["podLabels"] = {f"example.com/l{i}": "v" * 63 for i in range(32)}
    spec["scheduling"]["podAnnotations"][HOLD] = "true"
    name = create_qjob(kube_api, ns, spec, name="n" * 63)
    wait_qjob(kube_api, ns, name, phase_is("Running"), timeout=60, operator=operator)
    custom_api(kube_api).delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    wait_for(lambda: gone(kube_api, ns, name), timeout=30, what="the largest spec deleted (not stuck Terminating)")


# --------------------------------------------------------------------------------- nothing adopted (2)


def test_an_orphaned_job_of_an_earlier_namesake_is_never_adopted(kube_api, ns, operator):
    name = create_qjob(kube_api, ns, basic_spec(engines=[]))
    wait_qjob(kube_api, ns, name, phase_is("Succeeded"), timeout=60, operator=operator)
    custom_api(kube_api).delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, propagation_policy="Orphan")
    wait_for(
        lambda: jobs_of(kube_api, ns, name) and not jobs_of(kube_api, ns, name)[0].metadata.owner_references,
        timeout=60,
        what="the finished Job orphaned",
    )
    wait_for(lambda: gone(kube_api, ns, name), timeout=60, what="the QuantizationJob deleted")
    # Same name, a spec whose runner fails: it must not inherit the orphan's success.
    create_qjob(kube_api, ns, basic_spec(engines=[], scheduling={"podAnnotations": {FAIL: "2"}}), name=name)
    obj = wait_qjob(kube_api, ns, name, phase_is("Succeeded", "Failed"), timeout=60, operator=operator)
    status = obj["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "ObjectConflict"), status
    assert f"Job {ns}/{name}-quantize exists but was not created by this QuantizationJob" in status["message"]
    assert status.get("artifacts", []) == []
    [orphan] = jobs_of(kube_api, ns, name)
    assert not orphan.metadata.owner_references  # left alone: neither adopted nor deleted


# --------------------------------------------------------------------------- output folders (0)


def test_two_jobs_never_share_an_output_folder(kube_api, ns, operator):
    held = basic_spec(engines=[], scheduling={"podAnnotations": {HOLD: "true"}})
    first = create_qjob(kube_api, ns, held, name="first")
    wait_qjob(kube_api, ns, first, phase_is("Running"), timeout=60, operator=operator)
    # Its folder (the default <namespace>/<name>), a folder inside it, and the folder around it.
    others = [
        create_qjob(kube_api, ns, basic_spec(engines=[], output={"pvc": {"claimName": "artifacts", "path": path}}))
        for path in (f"{ns}/first", f"{ns}/first/.qjob-work", ns)
    ]
    for other in others:
        obj = wait_qjob(kube_api, ns, other, phase_is("Failed", "Running", "Succeeded"), timeout=60, operator=operator)
        assert obj["status"]["reason"] == "OutputPathConflict", obj["status"]
        assert "overlaps the output of QuantizationJob first" in obj["status"]["message"]
        assert jobs_of(kube_api, ns, other) == []
    # A sibling folder is fine, and the first job was never disturbed.
    sibling = create_qjob(
        kube_api, ns, basic_spec(engines=[], output={"pvc": {"claimName": "artifacts", "path": f"{ns}/x"}})
    )
    assert (
        wait_qjob(kube_api, ns, sibling, phase_is("Succeeded", "Failed"), timeout=60)["status"]["phase"] == "Succeeded"
    )
    release(kube_api, ns, first, "quantize")
    assert wait_qjob(kube_api, ns, first, phase_is("Succeeded", "Failed"), timeout=60)["status"]["phase"] == "Succeeded"


# ---------------------------------------------------------------- stable reasons for stuck jobs (7)


def test_a_missing_priority_class_fails_at_once_naming_it(kube_api, ns, operator):
    name = create_qjob(kube_api, ns, basic_spec(engines=[], scheduling={"priorityClassName": "gpu-urgent"}))
    obj = wait_qjob(kube_api, ns, name, phase_is("Failed", "Succeeded"), timeout=30, operator=operator)
    assert obj["status"]["reason"] == "PriorityClassNotFound"
    assert "'gpu-urgent'" in obj["status"]["message"]
    assert jobs_of(kube_api, ns, name) == []


def test_pods_the_job_controller_cannot_create_fail_by_the_pending_deadline(kube_api, ns, operator):
    # A real admission refusal of every pod: a ResourceQuota of zero pods.
    client.CoreV1Api(kube_api).create_namespaced_resource_quota(
        ns, {"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}}
    )
    name = create_qjob(kube_api, ns, basic_spec(engines=[], runPolicy={"pendingDeadlineSeconds": 5}))
    obj = wait_qjob(kube_api, ns, name, phase_is("Failed", "Succeeded"), timeout=40, operator=operator)
    assert obj["status"]["reason"] == "PodsNotCreated", obj["status"]
    assert f"kubectl describe job {name}-quantize" in obj["status"]["message"]
    wait_for(lambda: not jobs_of(kube_api, ns, name), timeout=30, what="the pod-less Job deleted")


def test_operator_runs_with_its_own_config_and_records_and_stops_every_failure(kube_api, namespace, operator, tmp_path):
    """An operator of its own (this namespace only), to set what the session's cannot:
    - scarce status writes: a failure's write waits for its turn while the failed job's Jobs are
      stopped; the failure is still recorded, never lost to a rerun that no longer sees the Job
      (which left the job Pending for good);
    - a policy lowered while a job runs: the job fails and every Job it started is stopped (4c)."""
    make_artifacts_pvc(kube_api, namespace)
    make_calibration_configmap(kube_api, namespace)
    # One write per 2 s: a failure's write waits while its stopped Job's events arrive.
    config = operator_config(namespaces=[namespace], statusWritesPerSecond=0.5)
    op = OperatorProcess(kubeconfig=operator.kubeconfig, workdir=tmp_path, config=config, user=operator.user)
    op.start()
    try:
        running = create_qjob(
            kube_api,
            namespace,
            basic_spec(engines=[], resources={"gpus": 2}, scheduling={"podAnnotations": {HOLD: "true"}}),
        )
        spec = basic_spec(
            engines=[], resources={"cpu": "5000", "memory": "4Gi"}, runPolicy={"pendingDeadlineSeconds": 3}
        )
        names = [create_qjob(kube_api, namespace, spec) for _ in range(2)]  # failing together: writes queue
        for name in names:
            obj = wait_qjob(kube_api, namespace, name, phase_is("Failed", "Succeeded"), timeout=90, operator=op)
            assert obj["status"]["reason"] == "Unschedulable", obj["status"]
            wait_for(lambda n=name: not jobs_of(kube_api, namespace, n), timeout=30, what=f"{name}'s Job stopped")

        wait_qjob(kube_api, namespace, running, phase_is("Running"), timeout=60, operator=op)
        op.kill()  # a restart with the platform team's new policy
        op.config["policy"] = {"maxGpusPerPod": 1}
        op.start()
        obj = wait_qjob(kube_api, namespace, running, phase_is("Failed", "Succeeded"), timeout=60, operator=op)
        assert obj["status"]["reason"] == "PolicyViolation", obj["status"]
        wait_for(lambda: not jobs_of(kube_api, namespace, running), timeout=30, what="its GPU pods' Job stopped")
    finally:
        op.stop()


def test_a_runner_that_exits_0_without_artifacts_fails_saying_so(kube_api, ns, operator):
    """A broken image or entrypoint exits 0 too (13): no artifact, no success."""
    silent = basic_spec(engines=[], scheduling={"podAnnotations": {TERMINATION_MESSAGE_ANNOTATION: ""}})
    name = create_qjob(kube_api, ns, silent)
    obj = wait_qjob(kube_api, ns, name, phase_is("Failed", "Succeeded"), timeout=60, operator=operator)
    assert obj["status"]["reason"] == "NoArtifacts" and "runner.image" in obj["status"]["message"], obj["status"]


# ------------------------------------------------------------------ finished work stays done (10)


def test_history_outlives_pods_and_jobs(kube_api, ns, operator):
    """Attempts count pods since gone (an eviction, a deleted node: the Job does not count them),
    and deleting a finished stage's Job never re-runs it."""
    core = client.CoreV1Api(kube_api)
    name = create_qjob(kube_api, ns, basic_spec(scheduling={"podAnnotations": {HOLD: "true"}}))
    selector = f"qjob.dev/job-name={name},qjob.dev/stage=quantize"

    def running_pods():
        pods = core.list_namespaced_pod(ns, label_selector=selector).items
        return [p.metadata.name for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp]

    [first] = wait_for(running_pods, timeout=60, what="the quantize pod running")
    wait_qjob(kube_api, ns, name, lambda s: first in _stage(s, "quantize").get("pods", []), timeout=30)
    core.create_namespaced_pod_eviction(first, ns, {"metadata": {"name": first, "namespace": ns}})
    [second] = wait_for(lambda: [p for p in running_pods() if p != first], timeout=60, what="a replacement pod")
    core.patch_namespaced_pod(second, ns, {"metadata": {"annotations": {HOLD: "false"}}})
    obj = wait_qjob(
        kube_api,
        ns,
        name,
        lambda s: {x["name"]: x["phase"] for x in s.get("stages", [])}.get("quantize") == "Succeeded",
        timeout=60,
        operator=operator,
    )
    assert _stage(obj["status"], "quantize")["attempts"] == 2, obj["status"]
    artifacts = obj["status"]["artifacts"]
    assert artifacts
    # What a TTL on finished child Jobs does: the quantize Job and its pod go.
    client.BatchV1Api(kube_api).delete_namespaced_job(f"{name}-quantize", ns, propagation_policy="Foreground")
    wait_for(lambda: {j.metadata.name for j in jobs_of(kube_api, ns, name)} == {f"{name}-build-hopper"}, timeout=60)
    release(kube_api, ns, name, "build-hopper")
    obj = wait_qjob(kube_api, ns, name, phase_is("Succeeded", "Failed"), timeout=60, operator=operator)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert {j.metadata.name for j in jobs_of(kube_api, ns, name)} == {f"{name}-build-hopper"}  # never re-created
    assert obj["status"]["artifacts"] == artifacts


# ----------------------------------------------- every failure: reason, Event and metric (11, 12)


def test_failures_found_by_the_resync_post_events_and_count(kube_api, ns, operator):
    """Jobs failing by their pending deadline are found by the periodic resync, whose reconciles
    run outside any kopf handler: each still gets its Warning Event and its count."""
    before = counter(operator.metrics(), "qjob_failures_total", reason="Unschedulable")
    spec = basic_spec(engines=[], resources={"cpu": "5000", "memory": "4Gi"}, runPolicy={"pendingDeadlineSeconds": 6})
    names = [create_qjob(kube_api, ns, spec) for _ in range(4)]
    for name in names:
        wait_qjob(kube_api, ns, name, phase_is("Failed"), timeout=60, operator=operator)
    for name in names:
        wait_for(
            lambda n=name: [
                e
                for e in events_of(kube_api, ns, n)
                if e.reason == "Unschedulable" and e.type == "Warning" and "pendingDeadlineSeconds" in e.message
            ],
            timeout=20,
            what=f"Warning Event for {name}",
        )
    assert counter(operator.metrics(), "qjob_failures_total", reason="Unschedulable") - before == len(names)


def test_an_error_loop_backs_off_and_says_why_in_status(kube_api, ns, operator):
    # The apiserver refuses every Job create (quota of zero Jobs): retried, with backoff, and said.
    quota = {"metadata": {"name": "no-jobs"}, "spec": {"hard": {"count/jobs.batch": "0"}}}
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_resource_quota(ns, quota)
    name = create_qjob(kube_api, ns, basic_spec(engines=[]))

    def said(fragment):
        conditions = (get_qjob(kube_api, ns, name).get("status") or {}).get("conditions", [])
        return any(
            c["type"] == "Reconciled" and c["status"] == "False" and fragment in c["message"] for c in conditions
        )

    wait_for(lambda: said("exceeded quota") and said("retry 1 in 5s"), timeout=30, what="the first failure said")
    first = time.monotonic()
    wait_for(lambda: said("retry 2 in 10s"), timeout=30, what="the second failure said")
    # Neither the resync (every 2 s here) nor the events of the operator's own status writes
    # retried it sooner than 5 s (polling and the write make up the slack).
    assert time.monotonic() - first > 4
    assert operator.log_path.read_text().count(f"reconcile of {ns}/{name} failed") == 2
    core.delete_namespaced_resource_quota("no-jobs", ns)
    # A change to the job is retried at once (spec.runPolicy is the part that may change).
    custom_api(kube_api).patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name, {"spec": {"runPolicy": {"activeDeadlineSeconds": 7200}}}
    )
    obj = wait_qjob(kube_api, ns, name, phase_is("Succeeded"), timeout=30, operator=operator)
    condition = next(c for c in obj["status"]["conditions"] if c["type"] == "Reconciled")
    assert condition["status"] == "True"


# ------------------------------------------------------------------------------- identity (16)


def test_operator_requests_carry_its_user_agent(kube_api, ns, operator):
    """The apiserver names the manager of what a request writes after its User-Agent (up to the
    first /): the operator's Jobs and status writes are qjob-operator's, not OpenAPI-Generator's."""
    from qjob_operator.kube import user_agent

    product, _, release = user_agent().partition("/")
    assert product == "qjob-operator" and release.startswith("0.")
    name = create_qjob(kube_api, ns, basic_spec(engines=[]))
    obj = wait_qjob(kube_api, ns, name, phase_is("Succeeded", "Failed"), timeout=60, operator=operator)
    status_managers = {m["manager"] for m in obj["metadata"]["managedFields"] if m.get("subresource") == "status"}
    [job] = jobs_of(kube_api, ns, name)
    assert product in status_managers and product in {m.manager for m in job.metadata.managed_fields}


def test_operator_exposes_process_metrics_without_created_series(operator):
    text = operator.metrics()
    assert "process_resident_memory_bytes" in text and "process_open_fds" in text
    assert "qjob_api_requests_total" in text and "_created" not in text

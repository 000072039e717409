"""The operator against the real control plane: real apiserver (CRD schema + CEL), real
scheduler placing pods on simulated GPU nodes by label, real Job and GC controllers, real RBAC.
kwok plays the kubelet; pod annotations tell it how a runner pod ends (see
hack/localcluster/stages/pods.yaml)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from qjob_dev.localcluster import FAIL_EXIT_CODE_ANNOTATION as FAIL
from qjob_dev.localcluster import HOLD_ANNOTATION as HOLD
from qjob_dev.localcluster import TERMINATED_REASON_ANNOTATION as TERMINATED_REASON
from qjob_dev.localcluster import TERMINATION_MESSAGE_ANNOTATION as MESSAGE
from qjob_dev.qjobs import (
    GROUP,
    PLURAL,
    VERSION,
    create_qjob,
    custom_api,
    get_qjob,
    phase_is,
    qjob_manifest,
    wait_qjob,
)
from qjob_dev.runner_reports import post_report, report_token, runner_reporting
from qjob_dev.waits import wait_for

from tests.operator_fixtures import basic_spec

pytestmark = pytest.mark.cluster


def jobs_of(kube_api, namespace, name):
    return client.BatchV1Api(kube_api).list_namespaced_job(namespace, label_selector=f"qjob.dev/job-name={name}").items


def pods_of(kube_api, namespace, name, stage):
    return (
        client.CoreV1Api(kube_api)
        .list_namespaced_pod(namespace, label_selector=f"qjob.dev/job-name={name},qjob.dev/stage={stage}")
        .items
    )


def node_labels(kube_api, node):
    return client.CoreV1Api(kube_api).read_node(node).metadata.labels


def running_pod(kube_api, namespace, name, stage):
    return wait_for(
        lambda: next((p for p in pods_of(kube_api, namespace, name, stage) if p.status.phase == "Running"), None),
        timeout=60,
        what=f"{stage} pod of {name} running",
    )


def report(kube_api, operator, namespace, name, stage, body):
    """What the runner of that stage does: POST to the URL in its RunnerConfig with its pod's token."""
    pod = running_pod(kube_api, namespace, name, stage)
    reporting = runner_reporting(kube_api, namespace, f"{name}-{stage}")
    code, answer = post_report(reporting["url"], reporting["caCert"], report_token(kube_api, pod), body)
    assert code == 200, answer
    return answer


# ------------------------------------------------------------------------------- the happy path


def test_fp8_job_runs_on_the_right_architectures_and_succeeds(kube_api, ns, operator):
    spec = basic_spec(
        engines=[{"architecture": "hopper"}, {"architecture": "ada"}], scheduling={"podAnnotations": {HOLD: "true"}}
    )
    name = create_qjob(kube_api, ns, spec)

    # quantize first, on any GPU node; the runner reports progress to the operator's endpoint.
    running_pod(kube_api, ns, name, "quantize")
    [job] = jobs_of(kube_api, ns, name)
    assert job.metadata.owner_references[0].kind == "QuantizationJob"
    assert job.spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    report(kube_api, operator, ns, name, "quantize",
           {"step": "calibrate", "percent": 50, "etaSeconds": 30, "message": "batch 2/4"})  # fmt: skip
    obj = wait_qjob(kube_api, ns, name, lambda s: (s.get("progress") or {}).get("percent") == 30, operator=operator)
    assert obj["status"]["phase"] == "Running"
    assert obj["status"]["progress"]["stage"] == "quantize/calibrate"
    assert obj["status"]["runnerReports"]["quantize"]["message"] == "batch 2/4"

    # Artifacts and quality come from the runner's termination message, when its pod succeeded.
    artifact = {
        "kind": "checkpoint",
        "format": "hf",
        "uri": f"pvc://artifacts/{ns}/{name}/checkpoint-hf",
        "sizeBytes": 1234,
        "sha256": "ab" * 32,
    }
    result = {
        "outcome": "Succeeded",
        "stage": "quantize",
        "artifacts": [artifact],
        "quality": {"metric": "perplexity", "baseline": 10.0, "quantized": 10.2, "degradation": 0.02},
    }
    report(kube_api, operator, ns, name, "quantize", {"step": "report", "percent": 100})
    # The runner is done: release the held pod so kwok completes it (exit 0, that message).
    for pod in pods_of(kube_api, ns, name, "quantize"):
        client.CoreV1Api(kube_api).patch_namespaced_pod(
            pod.metadata.name, ns, {"metadata": {"annotations": {HOLD: "false", MESSAGE: json.dumps(result)}}}
        )

    # Then one build per architecture, each placed by the real scheduler on a node of that architecture.
    for stage, major, minor in (("build-hopper", "9", "0"), ("build-ada", "8", "9")):
        pods = wait_for(
            lambda stage=stage: [p for p in pods_of(kube_api, ns, name, stage) if p.spec.node_name],
            timeout=60,
            what=f"{stage} pod bound",
        )
        labels = node_labels(kube_api, pods[0].spec.node_name)
        assert (labels["nvidia.com/gpu.compute.major"], labels["nvidia.com/gpu.compute.minor"]) == (major, minor)
        for pod in pods:
            client.CoreV1Api(kube_api).patch_namespaced_pod(
                pod.metadata.name, ns, {"metadata": {"annotations": {HOLD: "false"}}}
            )

    obj = wait_qjob(kube_api, ns, name, phase_is("Succeeded", "Failed"), timeout=90, operator=operator)
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["percent"] == 100
    # The runner's report and its termination message (kwok's, naming its own checkpoint) are merged by uri.
    assert artifact in status["artifacts"] and len(status["artifacts"]) == 2
    assert status["quality"]["quantized"] == 10.2
    assert status["observedGeneration"] == 1
    assert status["targetArchitectures"] == "hopper,ada"
    stages = {s["name"]: s for s in status["stages"]}
    assert stages["build-hopper"]["gpuProduct"] == "NVIDIA-H100-80GB-HBM3"
    assert stages["build-ada"]["gpuProduct"].startswith("NVIDIA-L40S")
    assert all(s["phase"] == "Succeeded" and s["attempts"] == 1 for s in stages.values())
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Complete"]["status"] == "True"
    assert len(jobs_of(kube_api, ns, name)) == 3

    # One Event, for the outcome: the stages' progress is in status, not in Events. Events are
    # posted right after the status write that they describe.
    def events() -> list[tuple[str, str]]:
        core = client.CoreV1Api(kube_api)
        return [
            (e.type, e.reason)
            for e in core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
        ]

    wait_for(lambda: events(), timeout=10)
    assert events() == [("Normal", "Succeeded")]

    metrics = operator.metrics()
    assert 'qjob_jobs{phase="Succeeded"}' in metrics
    assert "qjob_stage_duration_seconds_count" in metrics and 'architecture="hopper"' in metrics
    assert "qjob_gpu_seconds_total" in metrics


# ------------------------------------------------------------------------------ failure reasons


def test_no_matching_nodes_is_reported_at_once_then_fails(kube_api, ns, operator):
    spec = basic_spec(resources={"minGpuMemory": "500Gi"}, runPolicy={"pendingDeadlineSeconds": 4})
    name = create_qjob(kube_api, ns, spec)
    obj = wait_qjob(kube_api, ns, name, lambda s: s.get("reason") == "NoMatchingNodes", timeout=20, operator=operator)
    assert "at least 512000 MiB per GPU" in obj["status"]["message"]
    assert jobs_of(kube_api, ns, name) == []
    obj = wait_qjob(kube_api, ns, name, phase_is("Failed"), timeout=30, operator=operator)
    assert obj["status"]["reason"] == "NoMatchingNodes"
    assert jobs_of(kube_api, ns, name) == []


def test_unschedulable_fails_after_pending_deadline(kube_api, ns, operator):
    # Nodes with the GPUs exist, but none has 5000 CPUs: the scheduler reports FailedScheduling.
    spec = basic_spec(engines=[], resources={"cpu": "5000", "memory": "4Gi"}, runPolicy={"pendingDeadlineSeconds": 5})
    name = create_qjob(kube_api, ns, spec)
    obj = wait_qjob(kube_api, ns, name, lambda s: s.get("reason") == "Unschedulable", timeout=30, operator=operator)
    assert "Insufficient cpu" in obj["status"]["message"]
    obj = wait_qjob(kube_api, ns, name, phase_is("Failed"), timeout=40, operator=operator)
    assert obj["status"]["reason"] == "Unschedulable"
    assert "pendingDeadlineSeconds" in obj["status"]["message"]
    wait_for(lambda: not jobs_of(kube_api, ns, name), timeout=30, what="unschedulable Job deleted")


@pytest.mark.parametrize(
    "annotations, backoff, reason, fragment",
    [
        (
            {
                FAIL: "2",
                MESSAGE: json.dumps(
                    {
                        "outcome": "Failed",
                        "stage": "quantize",
                        "exitCode": 2,
                        "message": "nvfp4 needs a CUDA GPU: run on a Blackwell node",
                    }
                ),
            },
            3,
            "InvalidConfig",
            "run on a Blackwell node",
        ),
        ({FAIL: "137", TERMINATED_REASON: "OOMKilled"}, 0, "OOMKilled", "raise spec.resources.memory"),
        (
            {FAIL: "1", MESSAGE: "Traceback (most recent call last): RuntimeError: boom"},
            1,
            "RunnerFailed",
            "RuntimeError: boom",
        ),
    ],
    ids=["InvalidConfig-not-retried", "OOMKilled", "RunnerFailed-after-retries"],
)
def test_runner_failures_are_classified(kube_api, ns, operator, annotations, backoff, reason, fragment):
    spec = basic_spec(engines=[], scheduling={"podAnnotations": annotations}, runPolicy={"backoffLimit": backoff})
    name = create_qjob(kube_api, ns, spec)
    obj = wait_qjob(kube_api, ns, name, phase_is("Failed", "Succeeded"), timeout=90, operator=operator)
    status = obj["status"]
    assert (status["phase"], status["reason"]) == ("Failed", reason), status
    assert fragment in status["message"]
    attempts = status["stages"][0]["attempts"]
    # Exit code 2 is "do not retry": the Job's podFailurePolicy stops at the first pod.
    assert attempts == (1 if reason == "InvalidConfig" else backoff + 1)

    def warning_posted():  # kopf posts Events in the background
        events = (
            client.CoreV1Api(kube_api).list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
        )
        return [e for e in events if e.reason == reason and e.type == "Warning"]

    wait_for(warning_posted, timeout=20, what=f"Warning Event {reason}")


def test_deadline_exceeded(kube_api, ns, operator):
    spec = basic_spec(engines=[], scheduling={"podAnnotations": {HOLD: "true"}}, runPolicy={"activeDeadlineSeconds": 3})
    name = create_qjob(kube_api, ns, spec)
    obj = wait_qjob(kube_api, ns, name, phase_is("Failed"), timeout=60, operator=operator)
    assert obj["status"]["reason"] == "DeadlineExceeded"


def _kubelet_patch(kube_api, ns, name, status):
    """Acts as the kubelet for a pod kwok leaves alone (label localcluster.qjob.dev/external)."""
    pod = wait_for(lambda: next(iter(pods_of(kube_api, ns, name, "quantize")), None), timeout=60, what="pod")
    wait_for(lambda: client.CoreV1Api(kube_api).read_namespaced_pod(pod.metadata.name, ns).spec.node_name, timeout=60)
    client.CoreV1Api(kube_api).patch_namespaced_pod_status(pod.metadata.name, ns, {"status": status})


def test_image_pull_error_fails_fast(kube_api, ns, operator):
    spec = basic_spec(engines=[], scheduling={"podLabels": {"localcluster.qjob.dev/external": "true"}})
    name = create_qjob(kube_api, ns, spec)
    _kubelet_patch(
        kube_api,
        ns,
        name,
        {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "runner",
                    "image": "registry.example/qjob-runner:test",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "manifest unknown"}},
                }
            ],
        },
    )
    obj = wait_qjob(kube_api, ns, name, phase_is("Failed"), timeout=30, operator=operator)
    assert obj["status"]["reason"] == "ImagePullError"
    assert "registry.example/qjob-runner:test" in obj["status"]["message"]


def test_evicted(kube_api, ns, operator):
    spec = basic_spec(
        engines=[], scheduling={"podLabels": {"localcluster.qjob.dev/external": "true"}}, runPolicy={"backoffLimit": 0}
    )
    name = create_qjob(kube_api, ns, spec)
    _kubelet_patch(
        kube_api, ns, name, {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}
    )
    obj = wait_qjob(kube_api, ns, name, phase_is("Failed"), timeout=60, operator=operator)
    assert obj["status"]["reason"] == "Evicted"
    assert "low on resource" in obj["status"]["message"]


def test_trust_remote_code_is_refused_by_policy(kube_api, ns, operator):
    spec = basic_spec()
    spec["model"]["trustRemoteCode"] = True
    name = create_qjob(kube_api, ns, spec)
    obj = wait_qjob(kube_api, ns, name, phase_is("Failed"), timeout=20, operator=operator)
    assert obj["status"]["reason"] == "PolicyViolation"
    assert jobs_of(kube_api, ns, name) == []


# ------------------------------------------------------------------------- validation by the apiserver


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.update(quantization={"format": "nvfp4"}), "NVFP4 needs Blackwell"),
        (lambda s: s.update(quantization={"format": "fp8", "kvCache": "nvfp4"}), "An NVFP4 KV cache needs Blackwell"),
        (
            lambda s: s.update(quantization={"format": "w4a8_awq"}, engines=[{"architecture": "blackwell"}]),
            "W4A8 AWQ needs Ada or Hopper",
        ),
        (lambda s: s["model"].update(pvc={"claimName": "models"}), "set exactly one model source"),
        (
            lambda s: s.update(quantization={}),
            "set exactly one of spec.quantization.format or spec.quantization.autoQuantize",
        ),
        (lambda s: s.update(export={"formats": ["onnx"]}), "ONNX export is for encoder models"),
        (lambda s: s["output"]["pvc"].update(path="/abs"), "path must be relative to the volume root"),
        (lambda s: s.update(engines=[{"architecture": "hopper"}, {"architecture": "hopper"}]), "Duplicate value"),
    ],
    ids=[
        "nvfp4-hopper",
        "nvfp4-kv-hopper",
        "w4a8-blackwell",
        "two-sources",
        "no-format",
        "onnx-llm",
        "abs-path",
        "dup-engine",
    ],
)
def test_invalid_objects_are_refused_with_a_clear_message(kube_api, namespace, crds, mutate, message):
    spec = basic_spec()
    mutate(spec)
    with pytest.raises(ApiException) as refused:
        custom_api(kube_api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, qjob_manifest("bad", spec)
        )
    assert refused.value.status == 422
    assert message in json.loads(refused.value.body)["message"]


def test_spec_is_immutable_except_run_policy(kube_api, ns, operator):
    name = create_qjob(
        kube_api, ns, basic_spec(runPolicy={"suspend": True}, scheduling={"podAnnotations": {HOLD: "true"}})
    )
    api = custom_api(kube_api)
    with pytest.raises(ApiException) as refused:
        api.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, name, {"spec": {"quantization": {"format": "int8_smoothquant"}}}
        )
    assert "only spec.runPolicy can change" in json.loads(refused.value.body)["message"]
    obj = wait_qjob(kube_api, ns, name, phase_is("Suspended"), timeout=20, operator=operator)
    assert jobs_of(kube_api, ns, name) == []
    api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, {"spec": {"runPolicy": {"suspend": False}}})
    wait_for(lambda: jobs_of(kube_api, ns, name), timeout=30, what="Job created after resume")
    wait_qjob(kube_api, ns, name, phase_is("Running"), timeout=60, operator=operator)
    assert obj["metadata"]["generation"] == 1

    # Suspending a running job suspends its Job: the Job controller removes the pod.
    api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, {"spec": {"runPolicy": {"suspend": True}}})
    wait_for(
        lambda: jobs_of(kube_api, ns, name)[0].spec.suspend and not pods_of(kube_api, ns, name, "quantize"),
        timeout=60,
        what="Job suspended and its pod gone",
    )
    wait_qjob(kube_api, ns, name, phase_is("Suspended"), timeout=30, operator=operator)
    api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, {"spec": {"runPolicy": {"suspend": False}}})
    wait_for(lambda: not jobs_of(kube_api, ns, name)[0].spec.suspend, timeout=30, what="Job resumed")


# ---------------------------------------------------------------------------- lifecycle & restart


def test_restart_mid_job_creates_no_duplicates_and_loses_no_status(kube_api, ns, operator):
    spec = basic_spec(engines=[{"architecture": "hopper"}], scheduling={"podAnnotations": {HOLD: "true"}})
    name = create_qjob(kube_api, ns, spec)
    report(kube_api, operator, ns, name, "quantize", {"step": "quantize", "percent": 80})
    before = wait_qjob(
        kube_api,
        ns,
        name,
        lambda s: s.get("phase") == "Running" and s["progress"]["percent"] == 48,
        timeout=30,
        operator=operator,
    )["status"]

    operator.kill()
    # While it is down, the runner finishes and the Job completes.
    for pod in pods_of(kube_api, ns, name, "quantize"):
        client.CoreV1Api(kube_api).patch_namespaced_pod(
            pod.metadata.name, ns, {"metadata": {"annotations": {HOLD: "false"}}}
        )
    wait_for(
        lambda: any(c.type == "Complete" for c in (jobs_of(kube_api, ns, name)[0].status.conditions or [])),
        timeout=60,
        what="quantize Job complete while the operator is down",
    )
    after_kill = get_qjob(kube_api, ns, name)["status"]
    assert after_kill["stages"] == before["stages"] and after_kill["phase"] == "Running"

    operator.start()
    wait_for(
        lambda: [p for p in pods_of(kube_api, ns, name, "build-hopper") if p.status.phase == "Running"], timeout=60
    )
    operator.kill()
    operator.start()  # a second restart while the build runs
    for pod in pods_of(kube_api, ns, name, "build-hopper"):
        client.CoreV1Api(kube_api).patch_namespaced_pod(
            pod.metadata.name, ns, {"metadata": {"annotations": {HOLD: "false"}}}
        )
    obj = wait_qjob(kube_api, ns, name, phase_is("Succeeded", "Failed"), timeout=60, operator=operator)
    assert obj["status"]["phase"] == "Succeeded"
    assert sorted(j.metadata.name for j in jobs_of(kube_api, ns, name)) == [f"{name}-build-hopper", f"{name}-quantize"]
    assert all(s["attempts"] == 1 for s in obj["status"]["stages"])
    assert obj["status"]["startTime"] == before["startTime"]


def test_delete_needs_no_operator_and_garbage_collects_children(kube_api, ns, operator):
    """No finalizer: a job (and its namespace) can be deleted while the operator is gone, as when
    it is uninstalled first; owner references take the children."""
    name = create_qjob(kube_api, ns, basic_spec(engines=[], scheduling={"podAnnotations": {HOLD: "true"}}))
    wait_for(lambda: pods_of(kube_api, ns, name, "quantize"), timeout=60, what="pod")
    assert not get_qjob(kube_api, ns, name)["metadata"].get("finalizers")
    operator.stop()
    try:
        custom_api(kube_api).delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        wait_for(lambda: not custom_api(kube_api).list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"],
                 timeout=30, what="the job deleted without the operator")  # fmt: skip
        wait_for(
            lambda: not jobs_of(kube_api, ns, name) and not pods_of(kube_api, ns, name, "quantize"),
            timeout=60,
            what="children garbage-collected",
        )
    finally:
        operator.start()


def test_finalizer_of_earlier_versions_is_removed(kube_api, ns, operator):
    doc = qjob_manifest("legacy", basic_spec(engines=[], runPolicy={"suspend": True}))
    doc["metadata"]["finalizers"] = ["qjob.dev/finalizer", "example.com/keep"]
    custom_api(kube_api).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, doc)
    wait_for(
        lambda: get_qjob(kube_api, ns, "legacy")["metadata"].get("finalizers") == ["example.com/keep"],
        timeout=30,
        what="qjob.dev/finalizer removed, other finalizers kept",
    )
    custom_api(kube_api).patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "legacy", {"metadata": {"finalizers": None}}
    )


def test_ttl_after_finished_deletes_the_job(kube_api, ns, operator):
    name = create_qjob(kube_api, ns, basic_spec(engines=[], runPolicy={"ttlSecondsAfterFinished": 2}))
    wait_qjob(kube_api, ns, name, phase_is("Succeeded"), timeout=60, operator=operator)

    def gone():
        try:
            get_qjob(kube_api, ns, name)
            return False
        except ApiException as exc:
            return exc.status == 404

    wait_for(gone, timeout=30, what="QuantizationJob deleted after its TTL")
    wait_for(lambda: not jobs_of(kube_api, ns, name), timeout=30, what="its Jobs garbage-collected")


def test_kueue_queue_name_creates_suspended_labelled_jobs(kube_api, ns, operator):
    name = create_qjob(kube_api, ns, basic_spec(engines=[], scheduling={"queueName": "gpu-queue"}))
    [job] = wait_for(lambda: jobs_of(kube_api, ns, name), timeout=30, what="Job")
    assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job.spec.suspend is True
    # Kueue admits by un-suspending; the operator must not fight it.
    client.BatchV1Api(kube_api).patch_namespaced_job(job.metadata.name, ns, {"spec": {"suspend": False}})
    obj = wait_qjob(kube_api, ns, name, phase_is("Succeeded"), timeout=60, operator=operator)
    assert obj["status"]["stages"][0]["phase"] == "Succeeded"
    assert datetime.fromisoformat(obj["status"]["completionTime"].replace("Z", "+00:00")) <= datetime.now(UTC)

"""Automatic sizing on the real control plane: the inspect pod's report becomes a plan, an OOM
becomes a bigger plan in a new Job, and a plan larger than one node becomes an Indexed Job whose
ranks the real scheduler spreads over simulated Hopper nodes, named by a headless Service.

Runner pods start held (kwok keeps them Running); the test then ends each one the way a runner
would, by annotating it (hack/localcluster/stages/pods.yaml)."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from qjob_dev.localcluster import FAIL_EXIT_CODE_ANNOTATION as FAIL
from qjob_dev.localcluster import HOLD_ANNOTATION as HOLD
from qjob_dev.localcluster import TERMINATION_MESSAGE_ANNOTATION as MESSAGE
from qjob_dev.model_sizes import LLAMA_8B, LLAMA_405B
from qjob_dev.qjobs import create_qjob, get_qjob
from qjob_dev.waits import wait_for

from tests.operator_fixtures import basic_spec

pytestmark = pytest.mark.cluster

JOB_NAME = "batch.kubernetes.io/job-name"


def auto_spec(size) -> dict:
    # One summary for every pod of the job (kwok reads it from the pod annotation): the model size
    # for inspect, and an artifact, since a stage that exits 0 without one fails (NoArtifacts).
    artifact = {"kind": "checkpoint", "format": "hf", "uri": "pvc://artifacts/checkpoint-hf"}
    inspected = {"outcome": "Succeeded", "stage": "inspect", "modelSize": size.to_api(), "artifacts": [artifact]}
    return basic_spec(
        engines=[],
        resources={"gpus": 0, "cpu": "1", "memory": "4Gi"},
        calibration={
            "dataset": {"configMap": {"name": "calibration", "key": "samples.jsonl"}},
            "samples": 64,
            "batchSize": 16,
        },
        scheduling={
            "calibrationArchitecture": "hopper",
            "podAnnotations": {HOLD: "true", MESSAGE: json.dumps(inspected)},
        },
    )


def pods_of_job(kube_api, namespace, job_name, count=1, timeout=60):
    core = client.CoreV1Api(kube_api)
    found = {}

    def placed():
        pods = core.list_namespaced_pod(namespace, label_selector=f"{JOB_NAME}={job_name}").items
        found["pods"] = [p for p in pods if p.spec.node_name and not p.metadata.deletion_timestamp]
        return len(found["pods"]) == count

    wait_for(placed, timeout=timeout, what=f"{count} placed pod(s) of Job {job_name}")
    return found["pods"]


def finish(kube_api, pod, exit_code: int | None = None):
    """Let a held pod end: succeed, or fail with the runner's exit code."""
    annotations = {HOLD: "false", **({FAIL: str(exit_code)} if exit_code is not None else {})}
    client.CoreV1Api(kube_api).patch_namespaced_pod(
        pod.metadata.name, pod.metadata.namespace, {"metadata": {"annotations": annotations}}
    )


def wait_status(kube_api, namespace, name, pred, what, timeout=60):
    last = {}

    def check():
        last["status"] = get_qjob(kube_api, namespace, name).get("status") or {}
        return pred(last["status"])

    try:
        wait_for(check, timeout=timeout, what=what)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\nstatus: {json.dumps(last.get('status'), indent=1)[:4000]}") from None
    return last["status"]


def run_inspect(kube_api, ns, name):
    (inspect,) = pods_of_job(kube_api, ns, f"{name}-inspect")
    assert "nvidia.com/gpu" not in (inspect.spec.containers[0].resources.limits or {})
    finish(kube_api, inspect)
    return wait_status(kube_api, ns, name, lambda s: s.get("plans"), "the first plan from the inspect report")


def test_oom_replans_bigger_in_a_new_job(kube_api, ns):
    name = create_qjob(kube_api, ns, auto_spec(LLAMA_8B))
    status = run_inspect(kube_api, ns, name)
    assert status["modelSize"]["weightBytes"] == LLAMA_8B.weight_bytes
    (first,) = status["plans"]
    assert (first["jobName"], first["gpusPerPod"], first["pods"], first["gpuMemoryMib"]) == (
        f"{name}-quantize",
        1,
        1,
        81559,
    )
    (pod,) = pods_of_job(kube_api, ns, first["jobName"])
    assert pod.spec.node_name.startswith("hopper-")
    finish(kube_api, pod, exit_code=76)  # the runner caught a CUDA out-of-memory error

    status = wait_status(kube_api, ns, name, lambda s: len(s.get("plans", [])) == 2, "a second, bigger plan")
    failed, second = status["plans"]
    assert failed["outcome"] == "OOMKilled"
    assert second["jobName"] == f"{name}-quantize-2"
    # Bigger: more GPUs, or layer-wise calibration, or a smaller batch; never the same plan.
    grew = (second["gpusPerPod"] * second["pods"], second["layerwise"], -second["batchSize"])
    assert grew > (first["gpusPerPod"] * first["pods"], first["layerwise"], -first["batchSize"])
    assert "ran out of memory" in second["reason"] and second["estimate"]["correction"] > 1
    (pod,) = pods_of_job(kube_api, ns, second["jobName"])
    assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == str(second["gpusPerPod"])
    finish(kube_api, pod)

    status = wait_status(kube_api, ns, name, lambda s: s.get("phase") == "Succeeded", "Succeeded on attempt 2")
    assert [p["outcome"] for p in status["plans"]] == ["OOMKilled", "Succeeded"]
    quantize = next(s for s in status["stages"] if s["name"] == "quantize")
    assert quantize["jobName"] == f"{name}-quantize-2"


def wait_nodes_idle(kube_api, prefix, timeout=120):
    """Until no pod holds GPUs on the nodes named ``prefix*``: held runner pods of earlier tests
    stay until their namespace is gone (the Job controller must drop its finalizer first)."""
    core = client.CoreV1Api(kube_api)
    busy = {}

    def idle():
        busy["pods"] = [
            f"{p.metadata.namespace}/{p.metadata.name} on {p.spec.node_name}"
            for p in core.list_pod_for_all_namespaces().items
            if (p.spec.node_name or "").startswith(prefix) and p.status.phase in ("Pending", "Running")
        ]
        return not busy["pods"]

    try:
        wait_for(idle, timeout=timeout, what=f"no pod on the {prefix}* nodes")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {busy['pods']}") from None


def test_multi_node_stage_spreads_ranks_and_retries_as_a_whole(kube_api, ns):
    # Two ranks of 8 GPUs need both 8-GPU H100 nodes whole.
    wait_nodes_idle(kube_api, "hopper-h100-")
    name = create_qjob(kube_api, ns, auto_spec(LLAMA_405B))
    (plan,) = run_inspect(kube_api, ns, name)["plans"]
    assert (plan["pods"], plan["gpusPerPod"]) == (2, 8)  # 812 GB of weights: two 8 x H100 nodes
    job_name = plan["jobName"]

    pods = pods_of_job(kube_api, ns, job_name, count=2)
    core = client.CoreV1Api(kube_api)
    nodes = {p.spec.node_name for p in pods}
    assert len(nodes) == 2 and all(n.startswith("hopper-h100-") for n in nodes)
    by_index = {p.metadata.annotations["batch.kubernetes.io/job-completion-index"]: p for p in pods}
    assert sorted(by_index) == ["0", "1"]
    for index, pod in by_index.items():
        assert (pod.spec.hostname, pod.spec.subdomain) == (f"{job_name}-{index}", job_name)
        env = {e.name: e for e in pod.spec.containers[0].env}
        assert env["MASTER_ADDR"].value == f"{job_name}-0.{job_name}.{ns}.svc"
        assert (env["NNODES"].value, env["NPROC_PER_NODE"].value, env["WORLD_SIZE"].value) == ("2", "8", "16")
        assert "job-completion-index" in env["NODE_RANK"].value_from.field_ref.field_path
        assert pod.spec.containers[0].command == ["python", "-m", "qjob_runner.launch"]
    service = core.read_namespaced_service(job_name, ns)
    assert service.spec.cluster_ip == "None" and service.spec.selector == {JOB_NAME: job_name}

    # The endpoints controller publishes both ranks under their hostnames: rank 0's DNS name resolves.
    discovery = client.DiscoveryV1Api(kube_api)

    def published():
        slices = discovery.list_namespaced_endpoint_slice(ns, label_selector=f"kubernetes.io/service-name={job_name}")
        return {e.hostname for s in slices.items for e in s.endpoints or []} == {f"{job_name}-0", f"{job_name}-1"}

    wait_for(published, timeout=60, what="both ranks in the headless Service's EndpointSlice")

    finish(kube_api, by_index["1"], exit_code=75)  # one rank fails (a transient error)
    status = wait_status(kube_api, ns, name, lambda s: len(s.get("plans", [])) == 2, "the whole stage retried")
    failed, again = status["plans"]
    assert failed["outcome"] == "RunnerFailed"
    assert (again["pods"], again["gpusPerPod"], again["jobName"]) == (2, 8, f"{name}-quantize-2")
    batch = client.BatchV1Api(kube_api)
    wait_for(
        lambda: any(
            c.type == "Failed" and c.status == "True"
            for c in batch.read_namespaced_job(job_name, ns).status.conditions or []
        ),
        timeout=30,
        what="the first attempt's Job failed as a whole",
    )
    wait_for(lambda: not pods_alive(kube_api, ns, job_name), timeout=30, what="rank 0 of the failed attempt stopped")

    for pod in pods_of_job(kube_api, ns, again["jobName"], count=2):
        finish(kube_api, pod)
    status = wait_status(kube_api, ns, name, lambda s: s.get("phase") == "Succeeded", "Succeeded on attempt 2")
    assert [p["outcome"] for p in status["plans"]] == ["RunnerFailed", "Succeeded"]


def pods_alive(kube_api, ns, job_name):
    pods = client.CoreV1Api(kube_api).list_namespaced_pod(ns, label_selector=f"{JOB_NAME}={job_name}").items
    return [p for p in pods if p.status.phase in ("Pending", "Running") and not p.metadata.deletion_timestamp]


def test_model_too_big_for_the_policy_is_refused_at_once(kube_api, ns):
    huge = LLAMA_405B.model_copy(
        update={"weight_bytes": LLAMA_405B.weight_bytes * 3, "parameters": LLAMA_405B.parameters * 3}
    )
    name = create_qjob(kube_api, ns, auto_spec(huge))
    (inspect,) = pods_of_job(kube_api, ns, f"{name}-inspect")
    finish(kube_api, inspect)
    status = wait_status(kube_api, ns, name, lambda s: s.get("phase") == "Failed", "refused after inspect")
    assert status["reason"] == "NoMatchingNodes" and "GB of BF16 weights" in status["message"]
    assert not pods_alive(kube_api, ns, f"{name}-quantize")

"""status.observe + status.decide: observed children -> status and actions, one scenario per reason."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from qjob_api.v1alpha1 import QuantizationJobSpec
from qjob_operator.plan import plan_stages
from qjob_operator.reconciler import apply_merge_patch, merge_patch
from qjob_operator.status import decide, fmt_time, observe, transition_events

from .conftest import NOW, cr_body, fitted, gpu_node

HOPPER = gpu_node("h100-0", "9", "0")
ADA = gpu_node("l40s-0", "8", "9", memory=46068, product="NVIDIA-L40S")


def job(
    stage: str, condition: str | None = None, reason: str = "", created: str = "2026-11-22T11:59:30Z", suspend=False
):
    status = (
        {
            "conditions": [
                {
                    "type": condition,
                    "status": "True",
                    "reason": reason,
                    "message": "m",
                    "lastTransitionTime": "2026-11-22T11:59:50Z",
                }
            ]
        }
        if condition
        else {"active": 1}
    )
    return {
        "metadata": {"name": f"llama-{stage}", "uid": f"job-uid-{stage}", "creationTimestamp": created},
        "spec": {"suspend": suspend},
        "status": status,
    }


def pod(phase="Running", node="h100-0", terminated=None, waiting=None, reason=None, conditions=None,
        owner="job-uid-quantize"):  # fmt: skip
    state = {"terminated": terminated} if terminated else {"waiting": waiting} if waiting else {"running": {}}
    status = {
        "phase": phase,
        "startTime": "2026-11-22T11:59:40Z" if node else None,
        "containerStatuses": [{"name": "runner", "state": state}],
        "conditions": conditions or [],
    }
    if reason:
        status["reason"] = reason
    return {
        "metadata": {
            "name": "p",
            "creationTimestamp": "2026-11-22T11:59:35Z",
            "ownerReferences": [{"kind": "Job", "uid": owner, "controller": True}],
        },
        "spec": {"nodeName": node, "containers": [{"name": "runner", "image": "runner:1"}]},
        "status": status,
    }


def run(
    spec_dict, config, jobs=None, pods=None, nodes=(HOPPER, ADA), status=None, now=NOW, created="2026-11-22T11:59:00Z"
):
    spec = QuantizationJobSpec.model_validate(spec_dict)
    stages = plan_stages(spec, config)
    body = cr_body(spec_dict, status, created)
    return decide(observe(body, stages, jobs or {}, pods or {}, fitted(nodes, config), now), spec, stages, config)


def around_pending_deadline(spec_dict, config, quantize_job, quantize_pods):
    """The decisions for a quantize stage stuck as given: when first seen, and once the pending
    deadline (600 s by default, from the job's creation a minute before NOW) has passed."""
    stuck = {"jobs": {"quantize": quantize_job}, "pods": {"quantize": quantize_pods}}
    return run(spec_dict, config, **stuck), run(spec_dict, config, **stuck, now=NOW + timedelta(minutes=11))


def test_new_job_creates_quantize_stage_only(spec_dict, config):
    d = run(spec_dict, config)
    assert [s.name for s in d.create] == ["quantize"]
    assert d.status["phase"] == "Pending"
    stages = {s["name"]: s for s in d.status["stages"]}
    assert stages["build-hopper"]["reason"] == "WaitingForDependencies"
    assert d.status["targetArchitectures"] == "hopper"


def test_no_matching_nodes_says_so_at_once_and_creates_nothing(spec_dict, config):
    spec_dict["quantization"] = {"format": "nvfp4"}
    spec_dict["engines"] = [{"architecture": "blackwell"}]
    d = run(spec_dict, config)
    assert d.create == []
    assert d.status["phase"] == "Pending" and d.status["reason"] == "NoMatchingNodes"
    assert "blackwell GPUs (compute capability 10.0 or 10.3)" in d.status["message"]
    cond = {c["type"]: c for c in d.status["conditions"]}["NodesAvailable"]
    assert cond["status"] == "False" and cond["reason"] == "NoMatchingNodes"
    assert d.requeue_after == pytest.approx(600 - 60 + 0.5)


def test_no_matching_nodes_fails_after_pending_deadline(spec_dict, config):
    spec_dict["engines"] = [{"architecture": "blackwell"}]
    d = run(spec_dict, config, now=NOW + timedelta(minutes=20))
    assert d.status["phase"] == "Failed" and d.status["reason"] == "NoMatchingNodes"


def test_too_many_gpus_or_too_little_memory_has_no_node(spec_dict, config):
    spec_dict["resources"] = {"gpus": 8, "minGpuMemory": "100Gi"}
    d = run(spec_dict, config)
    assert d.status["reason"] == "NoMatchingNodes" and "102400 MiB" in d.status["message"]


def test_build_starts_after_quantize_succeeds_with_artifacts(spec_dict, config):
    result = {
        "outcome": "Succeeded",
        "stage": "quantize",
        "artifacts": [{"kind": "checkpoint", "format": "hf", "uri": "pvc://artifacts/ml/llama/checkpoint-hf"}],
    }
    done = pod("Succeeded", terminated={"exitCode": 0, "message": json.dumps(result)})
    d = run(spec_dict, config, jobs={"quantize": job("quantize", "Complete")}, pods={"quantize": [done]})
    assert [s.name for s in d.create] == ["build-hopper"]
    assert d.status["phase"] == "Running"  # between stages: still running, not back to Pending
    assert d.status["artifacts"][0]["uri"].endswith("checkpoint-hf")
    assert d.status["progress"]["percent"] == 60


def test_artifacts_come_only_from_succeeded_pods_of_the_stages_job(spec_dict, config):
    forged = {"kind": "checkpoint", "format": "hf", "uri": "pvc://artifacts/forged"}
    result = {"outcome": "Succeeded", "stage": "quantize", "artifacts": [forged]}
    message = {"exitCode": 0, "message": json.dumps(result)}
    stranger = pod("Succeeded", terminated=message, owner="someone-elses-job")  # has the stage's labels only
    still_running = pod("Running", terminated=message)  # a running pod's claim is no outcome
    jobs = {"quantize": job("quantize")}
    d = run(spec_dict, config, jobs=jobs, pods={"quantize": [stranger, still_running]})
    assert d.status["artifacts"] == [] and d.status["phase"] != "Succeeded"


def succeeded_pod(stage: str = "quantize", **result) -> dict:
    """A runner pod that exited 0 with the runner's JSON summary as its termination message."""
    summary = {
        "outcome": "Succeeded",
        "stage": stage,
        "artifacts": [{"kind": "checkpoint", "format": "hf", "uri": f"pvc://artifacts/ml/llama/{stage}"}],
        **result,
    }
    return pod("Succeeded", terminated={"exitCode": 0, "message": json.dumps(summary)})


def both_stages_complete(quantize_pod: dict, build_pod: dict) -> dict:
    """``run``'s jobs and pods once the quantize and build-hopper Jobs completed with these pods."""
    jobs = {"quantize": job("quantize", "Complete"), "build-hopper": job("build-hopper", "Complete")}
    return {"jobs": jobs, "pods": {"quantize": [quantize_pod], "build-hopper": [build_pod]}}


def test_all_stages_succeeded(spec_dict, config):
    d = run(spec_dict, config, **both_stages_complete(succeeded_pod(), succeeded_pod("build-hopper")))
    assert d.status["phase"] == "Succeeded"
    assert d.status["progress"]["percent"] == 100
    assert {c["type"]: c["status"] for c in d.status["conditions"]}["Complete"] == "True"
    assert d.status["completionTime"] == fmt_time(NOW)


def test_running_progress_comes_from_runner_report(spec_dict, config):
    status = {
        "runnerReports": {"quantize": {"step": "calibrate", "percent": 50, "etaSeconds": 120, "message": "batch 4/8"}}
    }
    d = run(spec_dict, config, jobs={"quantize": job("quantize")}, pods={"quantize": [pod()]}, status=status)
    assert d.status["phase"] == "Running"
    assert d.status["progress"] == {
        "stage": "quantize/calibrate",
        "percent": 30,
        "etaSeconds": 120,
        "message": "batch 4/8",
    }
    stage = d.status["stages"][0]
    assert stage["node"] == "h100-0" and stage["gpuProduct"] == "NVIDIA-H100-80GB-HBM3"


@pytest.mark.parametrize(
    "terminated, pod_reason, reason, fragment",
    [
        ({"exitCode": 137, "reason": "OOMKilled"}, None, "OOMKilled", "raise spec.resources.memory"),
        (
            {
                "exitCode": 76,
                "message": json.dumps({"outcome": "Failed", "stage": "quantize", "message": "CUDA out of memory"}),
            },
            None,
            "OOMKilled",
            "CUDA out of memory",
        ),
        (
            {
                "exitCode": 2,
                "message": json.dumps(
                    {"outcome": "Failed", "stage": "quantize", "exitCode": 2, "message": "nvfp4 needs CUDA"}
                ),
            },
            None,
            "InvalidConfig",
            "nvfp4 needs CUDA",
        ),
        ({"exitCode": 1, "message": "Traceback: boom"}, None, "RunnerFailed", "Traceback: boom"),
        (
            {
                "exitCode": 77,
                "message": json.dumps(
                    {"outcome": "Failed", "stage": "quantize", "exitCode": 77, "message": "could not meet rank 0"}
                ),
            },
            None,
            "RendezvousFailed",
            "could not meet rank 0",
        ),
        (None, "Evicted", "Evicted", "evicted"),
    ],
)
def test_failed_stage_reasons(spec_dict, config, terminated, pod_reason, reason, fragment):
    failed = pod("Failed", terminated=terminated, reason=pod_reason)
    jobs = {"quantize": job("quantize", "Failed", "BackoffLimitExceeded")}
    d = run(spec_dict, config, jobs=jobs, pods={"quantize": [failed]})
    assert d.status["phase"] == "Failed" and d.status["reason"] == reason
    assert fragment in d.status["message"]
    assert d.create == []


def test_deadline_exceeded(spec_dict, config):
    d = run(spec_dict, config, jobs={"quantize": job("quantize", "Failed", "DeadlineExceeded")}, pods={"quantize": []})
    assert d.status["reason"] == "DeadlineExceeded"


def test_image_pull_error_fails_fast_and_stops_the_job(spec_dict, config):
    waiting = pod("Pending", waiting={"reason": "ImagePullBackOff", "message": "not found"})
    d = run(spec_dict, config, jobs={"quantize": job("quantize")}, pods={"quantize": [waiting]})
    assert d.status["reason"] == "ImagePullError" and "runner:1" in d.status["message"]
    assert d.delete_stage_jobs == ["llama-quantize"]


def test_unschedulable_waits_then_fails_after_pending_deadline(spec_dict, config):
    unsched = pod(
        "Pending",
        node=None,
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/5 nodes are available: 5 Insufficient nvidia.com/gpu.",
            }
        ],
    )
    early, late = around_pending_deadline(spec_dict, config, job("quantize"), [unsched])
    assert early.status["phase"] == "Pending" and early.status["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in early.status["message"]
    assert late.status["phase"] == "Failed" and late.status["reason"] == "Unschedulable"
    assert "pendingDeadlineSeconds" in late.status["message"]
    assert late.delete_stage_jobs == ["llama-quantize"]


def test_trust_remote_code_refused_by_policy(spec_dict, config):
    spec_dict["model"]["trustRemoteCode"] = True
    d = run(spec_dict, config)
    assert d.status["phase"] == "Failed" and d.status["reason"] == "PolicyViolation"
    assert "policy.allowTrustRemoteCode" in d.status["message"]
    assert d.create == []


def test_unservable_spec_is_refused_by_the_operator_too(spec_dict, config):
    """An object an older CRD let in: the operator's own check (same table, same words) fails it."""
    spec_dict["quantization"] = {"format": "int4_awq"}
    spec_dict["serving"] = {"runtimes": [{"name": "vllm"}]}
    d = run(spec_dict, config)
    assert d.status["phase"] == "Failed" and d.status["reason"] == "InvalidSpec"
    assert d.status["message"].startswith("vLLM cannot load int4_awq checkpoints from ModelOpt: choose fp8")
    accepted = {c["type"]: c for c in d.status["conditions"]}["Accepted"]
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpec"
    assert d.create == []


def test_blackwell_rtx_needs_12x_nodes(spec_dict, config):
    spec_dict["engines"] = [{"architecture": "blackwell-rtx"}]
    b200 = gpu_node("b200-0", "10", "0", product="NVIDIA-B200")
    rtx = gpu_node("rtx-0", "12", "0", product="NVIDIA-RTX-PRO-6000-Blackwell")
    assert run(spec_dict, config, nodes=(HOPPER, b200)).status["reason"] == "NoMatchingNodes"
    placed = run(spec_dict, config, nodes=(HOPPER, b200, rtx))
    assert placed.status["reason"] != "NoMatchingNodes" and [s.name for s in placed.create] == ["quantize"]


def test_suspended_job_creates_nothing(spec_dict, config):
    spec_dict["runPolicy"] = {"suspend": True}
    d = run(spec_dict, config)
    assert d.status["phase"] == "Suspended" and d.create == []


def test_suspending_a_running_job_suspends_its_jobs_and_resuming_undoes_it(spec_dict, config):
    spec_dict["runPolicy"] = {"suspend": True}
    d = run(spec_dict, config, jobs={"quantize": job("quantize")}, pods={"quantize": []})
    assert d.suspend_stage_jobs == {"llama-quantize": True}
    spec_dict["runPolicy"] = {"suspend": False}
    d = run(spec_dict, config, jobs={"quantize": job("quantize", suspend=True)}, pods={"quantize": []})
    assert d.suspend_stage_jobs == {"llama-quantize": False}
    spec_dict["scheduling"] = {"queueName": "gpus"}  # Kueue's to decide
    assert (
        run(
            spec_dict, config, jobs={"quantize": job("quantize", suspend=True)}, pods={"quantize": []}
        ).suspend_stage_jobs
        == {}
    )


def test_ttl_deletes_finished_job(spec_dict, config):
    spec_dict["runPolicy"] = {"ttlSecondsAfterFinished": 60}
    status = {"phase": "Succeeded", "completionTime": fmt_time(NOW - timedelta(seconds=30))}
    assert run(spec_dict, config, status=status).requeue_after == pytest.approx(30)
    assert run(spec_dict, config, status=status, now=NOW + timedelta(seconds=31)).delete_self


def test_merge_patch_sends_nulls_for_removed_keys_and_skips_unchanged():
    old = {"phase": "Running", "progress": {"percent": 10, "etaSeconds": 5}, "stages": [1]}
    new = {"phase": "Running", "progress": {"percent": 20}, "stages": [1]}
    patch = merge_patch(old, new)
    assert patch == {"progress": {"percent": 20, "etaSeconds": None}}
    assert apply_merge_patch(old, patch) == new
    assert merge_patch(new, new) == {}


def test_events_only_for_outcomes_and_stuck_jobs():
    old = {"phase": "Pending", "reason": "Pending", "stages": [{"name": "quantize", "phase": "Pending"}]}
    new = {
        "phase": "Running",
        "reason": "Running",
        "message": "running quantize",
        "stages": [{"name": "quantize", "phase": "Running", "node": "h100-0", "gpuProduct": "H100"}],
    }
    # Starting, and stage changes, are in status: no Event (it would cost a write per change).
    assert transition_events(old, new) == []
    assert transition_events(new, new) == []
    between = {**new, "message": "starting the next stage", "stages": new["stages"]}
    assert transition_events(new, {**between, "reason": "Running"}) == []
    # Getting stuck is news...
    stuck = transition_events(new, {**new, "reason": "Unschedulable", "message": "stage build-hopper: 0/6 nodes"})
    assert [(e.type, e.reason) for e in stuck] == [("Warning", "Unschedulable")]
    # ... and so is the outcome, once.
    done = {**new, "phase": "Succeeded", "reason": "Succeeded", "message": "2 artifact(s) written"}
    assert [(e.type, e.reason, e.message) for e in transition_events(new, done)] == [
        ("Normal", "Succeeded", "2 artifact(s) written")
    ]
    failed = {**new, "phase": "Failed", "reason": "OOMKilled", "message": "stage quantize: out of memory"}
    assert [(e.type, e.reason) for e in transition_events(new, failed)] == [("Warning", "OOMKilled")]
    assert transition_events(done, done) == []

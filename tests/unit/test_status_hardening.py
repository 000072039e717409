"""status.decide on the ways a job used to end wrongly or never: exit 0 without work, a finished
stage whose Job is gone, a failure that left pods running, pods that can never be created."""

from __future__ import annotations

from .test_status import around_pending_deadline, both_stages_complete, job, pod, run, succeeded_pod


def _both_done(**quantize_result):
    return both_stages_complete(succeeded_pod(**quantize_result), pod("Succeeded"))


def test_exit_0_without_artifacts_is_a_failure_with_a_reason(spec_dict, config):
    d = run(spec_dict, config, **both_stages_complete(pod("Succeeded"), pod("Succeeded")))
    assert d.status["phase"] == "Failed" and d.status["reason"] == "NoArtifacts"
    assert "runner.image" in d.status["message"]


def test_a_gate_without_a_quality_measurement_is_a_failure(spec_dict, config):
    spec_dict["evaluation"] = {"gate": {"maxPerplexityIncrease": 0.05}}
    d = run(spec_dict, config, **_both_done())
    assert d.status["reason"] == "QualityNotMeasured" and "spec.evaluation.gate" in d.status["message"]
    measured = {"metric": "perplexity", "baseline": 10.0, "quantized": 10.2, "gatePassed": True}
    assert run(spec_dict, config, **_both_done(quality=measured)).status["phase"] == "Succeeded"
    failed_gate = {**measured, "gatePassed": False}
    assert run(spec_dict, config, **_both_done(quality=failed_gate)).status["reason"] == "QualityGateFailed"


def test_a_finished_stage_whose_job_is_gone_is_never_rerun(spec_dict, config):
    first = run(spec_dict, config, jobs={"quantize": job("quantize", "Complete")}, pods={"quantize": [succeeded_pod()]})
    assert [s.name for s in first.create] == ["build-hopper"]
    # The quantize Job and its pod are deleted (a TTL on child Jobs); the build is running.
    later = run(
        spec_dict,
        config,
        jobs={"build-hopper": job("build-hopper")},
        pods={"build-hopper": [pod()]},
        status=first.status,
    )
    assert later.create == []
    stages = {s["name"]: s for s in later.status["stages"]}
    assert stages["quantize"]["phase"] == "Succeeded" and stages["quantize"]["node"] == "h100-0"
    assert later.status["artifacts"] == first.status["artifacts"]  # nothing lost with the pod
    # And with every Job gone after the build finished, the job still completes without redoing work.
    build_done = run(
        spec_dict,
        config,
        jobs={"build-hopper": job("build-hopper", "Complete")},
        pods={"build-hopper": [pod("Succeeded")]},
        status=later.status,
    )
    assert build_done.status["phase"] == "Succeeded" and build_done.create == []


def test_a_failed_job_stops_every_job_it_started(spec_dict, config):
    # Running, then the platform lowers the policy: the job fails and its GPU pods must go.
    config.policy.max_gpus_per_pod = 1
    spec_dict["resources"] = {"gpus": 2}
    d = run(spec_dict, config, jobs={"quantize": job("quantize")}, pods={"quantize": [pod()]})
    assert d.status["reason"] == "PolicyViolation"
    assert d.delete_stage_jobs == ["llama-quantize"]


def test_a_job_whose_pods_are_never_created_fails_by_the_pending_deadline(spec_dict, config):
    spec_dict["scheduling"] = {"priorityClassName": "missing"}
    quantize = job("quantize")  # active, but the Job controller's pod creates are refused
    quantize["status"] = {}
    early, late = around_pending_deadline(spec_dict, config, quantize, [])
    assert early.status["phase"] == "Pending"
    assert late.status["phase"] == "Failed" and late.status["reason"] == "PodsNotCreated"
    assert "kubectl describe job llama-quantize" in late.status["message"]


def test_a_missing_secret_fails_by_the_pending_deadline_naming_it(spec_dict, config):
    waiting = {"reason": "CreateContainerConfigError", "message": 'secret "hf-token" not found'}
    stuck = pod("Pending", waiting=waiting)  # the kubelet set startTime, the container never started
    early, late = around_pending_deadline(spec_dict, config, job("quantize"), [stuck])
    assert early.status["reason"] == "ContainerConfigError" and 'secret "hf-token" not found' in early.status["message"]
    assert early.status["phase"] not in ("Failed", "Succeeded")  # the Secret may still be created
    assert late.status["phase"] == "Failed" and late.status["reason"] == "ContainerConfigError"
    assert "hf-token" in late.status["message"] and "pendingDeadlineSeconds" in late.status["message"]


def test_policy_decides_what_job_authors_may_set_on_runner_pods(spec_dict, config):
    def problems(scheduling, **policy):
        spec_dict["scheduling"] = scheduling
        for key, value in policy.items():
            setattr(config.policy, key, value)
        d = run(spec_dict, config)
        return d.status["message"] if d.status["reason"] == "PolicyViolation" else None

    assert "system-cluster-critical" in problems({"priorityClassName": "system-cluster-critical"})
    assert problems({"priorityClassName": "batch-low"}) is None
    assert "'batch-low'" in problems({"priorityClassName": "batch-low"}, allowed_priority_classes=["gpu-high"])
    assert "tolerates every taint" in problems({"tolerations": [{"operator": "Exists"}]})
    assert problems({"tolerations": [{"operator": "Exists"}]}, allow_tolerate_all=True) is None
    key = {"tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists"}]}
    assert "unreachable" in problems(key, allowed_toleration_keys=["nvidia.com/gpu"])
    assert "['zone']" in problems({"nodeSelector": {"zone": "a"}}, allowed_node_selector_keys=["pool"])


def test_start_times_and_attempts_survive_their_pods(spec_dict, config):
    """The node under a running stage is deleted: its pod goes, a new one starts elsewhere."""
    first = run(spec_dict, config, jobs={"quantize": job("quantize")}, pods={"quantize": [pod()]})
    assert first.status["startTime"] == "2026-11-22T11:59:40Z"
    replacement = pod()
    replacement["metadata"]["name"] = "p2"
    replacement["status"]["startTime"] = "2026-11-22T12:05:00Z"
    # The old pod is gone (not counted by the Job: a disruption), the new one not created yet.
    between = run(spec_dict, config, jobs={"quantize": job("quantize")}, pods={"quantize": []}, status=first.status)
    later = run(
        spec_dict, config, jobs={"quantize": job("quantize")}, pods={"quantize": [replacement]}, status=between.status
    )
    stages = {s["name"]: s for s in later.status["stages"]}
    assert later.status["startTime"] == first.status["startTime"]
    assert stages["quantize"]["startTime"] == "2026-11-22T11:59:40Z"
    assert stages["quantize"]["attempts"] == 2 and stages["quantize"]["pods"] == ["p2"]
    # Seen again (every reconcile, an operator restart): still two.
    again = run(
        spec_dict, config, jobs={"quantize": job("quantize")}, pods={"quantize": [replacement]}, status=later.status
    )
    assert {s["name"]: s for s in again.status["stages"]}["quantize"]["attempts"] == 2

"""Attempts of the quantize stage: the first plan from the inspected size, a bigger plan after
an OOM (never the same one), the whole gang retried after one rank fails; and the objects a
multi-pod plan becomes (Indexed Job + headless Service with the torchrun rendezvous)."""

from __future__ import annotations

import json

from qjob_api.v1alpha1 import QuantizationJobSpec
from qjob_dev.model_sizes import LLAMA_8B, LLAMA_405B
from qjob_operator import attempts, multipod
from qjob_operator.builders import QuantizationJobRef, build_job
from qjob_operator.plan import plan_stages
from qjob_operator.status import decide, observe

from .conftest import NOW, cr_body, fitted, gpu_node
from .test_sizing import TOPOLOGY

SIZE_8B = LLAMA_8B.to_api()


def _job(name: str, condition: str | None) -> dict:
    conds = [{"type": condition, "status": "True"}] if condition else []
    return {"metadata": {"name": name}, "status": {"conditions": conds}}


def _pod(job: str, exit_code: int, message: str = "", phase: str = "Failed") -> dict:
    term = {"exitCode": exit_code, "reason": "Error", "message": message}
    return {
        "metadata": {
            "name": f"{job}-x",
            "labels": {attempts.JOB_NAME_LABEL: job},
            "creationTimestamp": "2026-11-22T11:59:30Z",
        },
        "spec": {"nodeName": "n"},
        "status": {"phase": phase, "containerStatuses": [{"name": "runner", "state": {"terminated": term}}]},
    }


def _spec(spec_dict, **resources) -> QuantizationJobSpec:
    spec_dict["resources"] = resources
    spec_dict["calibration"]["batchSize"] = 16
    return QuantizationJobSpec.model_validate(spec_dict)


def _advance(spec, config, status, jobs=(), pods=None, shapes=TOPOLOGY):
    return attempts.advance(
        spec, config, "ml", "llama", status, {j["metadata"]["name"]: j for j in jobs}, pods or {}, shapes
    )


def test_auto_waits_for_inspect_then_plans_from_its_termination_message(spec_dict, config):
    spec = _spec(spec_dict, gpus=0)
    assert _advance(spec, config, {}).plans == []
    result = {"outcome": "Succeeded", "stage": "inspect", "modelSize": SIZE_8B}
    inspect_pod = _pod("llama-inspect", 0, json.dumps(result), phase="Succeeded")
    sizing = _advance(spec, config, {}, [_job("llama-inspect", "Complete")], {"inspect": [inspect_pod]})
    (plan,) = sizing.plans
    assert (plan.attempt, plan.job_name, plan.gpus_per_pod, plan.pods, plan.gpu_memory_mib) == (
        1,
        "llama-quantize",
        1,
        1,
        46068,
    )
    assert "16.06 GB of BF16 weights" in plan.reason and plan.estimate.peak_mib < plan.estimate.usable_mib
    assert sizing.status_fields()["modelSize"]["weightBytes"] == LLAMA_8B.weight_bytes


def test_inspect_without_a_size_is_a_clear_refusal(spec_dict, config):
    spec = _spec(spec_dict, gpus=0)
    pod = _pod("llama-inspect", 0, json.dumps({"outcome": "Succeeded", "stage": "inspect"}), phase="Succeeded")
    sizing = _advance(spec, config, {}, [_job("llama-inspect", "Complete")], {"inspect": [pod]})
    assert sizing.refusal[0] == "InvalidInput" and "spec.resources.gpus" in sizing.refusal[1]


def test_oom_replans_bigger_until_attempts_run_out(spec_dict, config):
    spec = _spec(spec_dict, gpus=0)
    status = {"modelSize": SIZE_8B}
    sizing = _advance(spec, config, status)
    history = []
    for attempt in range(1, 4):
        current = sizing.current
        assert current.attempt == attempt
        history.append((current.gpus_per_pod * current.pods, current.gpu_memory_mib))
        status = {**status, **sizing.status_fields()}
        failed = [_job(current.job_name, "Failed")]
        sizing = _advance(
            spec, config, status, failed, {"quantize": [_pod(current.job_name, 76, "CUDA out of memory")]}
        )
        assert sizing.plans[attempt - 1].outcome.startswith("OOMKilled")
    # backoffLimit 2: three attempts, each bigger than the one before, none repeated.
    assert len(sizing.plans) == 3 and history == sorted(set(history))
    assert [p.job_name for p in sizing.plans] == ["llama-quantize", "llama-quantize-2", "llama-quantize-3"]
    assert "ran out of memory" in sizing.plans[1].reason and sizing.plans[1].estimate.correction > 1


def test_hand_sized_oom_shrinks_the_batch_then_goes_layerwise_then_gives_up(spec_dict, config):
    spec_dict["runPolicy"] = {"backoffLimit": 10}
    spec = _spec(spec_dict, gpus=2)
    sizing = _advance(spec, config, {})
    seen = []
    for _ in range(8):
        current = sizing.current
        seen.append((current.gpus_per_pod, current.batch_size, current.layerwise))
        status = sizing.status_fields()
        sizing = _advance(
            spec, config, status, [_job(current.job_name, "Failed")], {"quantize": [_pod(current.job_name, 76)]}
        )
        if sizing.current.outcome:
            break
    assert seen == [(2, 16, False), (2, 8, False), (2, 4, False), (2, 2, False), (2, 1, False), (2, 1, True)]
    assert "no bigger plan" in sizing.current.outcome and "spec.resources.gpus" in sizing.current.outcome


def test_bad_input_is_not_retried_and_a_failed_rank_retries_the_whole_gang(spec_dict, config):
    spec = _spec(spec_dict, gpus=0)
    h100s = attempts.sizing.node_shapes([(81559, 8)] * 2)
    status = {"modelSize": LLAMA_405B.to_api()}
    first = _advance(spec, config, status, shapes=h100s).current
    assert first.pods == 2
    status.update(plans=[first.to_api()])
    failed = [_job(first.job_name, "Failed")]
    transient = _advance(spec, config, status, failed, {"quantize": [_pod(first.job_name, 75, "NCCL timeout")]}, h100s)
    again = transient.current
    assert (again.attempt, again.pods, again.gpus_per_pod, again.batch_size) == (2, 2, 8, first.batch_size)
    assert "whole stage runs again" in again.reason
    missed = _advance(
        spec, config, status, failed, {"quantize": [_pod(first.job_name, 77, "rank 0 unreachable")]}, h100s
    )
    assert missed.plans[0].outcome.startswith("RendezvousFailed") and missed.current.attempt == 2
    bad = _advance(spec, config, status, failed, {"quantize": [_pod(first.job_name, 3, "corrupt shard")]}, h100s)
    assert len(bad.plans) == 1 and bad.current.outcome == "InvalidInput"


def test_default_policy_spans_two_pods_and_one_keeps_a_stage_on_one_pod(spec_dict, config):
    spec = _spec(spec_dict, gpus=0)
    h100s = attempts.sizing.node_shapes([(81559, 8)] * 2)
    assert config.policy.max_pods_per_stage == 2
    assert _advance(spec, config, {"modelSize": LLAMA_405B.to_api()}, shapes=h100s).current.pods == 2
    config.policy.max_pods_per_stage = 1
    sizing = _advance(spec, config, {"modelSize": LLAMA_405B.to_api()}, shapes=h100s)
    assert sizing.plans == []
    assert sizing.refusal[0] == "PolicyViolation" and "maxPodsPerStage" in sizing.refusal[1]
    assert "need 2 pod(s) x 8 GPU(s)" in sizing.refusal[1]


def test_multi_pod_plan_is_an_indexed_job_with_a_headless_service(spec_dict, config):
    spec = _spec(spec_dict, gpus=0)
    h100s = attempts.sizing.node_shapes([(81559, 8)] * 2)
    plan = _advance(spec, config, {"modelSize": LLAMA_405B.to_api()}, shapes=h100s).current
    stage = next(s for s in plan_stages(spec, config, plan) if s.name == "quantize")
    job = build_job(QuantizationJobRef("llama", "ml", "uid-1"), spec, stage, config)
    js, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"], js["backoffLimit"]) == ("Indexed", 2, 2, 0)
    assert pod["subdomain"] == "llama-quantize"
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "qjob_runner.launch"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    env = {e["name"]: e for e in container["env"]}
    assert env["MASTER_ADDR"]["value"] == "llama-quantize-0.llama-quantize.ml.svc"
    assert (env["NNODES"]["value"], env["NPROC_PER_NODE"]["value"], env["WORLD_SIZE"]["value"]) == ("2", "8", "16")
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    affinity = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["81558"]} in affinity["nodeSelectorTerms"][0][
        "matchExpressions"
    ]
    assert not [r for r in js["podFailurePolicy"]["rules"] if r["action"] == "Ignore"]
    service = multipod.build_rank_service(job)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": "llama-quantize"}
    runner = json.loads(env["QJOB_RUNNER_CONFIG"]["value"])
    assert runner["calibration"]["batchSize"] == plan.batch_size


def test_one_pod_quantize_job_fails_at_once_on_oom_for_a_replan(spec, config):
    stage = plan_stages(spec, config)[0]
    job = build_job(QuantizationJobRef("llama", "ml", "uid-1"), spec, stage, config)
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "runner", "operator": "In", "values": [76]}} in rules


def test_refused_plan_fails_the_job_at_once_with_its_numbers(spec_dict, config):
    spec = _spec(spec_dict, gpus=0)
    config.policy.max_gpus_per_job = 8
    h100s = attempts.sizing.node_shapes([(81559, 8)] * 2)
    sizing = _advance(spec, config, {"modelSize": LLAMA_405B.to_api()}, shapes=h100s)
    assert sizing.refusal[0] == "PolicyViolation"
    stages = plan_stages(spec, config, sizing.current)
    body = cr_body(spec.to_api())
    nodes = [gpu_node(f"h100-{i}", "9", "0") for i in range(2)]
    obs = observe(body, stages, {}, {}, fitted(nodes, config), NOW, refusal=sizing.refusal)
    decision = decide(obs, spec, stages, config)
    assert decision.status["phase"] == "Failed" and decision.status["reason"] == "PolicyViolation"
    assert "at most 8 GPUs per job" in decision.status["message"] and not decision.create


def test_auto_job_starts_with_a_gpu_less_inspect_stage(spec_dict, config):
    spec = _spec(spec_dict, gpus=0)
    stages = plan_stages(spec, config)
    assert [s.name for s in stages] == ["inspect", "quantize", "build-hopper"]
    job = build_job(QuantizationJobRef("llama", "ml", "uid-1"), spec, stages[0], config)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert (
        json.loads(next(e["value"] for e in container["env"] if e["name"] == "QJOB_RUNNER_CONFIG"))["stage"]
        == "inspect"
    )


def test_with_a_model_cache_the_fetch_stage_is_the_only_model_stage(spec_dict, config):
    # One GPU-less stage before quantize: the fetch stage's result carries the size, no inspect.
    config.model_cache.claim_name = "model-cache"
    spec = _spec(spec_dict, gpus=0)
    stages = plan_stages(spec, config)
    assert [s.name for s in stages] == ["fetch", "quantize", "build-hopper"]
    assert stages[1].after == ("fetch",)
    assert _advance(spec, config, {}, [_job("llama-fetch", None)]).plans == []  # still downloading
    result = {"outcome": "Succeeded", "stage": "fetch", "modelSize": SIZE_8B}
    fetch_pod = _pod("llama-fetch", 0, json.dumps(result), phase="Succeeded")
    sizing = _advance(spec, config, {}, [_job("llama-fetch", "Complete")], {"fetch": [fetch_pod]})
    assert sizing.current.gpus_per_pod == 1 and "16.06 GB of BF16 weights" in sizing.current.reason
    assert sizing.status_fields()["modelSize"]["weightBytes"] == LLAMA_8B.weight_bytes
    quantize = next(s for s in plan_stages(spec, config, sizing.current, sizing.model_size) if s.name == "quantize")
    assert quantize.model_bytes == LLAMA_8B.weight_bytes  # the same size sizes its disk
    # Sized by hand, the fetch stage's size is still recorded (disk) and there is still no inspect stage.
    manual = _spec(spec_dict, gpus=1)
    assert [s.name for s in plan_stages(manual, config)] == ["fetch", "quantize", "build-hopper"]
    found = _advance(manual, config, {}, [_job("llama-fetch", "Complete")], {"fetch": [fetch_pod]})
    assert found.model_size == LLAMA_8B and found.current.gpus_per_pod == 1
    # A fetched checkpoint without safetensors has no size: automatic sizing refuses, naming the stage.
    bare = _pod("llama-fetch", 0, json.dumps({"outcome": "Succeeded", "stage": "fetch"}), phase="Succeeded")
    refused = _advance(spec, config, {}, [_job("llama-fetch", "Complete")], {"fetch": [bare]})
    assert refused.refusal[0] == "InvalidInput" and "the fetch stage finished without" in refused.refusal[1]


def test_auto_sizing_of_an_s3_model_without_a_cache_is_refused_at_once(spec_dict, config):
    spec_dict["model"] = {"s3": {"bucket": "models", "prefix": "llama"}}
    spec = _spec(spec_dict, gpus=0)
    assert [s.name for s in plan_stages(spec, config)][0] == "inspect"
    sizing = _advance(spec, config, {})
    assert sizing.refusal[0] == "InvalidConfig" and "spec.model.cacheClaimName" in sizing.refusal[1]


def test_after_an_oom_the_reconcile_creates_the_next_attempts_job(spec_dict, config):
    spec = _spec(spec_dict, gpus=0)
    nodes = [gpu_node(f"h100-{i}", "9", "0") for i in range(2)]
    inspected = {"outcome": "Succeeded", "stage": "inspect", "modelSize": SIZE_8B}
    jobs = {"inspect": [_job("llama-inspect", "Complete")], "quantize": []}
    pods = {"inspect": [_pod("llama-inspect", 0, json.dumps(inspected), phase="Succeeded")]}
    body = cr_body(spec.to_api())
    stages, obs, sizing = attempts.observe_attempts(body, spec, config, jobs, pods, fitted(nodes, config), NOW)
    assert [s.name for s in decide(obs, spec, stages, config).create] == ["quantize"]
    first = sizing.current
    body["status"] = sizing.status_fields()

    # Attempt 1 ran out of memory: its Job and pod stay, but decide sees attempt 2, not yet created.
    jobs["quantize"] = [_job(first.job_name, "Failed")]
    pods["quantize"] = [_pod(first.job_name, 76, "CUDA out of memory")]
    stages, obs, sizing = attempts.observe_attempts(body, spec, config, jobs, pods, fitted(nodes, config), NOW)
    quantize = next(s for s in stages if s.name == "quantize")
    assert quantize.job_name("llama") == "llama-quantize-2" and "quantize" not in obs.stage_jobs
    assert obs.stage_pods["quantize"] == []
    decision = decide(obs, spec, stages, config)
    assert [s.job_name("llama") for s in decision.create] == ["llama-quantize-2"]
    assert decision.status["phase"] != "Failed"
    assert [p.outcome for p in sizing.plans] == ["OOMKilled", None]

"""Reuse of identical finished work on the real control plane: the real operator records job A's
work key, finds A through its index when B asks for the same work, runs B's GPU-less reuse stage
instead of quantize and names A; `reuse: Never` and a different recipe run normally, and a reuse
stage that finds A's artifacts changed falls back to quantize with the reason in status. kwok
plays the kubelet; the runner's results are the termination messages a real runner writes
(tests/runner/test_reuse.py runs that runner against real files and the real S3 server)."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from qjob_api.v1alpha1 import QuantizationJobSpec, WorkInputs
from qjob_api.work import recipe_key, recipe_of, work_key
from qjob_dev.localcluster import HOLD_ANNOTATION as HOLD
from qjob_dev.localcluster import TERMINATION_MESSAGE_ANNOTATION as MESSAGE
from qjob_dev.qjobs import create_qjob, phase_is, wait_qjob
from qjob_dev.waits import wait_for

from tests.integration.test_operator import jobs_of, node_labels, pods_of
from tests.operator_fixtures import basic_spec

pytestmark = pytest.mark.cluster

INPUTS = WorkInputs(
    model_revision="hf:TinyLlama/TinyLlama-1.1B-Chat-v1.0@" + "f" * 40,
    calibration_data="sha256:" + "c" * 64,
    versions={"nvidia-modelopt": "0.47.0", "torch": "2.9.0"},
)


def artifacts(ns: str, name: str) -> list[dict]:
    base = f"pvc://artifacts/{ns}/{name}"
    return [
        {"kind": "checkpoint", "format": "hf", "uri": f"{base}/hf", "sizeBytes": 4096, "sha256": "ab" * 32},
        {"kind": "manifest", "format": "json", "uri": f"{base}/manifest.json"},
    ]


def quantize_result(ns: str, name: str) -> dict:
    return {"outcome": "Succeeded", "stage": "quantize", "artifacts": artifacts(ns, name), "work": INPUTS.to_api()}


def job_spec(**overrides) -> dict:
    """Pods wait until the test releases them with the result their runner would write (longer
    than a spec's pod annotations may be)."""
    return basic_spec(**{"engines": [], **overrides, "scheduling": {"podAnnotations": {HOLD: "true"}}})


def release(kube_api, ns: str, pod, result: dict) -> None:
    annotations = {HOLD: "false", MESSAGE: json.dumps(result)}
    client.CoreV1Api(kube_api).patch_namespaced_pod(pod.metadata.name, ns, {"metadata": {"annotations": annotations}})


def bound_pod(kube_api, ns: str, name: str, stage: str):
    [pod] = wait_for(
        lambda: [p for p in pods_of(kube_api, ns, name, stage) if p.spec.node_name],
        timeout=60,
        what=f"{stage} pod of {name} bound",
    )
    return pod


def quantized(kube_api, ns: str, name: str, operator) -> dict:
    release(kube_api, ns, bound_pod(kube_api, ns, name, "quantize"), quantize_result(ns, name))
    return wait_qjob(kube_api, ns, name, phase_is("Succeeded", "Failed"), operator=operator)


def stages_of(kube_api, ns: str, name: str) -> set[str]:
    return {j.metadata.labels["qjob.dev/stage"] for j in jobs_of(kube_api, ns, name)}


@pytest.fixture
def job_a(kube_api, ns, operator) -> dict:
    """Job A ran (quantize) and recorded its work key."""
    obj = quantized(kube_api, ns, create_qjob(kube_api, ns, job_spec(), name="a"), operator)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    return obj


def test_finished_job_records_its_work_key(job_a, ns):
    recipe = recipe_of(QuantizationJobSpec.model_validate(job_a["spec"]))
    assert job_a["status"]["work"] == {
        "key": work_key(recipe, INPUTS),
        "recipeKey": recipe_key(recipe),
        "inputs": INPUTS.to_api(),
    }
    assert "reuse" not in job_a["status"]  # nothing to reuse in a fresh namespace: no reuse stage ran
    assert [s["name"] for s in job_a["status"]["stages"]] == ["quantize"]


def test_same_work_completes_without_a_gpu_stage_and_names_the_job_it_reused(kube_api, ns, operator, job_a):
    b = create_qjob(kube_api, ns, job_spec(), name="b")
    pod = bound_pod(kube_api, ns, b, "reuse")
    assert stages_of(kube_api, ns, b) == {"reuse"}
    container = pod.spec.containers[0]
    assert "nvidia.com/gpu" not in (container.resources.limits or {})
    assert "nvidia.com/gpu.compute.major" not in node_labels(kube_api, pod.spec.node_name)
    config = json.loads(next(e.value for e in container.env if e.name == "QJOB_RUNNER_CONFIG"))
    [candidate] = config["reuse"]["candidates"]
    a_ref = {"namespace": ns, "name": "a", "uid": job_a["metadata"]["uid"]}
    assert candidate["job"] == a_ref and candidate["workKey"] == job_a["status"]["work"]["key"]
    assert candidate["outputDir"] == f"/mnt/pvc/artifacts/{ns}/a"
    status = wait_qjob(kube_api, ns, b, lambda s: s.get("reuse"))["status"]
    assert status["reuse"] == {"candidates": [a_ref], "outcome": "Checking"}
    assert config["reuse"]["engines"] == []

    # The reuse runner checked A's files and copied them: it reports B's artifacts, same sha256s.
    message = f"2 artifact(s) of {ns}/a checked (sha256) and copied to pvc://artifacts/{ns}/b"
    result = {
        "outcome": "Succeeded",
        "stage": "reuse",
        "artifacts": artifacts(ns, "b"),
        "work": INPUTS.to_api(),
        "reuse": {"reusedFrom": a_ref, "reason": "Reused", "message": message},
    }
    release(kube_api, ns, pod, result)
    obj = wait_qjob(kube_api, ns, b, phase_is("Succeeded", "Failed"), operator=operator)
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["reusedFrom"] == a_ref
    assert status["reuse"]["outcome"] == "Reused" and status["reuse"]["message"] == message
    assert [a["sha256"] for a in status["artifacts"] if "sha256" in a] == ["ab" * 32]
    assert {a["uri"] for a in status["artifacts"]} == {a["uri"] for a in artifacts(ns, "b")}
    assert status["work"]["key"] == job_a["status"]["work"]["key"]
    assert [s["name"] for s in status["stages"]] == ["reuse"] and status["progress"]["percent"] == 100
    assert stages_of(kube_api, ns, b) == {"reuse"}  # no quantize Job was ever created


def test_reuse_never_runs_the_work_again(kube_api, ns, operator, job_a):
    c = create_qjob(kube_api, ns, job_spec(reuse="Never"), name="c")
    obj = quantized(kube_api, ns, c, operator)
    assert obj["status"]["phase"] == "Succeeded" and "reusedFrom" not in obj["status"]
    assert stages_of(kube_api, ns, c) == {"quantize"}


def test_other_work_runs(kube_api, ns, operator, job_a):
    d = create_qjob(kube_api, ns, job_spec(quantization={"format": "fp8", "kvCache": "fp8"}), name="d")
    obj = quantized(kube_api, ns, d, operator)
    assert obj["status"]["phase"] == "Succeeded" and "reuse" not in obj["status"]
    assert stages_of(kube_api, ns, d) == {"quantize"}
    assert obj["status"]["work"]["recipeKey"] != job_a["status"]["work"]["recipeKey"]


def test_changed_artifacts_fall_back_to_a_normal_run_with_the_reason(kube_api, ns, operator, job_a):
    e = create_qjob(kube_api, ns, job_spec(), name="e")
    why = f"{ns}/a: hf/model.safetensors no longer matches its sha256 (0a1b2c3d4e5f... vs abababababab...)"
    result = {
        "outcome": "Succeeded",
        "stage": "reuse",
        "work": INPUTS.to_api(),
        "reuse": {"reason": "ReuseArtifactChanged", "message": why},
    }
    release(kube_api, ns, bound_pod(kube_api, ns, e, "reuse"), result)
    quantize = bound_pod(kube_api, ns, e, "quantize")
    assert quantize.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    status = wait_qjob(kube_api, ns, e, lambda s: (s.get("reuse") or {}).get("outcome") == "NotReused")["status"]
    assert status["reuse"]["reason"] == "ReuseArtifactChanged" and status["reuse"]["message"] == why
    release(kube_api, ns, quantize, quantize_result(ns, "e"))
    obj = wait_qjob(kube_api, ns, e, phase_is("Succeeded", "Failed"), operator=operator)
    assert obj["status"]["phase"] == "Succeeded" and "reusedFrom" not in obj["status"]
    assert [s["name"] for s in obj["status"]["stages"]] == ["reuse", "quantize"]
    assert stages_of(kube_api, ns, e) == {"reuse", "quantize"}


def engine_result(ns: str, name: str, arch: str) -> dict:
    base = f"pvc://artifacts/{ns}/{name}/engines/{arch}"
    engine = {"kind": "engine", "format": "tensorrt_llm", "uri": base, "architecture": arch, "sha256": "cd" * 32}
    manifest = {"kind": "manifest", "format": "json", "uri": f"{base}/manifest.json"}
    return {"outcome": "Succeeded", "stage": f"build-{arch}", "artifacts": [engine, manifest]}


def test_engines_the_earlier_job_built_are_reused_the_others_built(kube_api, ns, operator):
    a = create_qjob(kube_api, ns, job_spec(engines=[{"architecture": "hopper"}]), name="a")
    release(kube_api, ns, bound_pod(kube_api, ns, a, "quantize"), quantize_result(ns, a))
    release(kube_api, ns, bound_pod(kube_api, ns, a, "build-hopper"), engine_result(ns, a, "hopper"))
    a_status = wait_qjob(kube_api, ns, a, phase_is("Succeeded", "Failed"), operator=operator)["status"]
    assert a_status["phase"] == "Succeeded", a_status

    b = create_qjob(kube_api, ns, job_spec(engines=[{"architecture": "hopper"}, {"architecture": "ada"}]), name="b")
    pod = bound_pod(kube_api, ns, b, "reuse")
    config = json.loads(next(e.value for e in pod.spec.containers[0].env if e.name == "QJOB_RUNNER_CONFIG"))
    assert [e["architecture"] for e in config["reuse"]["engines"]] == ["hopper", "ada"]
    reused = artifacts(ns, b) + engine_result(ns, b, "hopper")["artifacts"]
    a_ref = {"namespace": ns, "name": a, "uid": wait_qjob(kube_api, ns, a, phase_is("Succeeded"))["metadata"]["uid"]}
    outcome = {
        "reusedFrom": a_ref,
        "reason": "Reused",
        "message": "checked; engines to build: ada",
        "engines": ["hopper"],
    }
    release(kube_api, ns, pod, {"outcome": "Succeeded", "stage": "reuse", "artifacts": reused,
                                "work": INPUTS.to_api(), "reuse": outcome})  # fmt: skip
    # Only the engine A did not have is built, on an Ada node, after the reuse stage.
    build = bound_pod(kube_api, ns, b, "build-ada")
    labels = node_labels(kube_api, build.spec.node_name)
    assert (labels["nvidia.com/gpu.compute.major"], labels["nvidia.com/gpu.compute.minor"]) == ("8", "9")
    release(kube_api, ns, build, engine_result(ns, b, "ada"))
    status = wait_qjob(kube_api, ns, b, phase_is("Succeeded", "Failed"), operator=operator)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["reusedFrom"] == a_ref and status["reuse"]["engines"] == ["hopper"]
    assert [s["name"] for s in status["stages"]] == ["reuse", "build-ada"]
    assert stages_of(kube_api, ns, b) == {"reuse", "build-ada"}
    engines = {a_["architecture"]: a_["uri"] for a_ in status["artifacts"] if a_["kind"] == "engine"}
    assert engines == {arch: f"pvc://artifacts/{ns}/{b}/engines/{arch}" for arch in ("hopper", "ada")}
    assert status["progress"]["percent"] == 100

"""Pure builders: the Job and runner config a QuantizationJob turns into."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from qjob_api.runner import NON_RETRYABLE_EXIT_CODES, REPORT_TOKEN_PATH, RunnerConfig
from qjob_api.v1alpha1 import QuantizationJobSpec
from qjob_operator.builders import (
    QuantizationJobRef,
    build_job,
    build_runner_config,
    node_affinity,
)
from qjob_operator.config import NodeLabelKeys, OperatorConfig
from qjob_operator.plan import QUANTIZE_STAGE, child_name, plan_stages

REF = QuantizationJobRef("llama", "ml", "uid-1")


def _stage(spec, config, name):
    return next(s for s in plan_stages(spec, config) if s.name == name)


def test_plan_quantize_then_one_build_per_architecture(spec_dict, config):
    spec_dict["engines"] = [{"architecture": "hopper"}, {"architecture": "ada"}]
    stages = plan_stages(QuantizationJobSpec.model_validate(spec_dict), config)
    assert [s.name for s in stages] == ["quantize", "build-hopper", "build-ada"]
    assert stages[1].after == (QUANTIZE_STAGE,)
    assert stages[0].requirement.compute_capabilities == ()
    assert stages[2].requirement.compute_capabilities == (("8", "9"),)


def test_build_job_requires_architecture_gpu_count_and_memory(spec_dict, config):
    spec_dict["resources"] = {"gpus": 2, "minGpuMemory": "80Gi"}
    spec_dict["scheduling"] = {"priorityClassName": "batch-low", "tolerations": [{"key": "team", "operator": "Exists"}]}
    spec = QuantizationJobSpec.model_validate(spec_dict)
    job = build_job(REF, spec, _stage(spec, config, "build-hopper"), config)
    assert job["metadata"]["name"] == "llama-build-hopper"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    pod = job["spec"]["template"]["spec"]
    [term] = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {"key": "nvidia.com/gpu.compute.major", "operator": "In", "values": ["9"]} in term["matchExpressions"]
    assert {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["81919"]} in term["matchExpressions"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["priorityClassName"] == "batch-low"
    assert {"key": "team", "operator": "Exists"} in pod["tolerations"]
    assert pod["serviceAccountName"] == "default"
    assert pod["securityContext"]["runAsNonRoot"] is True
    rule = job["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [int(c) for c in NON_RETRYABLE_EXIT_CODES]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}


@pytest.mark.parametrize(
    ("arch", "capabilities"), [("blackwell", ["10.0", "10.3"]), ("blackwell-rtx", ["12.0", "12.1"])]
)
def test_blackwell_affinity_has_one_term_per_compute_capability(spec_dict, config, arch, capabilities):
    spec_dict["quantization"] = {"format": "nvfp4"}
    spec_dict["engines"] = [{"architecture": arch}]
    spec = QuantizationJobSpec.model_validate(spec_dict)
    affinity = node_affinity(_stage(spec, config, f"build-{arch}").requirement, config)
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    got = [t["matchExpressions"][0]["values"][0] + "." + t["matchExpressions"][1]["values"][0] for t in terms]
    assert got == capabilities


def test_label_keys_come_from_config(spec, config):
    relabeled = OperatorConfig(
        node_labels=NodeLabelKeys(
            compute_major="example.com/cc-major", compute_minor="example.com/cc-minor", gpu_resource="example.com/gpu"
        )
    )
    job = build_job(REF, spec, _stage(spec, relabeled, "build-hopper"), relabeled)
    pod = job["spec"]["template"]["spec"]
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"][0]["key"] == "example.com/cc-major"
    assert "example.com/gpu" in pod["containers"][0]["resources"]["limits"]


def test_kueue_queue_creates_suspended_job_with_label(spec_dict, config):
    spec_dict["scheduling"] = {"queueName": "gpu-queue"}
    spec = QuantizationJobSpec.model_validate(spec_dict)
    job = build_job(REF, spec, _stage(spec, config, QUANTIZE_STAGE), config)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True


def test_runner_pod_has_no_api_token_only_its_report_token(spec, config):
    pod = build_job(REF, spec, _stage(spec, config, QUANTIZE_STAGE), config)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "default"
    [token] = [v for v in pod["volumes"] if "projected" in v]
    [source] = token["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == config.reports.audience != ""
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["report-token"]["readOnly"] is True
    assert f"{mounts['report-token']['mountPath']}/{source['serviceAccountToken']['path']}" == REPORT_TOKEN_PATH


def test_runner_config_uses_mounted_paths(spec_dict, config):
    spec_dict["model"] = {"pvc": {"claimName": "models", "path": "llama"}}
    spec = QuantizationJobSpec.model_validate(spec_dict)
    rc = build_runner_config(REF, spec, _stage(spec, config, "build-hopper"), config)
    assert rc.model.path == "/mnt/pvc/models/llama"
    assert rc.calibration.dataset.path == "/mnt/calibration/text.jsonl"
    assert rc.output_dir == "/mnt/pvc/artifacts/ml/llama"
    assert rc.output_uri == "pvc://artifacts/ml/llama"
    assert rc.engine.architecture == "hopper"
    # The Job carries its stage's config inline, in the env var the runner reads, with the
    # stage's own report URL and the CA the endpoint's certificate is signed by.
    config.reports.ca_cert = "-----BEGIN CERTIFICATE-----\n..."
    job = build_job(REF, spec, _stage(spec, config, QUANTIZE_STAGE), config)
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    inline = RunnerConfig.model_validate_json(env["QJOB_RUNNER_CONFIG"])
    assert inline.stage == "quantize" and inline.engine is None and inline.model.path == "/mnt/pvc/models/llama"
    assert inline.reporting.kind == "operator"
    assert (
        inline.reporting.url == f"{config.reports.url}/v1/namespaces/ml/quantizationjobs/llama/stages/quantize/progress"
    )
    assert inline.reporting.ca_cert == config.reports.ca_cert


def test_same_claim_is_mounted_once(spec_dict, config):
    spec_dict["model"] = {"pvc": {"claimName": "artifacts", "path": "models/llama"}}
    spec = QuantizationJobSpec.model_validate(spec_dict)
    pod = build_job(REF, spec, _stage(spec, config, QUANTIZE_STAGE), config)["spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["artifacts"]


def test_child_names_are_deterministic_and_short():
    long = "a" * 60
    assert child_name(long, "build-blackwell") == child_name(long, "build-blackwell")
    assert len(child_name(long, "build-blackwell")) <= 63
    assert child_name(long, "build-blackwell") != child_name(long, "build-hopper")


def test_pod_labels_merge_config_then_spec_and_ours_win(spec_dict):
    spec_dict["scheduling"] = {
        "podLabels": {"team": "nlp"},
        "podAnnotations": {"a": "spec"},
    }
    config = OperatorConfig.model_validate(
        {"runner": {"podLabels": {"team": "platform", "cost": "gpu"}, "podAnnotations": {"a": "config", "b": "config"}}}
    )
    spec = QuantizationJobSpec.model_validate(spec_dict)
    meta = build_job(REF, spec, _stage(spec, config, QUANTIZE_STAGE), config)["spec"]["template"]["metadata"]
    assert meta["labels"]["team"] == "nlp" and meta["labels"]["cost"] == "gpu"
    assert meta["labels"]["qjob.dev/job-name"] == "llama"
    assert meta["annotations"] == {"a": "spec", "b": "config"}
    # Keys the operator, the Job controller or Kueue own are refused with the spec, not overwritten.
    for key in ("qjob.dev/job-name", "batch.kubernetes.io/job-name", "controller-uid"):
        spec_dict["scheduling"] = {"podLabels": {key: "spoofed"}}
        with pytest.raises(ValidationError, match="own"):
            QuantizationJobSpec.model_validate(spec_dict)

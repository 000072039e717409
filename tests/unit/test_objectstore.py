"""Pure parts of object-store support: S3 fields in the API, the runner config and the runner Job."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from qjob_api.runner import RunnerConfig
from qjob_api.v1alpha1 import QuantizationJobSpec, S3Location
from qjob_operator.builders import QuantizationJobRef, build_job, build_runner_config
from qjob_operator.config import OperatorConfig
from qjob_operator.plan import plan_stages
from qjob_operator.status import policy_violations

REF = QuantizationJobRef("llama", "ml", "uid-1")
S3 = {
    "endpoint": "https://rgw.storage.svc:8443",
    "region": "eu-west-1",
    "bucket": "artifacts",
    "credentialsSecretRef": {"name": "s3-creds"},
    "caBundle": {"name": "store-ca", "key": "ca.pem"},
}


def _quantize_job(spec: QuantizationJobSpec, config) -> dict:
    stage = next(s for s in plan_stages(spec, config) if s.name == "quantize")
    return build_job(REF, spec, stage, config)


def _runner_config(job: dict) -> RunnerConfig:
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    return RunnerConfig.model_validate_json(env["QJOB_RUNNER_CONFIG"]["value"])


def test_s3_output_reaches_the_runner_with_credentials_from_the_secret(spec_dict, config):
    spec_dict["output"] = {"s3": S3}
    spec = QuantizationJobSpec.model_validate(spec_dict)
    job = _quantize_job(spec, config)
    pod = job["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["QJOB_S3_OUTPUT_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "accessKeyId"}
    }
    assert env["QJOB_S3_OUTPUT_SECRET_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "secretAccessKey"}
    }
    runner = _runner_config(job)
    out = runner.output_s3
    assert (out.bucket, out.prefix, out.region, out.endpoint) == ("artifacts", "ml/llama", "eu-west-1", S3["endpoint"])
    assert out.field == "spec.output.s3" and out.credentials_env == "QJOB_S3_OUTPUT"
    assert runner.output_uri == "s3://artifacts/ml/llama"
    assert not runner.output_dir.startswith("/mnt/pvc")  # staged in the pod's scratch volume
    # No secret value in the config the Job carries; the CA bundle is a mounted ConfigMap key.
    assert "secretAccessKey" not in env["QJOB_RUNNER_CONFIG"]["value"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert not any("persistentVolumeClaim" in v for v in volumes.values())
    assert volumes["ca-output"]["configMap"] == {"name": "store-ca", "items": [{"key": "ca.pem", "path": "ca.pem"}]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert out.ca_bundle == f"{mounts['ca-output']['mountPath']}/ca.pem" and mounts["ca-output"]["readOnly"]


def test_s3_model_source_and_explicit_output_prefix(spec_dict, config):
    spec_dict["model"] = {"s3": {"bucket": "models", "prefix": "llama-3.1-8b"}}
    spec_dict["output"] = {"s3": {"bucket": "artifacts", "prefix": "team-a/run-7"}}
    spec = QuantizationJobSpec.model_validate(spec_dict)
    stage = next(s for s in plan_stages(spec, config) if s.name == "quantize")
    runner = build_runner_config(REF, spec, stage, config)
    assert runner.model.s3.bucket == "models" and runner.model.s3.prefix == "llama-3.1-8b"
    assert runner.model.s3.field == "spec.model.s3" and runner.model.s3.endpoint is None  # Amazon S3
    assert runner.model.s3.credentials_env is None  # the pod's own identity (IRSA, instance profile)
    assert runner.output_uri == "s3://artifacts/team-a/run-7"
    env = {e["name"] for e in _quantize_job(spec, config)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not any(name.startswith("QJOB_S3_") for name in env)


def test_build_stage_gets_the_same_output_location(spec_dict, config):
    spec_dict["output"] = {"s3": S3}
    spec = QuantizationJobSpec.model_validate(spec_dict)
    stage = next(s for s in plan_stages(spec, config) if s.name == "build-hopper")
    runner = build_runner_config(REF, spec, stage, config)
    assert runner.output_s3.prefix == "ml/llama" and runner.is_build


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("prefix", "/abs", "prefix must be relative to the bucket"),
        ("prefix", "a/../b", "prefix must be relative to the bucket"),
        ("bucket", "Upper_Case", "String should match pattern"),
        ("endpoint", "rgw.storage:8080", "String should match pattern"),
    ],
)
def test_s3_location_refuses_bad_fields(field, value, message):
    with pytest.raises(ValidationError, match=message):
        S3Location.model_validate({"bucket": "artifacts", field: value})


def test_policy_limits_the_output_buckets(spec_dict):
    spec_dict["output"] = {"s3": {"bucket": "team-b-artifacts"}}
    spec = QuantizationJobSpec.model_validate(spec_dict)
    config = OperatorConfig.model_validate({"policy": {"allowedOutputBuckets": ["team-a-artifacts"]}})
    [problem] = policy_violations(spec, config)
    assert "spec.output.s3.bucket 'team-b-artifacts'" in problem and "team-a-artifacts" in problem
    assert policy_violations(spec, OperatorConfig()) == []

"""spec.model.s3 and spec.output.s3 on the real apiserver (CRD schema + CEL), and the Job the
real operator builds from them (credentials from the Secret through env valueFrom)."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from qjob_dev.qjobs import (
    GROUP,
    PLURAL,
    VERSION,
    create_qjob,
    custom_api,
    make_calibration_configmap,
    qjob_manifest,
)
from qjob_dev.waits import wait_for

from tests.operator_fixtures import basic_spec

pytestmark = pytest.mark.cluster

S3 = {"endpoint": "http://rgw.storage.svc:8080", "bucket": "artifacts", "credentialsSecretRef": {"name": "s3"}}


def _create(kube_api, namespace, spec, name="s3job"):
    return custom_api(kube_api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, qjob_manifest(name, spec)
    )


def test_s3_output_and_model_are_accepted_with_defaults(kube_api, namespace, crds):
    spec = basic_spec(output={"s3": S3})
    spec["model"] = {"s3": {"bucket": "models", "prefix": "llama/8b"}}
    obj = _create(kube_api, namespace, spec)
    assert obj["spec"]["output"]["s3"]["region"] == "us-east-1"
    assert obj["spec"]["output"]["s3"]["insecure"] is False
    assert obj["spec"]["model"]["s3"]["prefix"] == "llama/8b"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s["output"].update(s3=S3), "set exactly one output: spec.output.pvc or spec.output.s3"),
        (lambda s: s.update(output={}), "set exactly one output"),
        (lambda s: s["model"].update(s3={"bucket": "models"}), "set exactly one model source"),
        (lambda s: s.update(output={"s3": {**S3, "prefix": "/abs"}}), "prefix must be relative to the bucket"),
        (lambda s: s.update(output={"s3": {**S3, "bucket": "Bad_Bucket"}}), "spec.output.s3.bucket"),
        (lambda s: s.update(output={"s3": {**S3, "endpoint": "rgw:8080"}}), "spec.output.s3.endpoint"),
        (
            lambda s: s.update(output={"s3": {**S3, "insecure": True, "caBundle": {"name": "ca", "key": "ca.pem"}}}),
            "insecure skips TLS verification, caBundle configures it",
        ),
    ],
    ids=["both-outputs", "no-output", "two-model-sources", "abs-prefix", "bad-bucket", "no-scheme", "insecure-and-ca"],
)
def test_bad_s3_fields_are_refused_with_a_clear_message(kube_api, namespace, crds, mutate, message):
    spec = basic_spec()
    mutate(spec)
    with pytest.raises(ApiException) as refused:
        _create(kube_api, namespace, spec)
    assert refused.value.status == 422
    assert message in json.loads(refused.value.body)["message"]


def test_operator_passes_s3_credentials_from_the_secret(kube_api, namespace, operator):
    make_calibration_configmap(kube_api, namespace)
    name = create_qjob(kube_api, namespace, basic_spec(output={"s3": S3}))
    batch = client.BatchV1Api(kube_api)
    job = wait_for(
        lambda: next(
            iter(batch.list_namespaced_job(namespace, label_selector=f"qjob.dev/job-name={name}").items), None
        ),
        timeout=60,
        what="the quantize Job",
    )
    container = job.spec.template.spec.containers[0]
    env = {e.name: e for e in container.env}
    ref = env["QJOB_S3_OUTPUT_SECRET_ACCESS_KEY"].value_from.secret_key_ref
    assert (ref.name, ref.key) == ("s3", "secretAccessKey")
    assert env["QJOB_S3_OUTPUT_ACCESS_KEY_ID"].value_from.secret_key_ref.key == "accessKeyId"
    runner = json.loads(env["QJOB_RUNNER_CONFIG"].value)
    assert runner["outputUri"] == f"s3://artifacts/{namespace}/{name}"
    assert runner["outputS3"]["endpoint"] == S3["endpoint"]
    assert not any(v.persistent_volume_claim for v in job.spec.template.spec.volumes)

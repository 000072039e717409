"""The cross-namespace model cache (modelCache.shared): who uses it, the fill Job in the cache's
namespace, the tenant's waiting fetch stage, and the read-only views."""

from __future__ import annotations

import copy
import json

import pytest
from qjob_api.runner import RunnerConfig
from qjob_api.v1alpha1 import QuantizationJobSpec
from qjob_operator.builders import QuantizationJobRef, build_job
from qjob_operator.config import OperatorConfig
from qjob_operator.fetch import MODEL_CACHE_ROOT, CacheUse, cache_use, fill_job_name
from qjob_operator.plan import plan_stages
from qjob_operator.sharedcache import fill_job, view_claim, view_volume

REF = QuantizationJobRef("llama", "team-a", "uid-1")
REGISTRY = {"endpoint": "https://s3.example", "bucket": "models", "prefix": "released",
            "credentialsSecretRef": {"name": "model-registry"}}  # fmt: skip
SHARED = {
    "namespaces": ["team-a", "team-b"],
    "claimName": "shared-models",
    "huggingFace": {"enabled": True, "tokenSecret": "platform-hf"},
    "s3": [REGISTRY],
}
PUBLIC = {
    "model": {"huggingFace": {"repo": "meta-llama/Llama-3.1-8B"}},
    "quantization": {"format": "fp8"},
    "calibration": {"dataset": {"configMap": {"name": "calib", "key": "text.jsonl"}}, "samples": 128},
    "engines": [{"architecture": "hopper"}],
    "output": {"s3": {"bucket": "team-a-out", "credentialsSecretRef": {"name": "team-a-s3"}}},
    "scheduling": {"priorityClassName": "team-a-batch", "queueName": "team-a", "nodeSelector": {"pool": "a"}},
}


def _config(**shared) -> OperatorConfig:
    return OperatorConfig.model_validate({"modelCache": {"claimName": "team-cache", "shared": {**SHARED, **shared}}})


def _spec(**model) -> QuantizationJobSpec:
    spec = copy.deepcopy(PUBLIC)
    if model:
        spec["model"] = model
    return QuantizationJobSpec.model_validate(spec)


def _env(job) -> dict[str, dict]:
    return {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def _runner(job) -> RunnerConfig:
    return RunnerConfig.model_validate_json(_env(job)["QJOB_RUNNER_CONFIG"]["value"])


def _volumes(job) -> dict[str, dict]:
    return {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}


S3_UNDER = {"s3": {"endpoint": "https://s3.example", "bucket": "models", "prefix": "released/llama-8b",
                   "credentialsSecretRef": {"name": "team-a-s3"}}}  # fmt: skip


@pytest.mark.parametrize(
    ("namespace", "model", "shared", "expected"),
    [
        ("team-a", None, {}, CacheUse("qjob-shared-model-cache", "wait")),
        ("team-c", None, {}, CacheUse("team-cache")),  # not in the policy: its namespace's cache
        ("team-c", None, {"namespaces": ["*"]}, CacheUse("qjob-shared-model-cache", "wait")),
        ("team-a", None, {"claimName": ""}, CacheUse("team-cache")),  # no shared claim: nothing shared
        ("team-a", None, {"huggingFace": {"enabled": False}}, CacheUse("team-cache")),
        ("", None, {"namespaces": ["*"]}, CacheUse("team-cache")),  # a local run has no namespace
        # A job's own token reads what its team may read: never shared.
        (
            "team-a",
            {"huggingFace": {"repo": "org/private", "tokenSecretRef": {"name": "hf"}}},
            {},
            CacheUse("team-cache"),
        ),
        ("team-a", S3_UNDER, {}, CacheUse("qjob-shared-model-cache", "wait")),
        ("team-a", {"s3": {**S3_UNDER["s3"], "prefix": "released-beta/x"}}, {}, CacheUse("team-cache")),
        ("team-a", {"s3": {**S3_UNDER["s3"], "bucket": "team-a-models"}}, {}, CacheUse("team-cache")),
        ("team-a", {"s3": {**S3_UNDER["s3"], "endpoint": "https://other.example"}}, {}, CacheUse("team-cache")),
        # A claim the job names wins; a model on a PVC is read in place.
        ("team-a", {"huggingFace": {"repo": "x/y"}, "cacheClaimName": "mine"}, {}, CacheUse("mine")),
        ("team-a", {"pvc": {"claimName": "models", "path": "llama"}}, {}, None),
    ],
)
def test_which_cache_a_job_uses(namespace, model, shared, expected):
    spec = _spec(**model) if model else _spec()
    assert cache_use(spec, _config(**shared), namespace) == expected


def test_a_hub_dataset_is_shared_only_with_the_hub():
    spec = copy.deepcopy(PUBLIC)
    spec["model"] = S3_UNDER
    spec["calibration"]["dataset"] = {"huggingFace": {"name": "wikitext", "config": "wikitext-2-raw-v1"}}
    parsed = QuantizationJobSpec.model_validate(spec)
    assert cache_use(parsed, _config(), "team-a").role == "wait"
    assert cache_use(parsed, _config(huggingFace={"enabled": False}), "team-a") == CacheUse("team-cache")


def test_the_tenant_fetch_stage_waits_on_a_read_only_view_and_reads_no_source():
    spec, config = _spec(**S3_UNDER), _config()
    jobs = {s.name: build_job(REF, spec, s, config) for s in plan_stages(spec, config, namespace=REF.namespace)}
    assert list(jobs) == ["fetch", "quantize", "build-hopper"]
    for job in jobs.values():
        cache = _volumes(job)["model-cache"]["persistentVolumeClaim"]
        assert cache == {"claimName": "qjob-shared-model-cache", "readOnly": True}
    fetch = _runner(jobs["fetch"])
    assert (fetch.model.cache_role, fetch.model.cache_dir) == ("wait", MODEL_CACHE_ROOT)
    assert fetch.model.fill_record == fill_job_name("team-a", "llama", "uid-1")
    # The waiting stage needs no credential for the model: the fill Job has the platform's.
    assert not [n for n in _env(jobs["fetch"]) if n.startswith("QJOB_S3_MODEL")]
    assert "QJOB_S3_OUTPUT_ACCESS_KEY_ID" in _env(jobs["quantize"])


def test_the_fill_job_runs_in_the_cache_namespace_with_the_platform_credentials_only():
    spec, config = _spec(**S3_UNDER), _config()
    job = fill_job(REF, spec, config)
    meta, pod = job["metadata"], job["spec"]["template"]["spec"]
    assert (meta["namespace"], meta["name"]) == ("qjob-system", fill_job_name("team-a", "llama", "uid-1"))
    assert "ownerReferences" not in meta  # they cannot cross namespaces
    assert meta["labels"]["qjob.dev/fill-for-namespace"] == "team-a" and job["spec"]["ttlSecondsAfterFinished"] > 0
    runner = _runner(job)
    assert (runner.model.cache_role, runner.model.fill_record) == ("fill", meta["name"])
    assert runner.model.s3.prefix == "released/llama-8b" and runner.reporting.kind == "file"
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in _env(job).values() if "valueFrom" in e
               and "secretKeyRef" in e["valueFrom"]}  # fmt: skip
    assert secrets == {"model-registry"}  # not team-a-s3 (the job's), not its output's
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"].get("readOnly", False)
              for v in pod["volumes"] if "persistentVolumeClaim" in v}  # fmt: skip
    assert claims == {"shared-models": False}  # the only writer; nothing of the job's namespace
    assert "priorityClassName" not in pod and "nodeSelector" not in pod
    assert not [k for k in job["spec"]["template"]["metadata"]["labels"] if k.startswith("kueue")]
    assert "nvidia.com/gpu" not in json.dumps(pod["containers"][0]["resources"])
    assert pod["automountServiceAccountToken"] is False


def test_a_hub_fill_uses_the_platform_token_or_none():
    token = _env(fill_job(REF, _spec(), _config()))["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "platform-hf", "key": "token"}
    assert "HF_TOKEN" not in _env(fill_job(REF, _spec(), _config(huggingFace={"enabled": True})))
    assert _config(namespace="models").model_cache.shared.namespace == "models"
    assert fill_job(REF, _spec(), _config(namespace="models"))["metadata"]["namespace"] == "models"


def _cache_pv(source: dict) -> dict:
    return {
        "metadata": {"name": "pvc-123"},
        "spec": {
            **source,
            "capacity": {"storage": "2Ti"},
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": "nfs",
            "claimRef": {"namespace": "qjob-system", "name": "shared-models", "uid": "u"},
            "mountOptions": ["nfsvers=4.1"],
        },
    }


def test_a_view_is_a_read_only_retained_copy_bound_to_the_namespace_claim():
    volume, enforced = view_volume(
        _cache_pv({"nfs": {"server": "nfs.example", "path": "/models"}}), "team-a", _config()
    )
    assert enforced
    spec = volume["spec"]
    assert spec["nfs"] == {"server": "nfs.example", "path": "/models", "readOnly": True}
    assert spec["persistentVolumeReclaimPolicy"] == "Retain"  # deleting a view never deletes the models
    assert spec["accessModes"] == ["ReadOnlyMany"] and spec["storageClassName"] == ""
    assert spec["claimRef"] == {"namespace": "team-a", "name": "qjob-shared-model-cache"}
    assert spec["mountOptions"] == ["nfsvers=4.1"] and spec["capacity"] == {"storage": "2Ti"}
    claim = view_claim(volume, "team-a", _config())
    assert claim["metadata"]["namespace"] == "team-a" and claim["spec"]["volumeName"] == volume["metadata"]["name"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Ti"
    csi, enforced = view_volume(
        _cache_pv({"csi": {"driver": "efs.csi.aws.com", "volumeHandle": "fs-1"}}), "b", _config()
    )
    assert enforced and csi["spec"]["csi"]["readOnly"] is True


def test_a_host_path_view_says_read_only_is_not_enforced():
    volume, enforced = view_volume(_cache_pv({"hostPath": {"path": "/srv/models"}}), "team-a", _config())
    assert not enforced and volume["spec"]["hostPath"] == {"path": "/srv/models"}

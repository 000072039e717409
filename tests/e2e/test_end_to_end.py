"""apply -> Succeeded with real artifacts: the real operator and control plane, and the real
jobrunner (ModelOpt on CPU) running the pods the scheduler placed (via qjob_dev.podrunner); for
object stores also a real S3 server (versitygw on loopback, tests/s3_fixtures.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes import client
from qjob_dev.qjobs import create_qjob, make_artifacts_pvc, phase_is, wait_qjob
from qjob_dev.tiny_models import make_tiny_llama

from .conftest import pv_folder

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# kwok leaves these pods alone, and this session's pod runner (tests/e2e/conftest.py) takes them.
EXTERNAL = {"localcluster.qjob.dev/external": "true", "e2e.qjob.dev/podrunner": "true"}


def spec(**overrides):
    base = {
        "model": {"pvc": {"claimName": "artifacts", "path": "models/tiny-llama"}},
        "quantization": {"format": "int8_smoothquant"},
        "calibration": {
            "dataset": {"configMap": {"name": "calibration", "key": "samples.jsonl"}},
            "samples": 16,
            "sequenceLength": 64,
            "batchSize": 4,
        },
        "evaluation": {"samples": 8, "gate": {"maxPerplexityIncrease": 0.5}},
        "output": {"pvc": {"claimName": "artifacts"}},
        "resources": {"cpu": "1", "memory": "4Gi"},
        "scheduling": {"podLabels": EXTERNAL, "calibrationArchitecture": "hopper"},
        "runPolicy": {"backoffLimit": 1},
    }
    base.update(overrides)
    return base


def qjob_wait(cluster, namespace: str, name: str) -> subprocess.CompletedProcess:
    """What a CI pipeline does: block on the job, exit code says how it ended."""
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "qjob"),
            "wait",
            name,
            "-n",
            namespace,
            "--timeout",
            "600",
            "--interval",
            "1",
            "--quiet",
        ],
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        capture_output=True,
        text=True,
        timeout=700,
    )


def test_quantization_job_runs_the_real_runner_to_succeeded(kube_api, cluster, e2e_ns, operator):
    name = create_qjob(kube_api, e2e_ns, spec(), name="tiny-llama-int8sq")
    waited = qjob_wait(cluster, e2e_ns, name)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert f"{e2e_ns}/{name}: Succeeded" in waited.stdout
    obj = wait_qjob(kube_api, e2e_ns, name, phase_is("Succeeded", "Failed"), timeout=60, operator=operator)
    status = obj["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=2)

    [stage] = status["stages"]
    node = client.CoreV1Api(kube_api).read_node(stage["node"])
    assert node.metadata.labels["nvidia.com/gpu.compute.major"] == "9"  # calibrationArchitecture: hopper
    assert status["progress"]["percent"] == 100

    # The runner reported to the operator with its pod's token, and the artifacts are really there.
    report = status["runnerReports"]["quantize"]
    assert report["percent"] == 100 and report["stepSeconds"]["quantize"] > 0
    checkpoint = next(a for a in status["artifacts"] if a["kind"] == "checkpoint")
    assert checkpoint["format"] == "hf" and len(checkpoint["sha256"]) == 64
    assert checkpoint["uri"] == f"pvc://artifacts/{e2e_ns}/{name}/hf"
    out = pv_folder(kube_api, e2e_ns) / e2e_ns / name
    assert (out / "hf" / "hf_quant_config.json").exists() or any(out.rglob("hf_quant_config.json"))
    manifest = json.loads(next(out.rglob("manifest.json")).read_text())
    assert "nvidia-modelopt" in json.dumps(manifest)

    quality = status["quality"]
    assert quality["metric"] == "perplexity" and quality["gatePassed"] is True
    assert quality["quantized"] >= quality["baseline"] * 0.9

    assert 'qjob_jobs{phase="Succeeded"}' in operator.metrics()


def test_bad_input_fails_once_with_the_runners_message(kube_api, cluster, e2e_ns, operator):
    bad = spec(model={"pvc": {"claimName": "artifacts", "path": "models/does-not-exist"}})
    name = create_qjob(kube_api, e2e_ns, bad, name="missing-model")
    assert qjob_wait(cluster, e2e_ns, name).returncode == 1
    obj = wait_qjob(kube_api, e2e_ns, name, phase_is("Succeeded", "Failed"), timeout=300, operator=operator)
    status = obj["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidInput"), json.dumps(status, indent=2)
    assert "does-not-exist" in status["message"]
    assert status["stages"][0]["attempts"] == 1  # exit code 3: the podFailurePolicy does not retry
    out = pv_folder(kube_api, e2e_ns) / e2e_ns / name
    assert not any(out.rglob("hf_quant_config.json")), "a failed run must leave nothing that looks finished"


def test_identical_job_reuses_the_checked_artifacts_without_a_gpu_stage(kube_api, cluster, e2e_ns, operator):
    """The operator and the runner agree on the work key: B, asking for A's work, runs only the
    reuse stage (the real runner re-hashes A's files) and ends with A's sha256s under its own path."""
    first = create_qjob(kube_api, e2e_ns, spec(), name="first")
    assert qjob_wait(cluster, e2e_ns, first).returncode == 0
    a = wait_qjob(kube_api, e2e_ns, first, phase_is("Succeeded"), operator=operator)["status"]
    assert a["work"]["inputs"]["modelRevision"].startswith("files:")
    second = create_qjob(kube_api, e2e_ns, spec(), name="second")
    assert qjob_wait(cluster, e2e_ns, second).returncode == 0
    b = wait_qjob(kube_api, e2e_ns, second, phase_is("Succeeded"), operator=operator)["status"]
    assert b["reusedFrom"]["name"] == first and b["reuse"]["outcome"] == "Reused", json.dumps(b, indent=2)
    assert [s["name"] for s in b["stages"]] == ["reuse"]
    assert b["work"]["key"] == a["work"]["key"]
    shas = {a_["uri"].replace(f"/{first}/", f"/{second}/"): a_.get("sha256") for a_ in a["artifacts"]}
    assert {x["uri"]: x.get("sha256") for x in b["artifacts"]} == shas
    assert b["quality"] == a["quality"]
    out = pv_folder(kube_api, e2e_ns) / e2e_ns / second
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"] == second and manifest["reusedFrom"]["name"] == first


# ------------------------------------------------ object stores: fetch -> quantize -> upload (real S3 server)


def test_model_from_s3_fetched_once_then_quantized_and_uploaded(
    kube_api,
    cluster,
    e2e_ns,
    operator,
    s3_server,
    s3_bucket,
    tmp_path,
):
    s3_server.upload_folder(make_tiny_llama(tmp_path / "tiny"), s3_bucket, "models/tiny")
    make_artifacts_pvc(kube_api, e2e_ns, name="model-cache")
    client.CoreV1Api(kube_api).create_namespaced_secret(
        e2e_ns,
        {
            "metadata": {"name": "s3"},
            "stringData": {"accessKeyId": s3_server.access_key, "secretAccessKey": s3_server.secret_key},
        },
    )
    store = {"endpoint": s3_server.endpoint, "bucket": s3_bucket, "credentialsSecretRef": {"name": "s3"}}
    job = spec(
        model={"s3": {**store, "prefix": "models/tiny"}, "cacheClaimName": "model-cache"},
        output={"s3": {**store, "prefix": "artifacts/tiny-int8sq"}},
    )
    name = create_qjob(kube_api, e2e_ns, job, name="tiny-from-s3")
    waited = qjob_wait(cluster, e2e_ns, name)
    obj = wait_qjob(kube_api, e2e_ns, name, phase_is("Succeeded", "Failed"), timeout=60, operator=operator)
    status = obj["status"]
    assert waited.returncode == 0 and status["phase"] == "Succeeded", json.dumps(status, indent=2)

    stages = {s["name"]: s for s in status["stages"]}
    assert list(stages) == ["fetch", "quantize"] and all(s["phase"] == "Succeeded" for s in stages.values())
    fetch_node = client.CoreV1Api(kube_api).read_node(stages["fetch"]["node"])
    assert "nvidia.com/gpu.compute.major" not in fetch_node.metadata.labels  # the download held no GPU
    # The fetch stage read the fetched safetensors headers: one size for disk (and automatic) sizing.
    assert status["modelSize"]["weightBytes"] > 0 and status["modelSize"]["layers"] > 0

    objects = s3_server.keys(s3_bucket, "artifacts/tiny-int8sq/")
    assert "artifacts/tiny-int8sq/manifest.json" in objects
    checkpoint = next(a for a in status["artifacts"] if a["kind"] == "checkpoint")
    assert checkpoint["uri"] == f"s3://{s3_bucket}/artifacts/tiny-int8sq/hf"
    manifest = json.loads(
        s3_server.client().get_object(Bucket=s3_bucket, Key="artifacts/tiny-int8sq/manifest.json")["Body"].read()
    )
    assert manifest["metrics"]["modelBytesFetched"] == 0  # the GPU stage read the cache the fetch stage filled
    hf = next(a for a in manifest["artifacts"] if a["name"] == "hf")
    assert hf["sha256"] == checkpoint["sha256"]
    for f in hf["files"]:
        assert objects[f"artifacts/tiny-int8sq/hf/{f['path']}"]["Size"] == f["size"]

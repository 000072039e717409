"""The fetch stage on the real control plane: the real operator creates a Job without GPUs that
the real scheduler places on a node without GPUs; its progress reaches status; the quantize Job
is created only once the fetch succeeded, mounts the cache read-only and requests the disk the
fetched model's size calls for."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from kubernetes.utils import parse_quantity
from qjob_dev.localcluster import TERMINATION_MESSAGE_ANNOTATION as MESSAGE
from qjob_dev.model_sizes import LLAMA_8B
from qjob_dev.qjobs import (
    create_qjob,
    make_artifacts_pvc,
    make_calibration_configmap,
    phase_is,
    wait_qjob,
)
from qjob_dev.waits import wait_for

from tests.integration.test_operator import HOLD, jobs_of, node_labels, pods_of, report
from tests.operator_fixtures import basic_spec

pytestmark = pytest.mark.cluster


def _release(kube_api, ns, pods, result=None):
    """Let held pods finish; ``result``: the runner result their termination message carries."""
    annotations = {HOLD: "false", **({MESSAGE: json.dumps(result)} if result else {})}
    for pod in pods:
        client.CoreV1Api(kube_api).patch_namespaced_pod(
            pod.metadata.name, ns, {"metadata": {"annotations": annotations}}
        )


def test_fetch_without_gpus_then_quantize_from_the_read_only_cache(kube_api, namespace, operator):
    make_artifacts_pvc(kube_api, namespace)
    make_artifacts_pvc(kube_api, namespace, name="model-cache")
    make_calibration_configmap(kube_api, namespace)
    spec = basic_spec(engines=[], scheduling={"podAnnotations": {HOLD: "true"}}, output={"s3": {"bucket": "artifacts"}})
    spec["model"]["cacheClaimName"] = "model-cache"
    name = create_qjob(kube_api, namespace, spec)

    [fetch_pod] = wait_for(
        lambda: [p for p in pods_of(kube_api, namespace, name, "fetch") if p.spec.node_name],
        timeout=60,
        what="fetch pod bound",
    )
    assert "nvidia.com/gpu.compute.major" not in node_labels(kube_api, fetch_pod.spec.node_name)
    limits = fetch_pod.spec.containers[0].resources.limits or {}
    assert "nvidia.com/gpu" not in limits
    [cache] = [v for v in fetch_pod.spec.volumes if v.name == "model-cache"]
    assert cache.persistent_volume_claim.claim_name == "model-cache" and not cache.persistent_volume_claim.read_only
    assert [j.metadata.name for j in jobs_of(kube_api, namespace, name)] == [f"{name}-fetch"]

    message = "downloading s3://models/llama: 512/1024 MiB at 96.0 MiB/s, 5 s left"
    progress = {"step": "fetch", "percent": 50, "etaSeconds": 5, "message": message}
    report(kube_api, operator, namespace, name, "fetch", progress)
    obj = wait_qjob(
        kube_api, namespace, name, lambda s: (s.get("progress") or {}).get("percent") == 10, operator=operator
    )
    assert obj["status"]["progress"]["stage"] == "fetch/fetch"
    assert obj["status"]["progress"]["message"] == message and obj["status"]["progress"]["etaSeconds"] == 5
    # The fetch stage's result carries the size it read from the fetched safetensors headers.
    size = LLAMA_8B.model_copy(update={"weight_bytes": 16 << 30})
    _release(kube_api, namespace, [fetch_pod], {"outcome": "Succeeded", "stage": "fetch", "modelSize": size.to_api()})

    [quantize_pod] = wait_for(
        lambda: [p for p in pods_of(kube_api, namespace, name, "quantize") if p.spec.node_name],
        timeout=60,
        what="quantize pod bound after the fetch",
    )
    assert quantize_pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    [cache] = [v for v in quantize_pod.spec.volumes if v.name == "model-cache"]
    assert cache.persistent_volume_claim.read_only
    # Its scratch disk (S3 output staging) is sized from the weight bytes the fetch stage reported.
    assert wait_qjob(kube_api, namespace, name, lambda s: s.get("modelSize"))["status"]["modelSize"]["weightBytes"] == (
        16 << 30
    )
    [scratch] = [v for v in quantize_pod.spec.volumes if v.name == "cache"]
    assert parse_quantity(scratch.empty_dir.size_limit) == (2 + 16) << 30
    requested = quantize_pod.spec.containers[0].resources.requests["ephemeral-storage"]
    assert parse_quantity(requested) == (2 + 16 + 4) << 30
    _release(kube_api, namespace, [quantize_pod])
    obj = wait_qjob(kube_api, namespace, name, phase_is("Succeeded", "Failed"), timeout=90, operator=operator)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    stages = {s["name"]: s for s in obj["status"]["stages"]}
    assert stages["fetch"]["phase"] == "Succeeded" and not stages["fetch"].get("gpuProduct")  # a node without GPUs
    assert "inspect" not in stages and len(obj["status"]["plans"]) == 1  # one model stage; one attempt

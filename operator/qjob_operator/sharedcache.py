"""The objects behind the cross-namespace model cache (``modelCache.shared``; fetch.py says why
it is built this way): a job's fill Job in the shared cache's namespace, and each namespace's
read-only view of the cache's volume. Pure functions only; the reconciler creates what they return.
"""

from __future__ import annotations

import copy
from typing import Any

from qjob_api.runner import Reporting
from qjob_api.v1alpha1 import QuantizationJobSpec

from .builders import (
    CACHE_ROOT,
    QuantizationJobRef,
    build_runner_config,
    failure_policy,
    runner_container,
    runner_env,
    runner_pod_spec,
    s3_uses,
)
from .config import OperatorConfig
from .disk import HEADROOM, quantity
from .fetch import (
    CACHE_VOLUME,
    FETCH_STAGE,
    MODEL_CACHE_ROOT,
    CacheUse,
    fetch_resources,
    fill_job_name,
    prefer_nodes_without_gpus,
    shared_model,
    shared_namespace,
)
from .plan import MANAGED_BY, NodeRequirement, Stage

LABEL_FILL_FOR_NAMESPACE = "qjob.dev/fill-for-namespace"
LABEL_FILL_FOR_JOB = "qjob.dev/fill-for-job"
LABEL_VIEW = "qjob.dev/shared-cache-view"
#: A finished fill Job is gone after this (its record stays in the cache for the waiting stage).
FILL_TTL_SECONDS = 3600
#: A fill without the job's own deadline: a day (a 405B model is ~800 GB).
FILL_DEADLINE_SECONDS = 86400
#: Volume sources whose ``readOnly`` makes the kubelet mount them read-only whatever a pod asks.
#: hostPath and local have none: a view of those is read-only only in the pods the operator builds.
READ_ONLY_SOURCES = (
    "awsElasticBlockStore", "azureDisk", "azureFile", "cephfs", "cinder", "csi", "fc", "flexVolume",
    "flocker", "gcePersistentDisk", "glusterfs", "iscsi", "nfs", "portworxVolume", "quobyte", "rbd",
    "scaleIO", "storageos",
)  # fmt: skip


def fill_job(ref: QuantizationJobRef, spec: QuantizationJobSpec, config: OperatorConfig) -> dict[str, Any]:
    """The Job that fills the shared cache for ``ref``'s fetch stage: in the shared cache's
    namespace, with the platform's credentials for the source and nothing of the job's (its
    output, Secrets, ConfigMaps, scheduling and queue stay in its namespace). Not owned by the
    job (owner references do not cross namespaces): it is labelled with it and expires."""
    shared = config.model_cache.shared
    namespace = shared_namespace(config)
    model = shared_model(spec.model, shared)
    assert model is not None, "fill_job is only built for a job whose cache_use is the shared cache"
    platform = spec.model_copy(update={"model": model})
    requirement = NodeRequirement(None, (), 0, None, tolerations=tuple(config.runner.tolerations))
    stage = Stage(FETCH_STAGE, requirement, cache=CacheUse(shared.claim_name, "fill"))
    # The pipeline stages its result in the output folder: the pod's scratch, not the job's output.
    runner_config = build_runner_config(ref, platform, stage, config).model_copy(
        update={"reporting": Reporting(), "output_dir": f"{CACHE_ROOT}/output", "output_s3": None}
    )
    env = runner_env(runner_config, platform)
    volumes: list[dict[str, Any]] = [
        {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": shared.claim_name}},
        {"name": "cache", "emptyDir": {"sizeLimit": quantity(HEADROOM)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": config.runner.tmp_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": CACHE_VOLUME, "mountPath": MODEL_CACHE_ROOT},
        {"name": "cache", "mountPath": CACHE_ROOT},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    for use in s3_uses(ref, platform):
        if use.role == "model":
            env += use.env()
            ca_volumes, ca_mounts = use.volumes()
            volumes += ca_volumes
            mounts += ca_mounts
    env += [{"name": k, "value": v} for k, v in sorted(config.runner.env.items())]
    resources = fetch_resources(config)
    resources["requests"]["ephemeral-storage"] = quantity(HEADROOM)
    container = runner_container(config, env, resources, mounts)
    pod_spec = runner_pod_spec(config, container, volumes, list(config.runner.tolerations))
    pod_spec["affinity"] = prefer_nodes_without_gpus(config)
    name = fill_job_name(ref.namespace, ref.name, ref.uid)
    labels = {**MANAGED_BY, "app.kubernetes.io/name": "qjob-fill", LABEL_FILL_FOR_NAMESPACE: ref.namespace,
              LABEL_FILL_FOR_JOB: ref.name}  # fmt: skip
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {"qjob.dev/fill-for": f"{ref.namespace}/{ref.name} (uid {ref.uid})"},
        },
        "spec": {
            "backoffLimit": spec.run_policy.backoff_limit,
            "completions": 1,
            "parallelism": 1,
            "podFailurePolicy": failure_policy(FETCH_STAGE),
            "ttlSecondsAfterFinished": FILL_TTL_SECONDS,
            # A live but stuck download keeps its record fresh: only a deadline ends it.
            "activeDeadlineSeconds": spec.run_policy.active_deadline_seconds or FILL_DEADLINE_SECONDS,
            "template": {"metadata": {"labels": {**config.runner.pod_labels, **labels}}, "spec": pod_spec},
        },
    }


def view_volume_name(namespace: str) -> str:
    return f"qjob-shared-model-cache-{namespace}"


def view_volume(cache_volume: dict[str, Any], namespace: str, config: OperatorConfig) -> tuple[dict[str, Any], bool]:
    """``namespace``'s read-only view of the shared cache: a PersistentVolume with the same source
    as ``cache_volume`` (the PV the shared claim is bound to), reserved for the view claim, never
    deleting the data it points at. Returns it and whether the kubelet enforces read-only (the
    source has a ``readOnly`` field)."""
    source = copy.deepcopy(cache_volume["spec"])
    for field in ("claimRef", "storageClassName", "persistentVolumeReclaimPolicy", "accessModes"):
        source.pop(field, None)
    enforced = False
    for kind in READ_ONLY_SOURCES:
        if kind in source:
            source[kind]["readOnly"] = enforced = True
    volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": view_volume_name(namespace), "labels": {**MANAGED_BY, LABEL_VIEW: namespace}},
        "spec": {
            **source,
            "accessModes": ["ReadOnlyMany"],
            # Deleting a view must never delete the shared data behind it.
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "claimRef": {"namespace": namespace, "name": config.model_cache.shared.view_claim_name},
        },
    }
    return volume, enforced


def view_claim(volume: dict[str, Any], namespace: str, config: OperatorConfig) -> dict[str, Any]:
    """The claim in ``namespace`` bound to its view (by name: no provisioner is involved)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": config.model_cache.shared.view_claim_name,
            "namespace": namespace,
            "labels": {**MANAGED_BY, LABEL_VIEW: namespace},
        },
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": "",
            "volumeName": volume["metadata"]["name"],
            "resources": {"requests": {"storage": volume["spec"]["capacity"]["storage"]}},
        },
    }

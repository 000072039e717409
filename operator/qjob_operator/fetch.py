"""The fetch stage: the model downloaded into the shared cache PVC by a pod without GPUs.

With a cache claim (``spec.model.cacheClaimName``, else the operator's ``modelCache.claimName``)
and a Hugging Face or S3 model, the plan becomes ``fetch -> quantize -> build-*``. The fetch
Job requests no GPU and prefers nodes without GPUs; it mounts the cache read-write. GPU stages
mount it read-only and start from the entry the fetch stage recorded, so no GPU waits for a
download and a second job (or a retry) on the same model downloads nothing. The fetch stage
also reads the fetched files' safetensors headers and reports the model's size
(``status.modelSize``: it sizes the GPU pods' disk, and automatic sizing plans from it, so no
separate inspect stage runs). Pure functions only.
"""

from __future__ import annotations

from typing import Any

from qjob_api.v1alpha1 import QuantizationJobSpec

from .config import OperatorConfig

FETCH_STAGE = "fetch"
MODEL_CACHE_ROOT = "/mnt/model-cache"
CACHE_VOLUME = "model-cache"


def cache_claim(spec: QuantizationJobSpec, config: OperatorConfig) -> str | None:
    """The cache PVC a job uses, or None (model on a PVC is read in place; no cache configured)."""
    if spec.model.pvc:
        return None
    return spec.model.cache_claim_name or config.model_cache.claim_name or None


def prefer_nodes_without_gpus(config: OperatorConfig) -> dict[str, Any]:
    """Preferred (not required) affinity: a download should not hold a GPU node's slot, but on a
    cluster of GPU nodes only it still runs."""
    no_gpu = {"key": config.node_labels.compute_major, "operator": "DoesNotExist"}
    return {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "preference": {"matchExpressions": [no_gpu]}}
            ]
        }
    }


def fetch_resources(config: OperatorConfig) -> dict[str, Any]:
    settings = config.model_cache
    return {
        "requests": {"cpu": settings.cpu, "memory": settings.memory},
        "limits": {"memory": settings.memory},
    }


def cache_volume(claim: str, stage_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The cache PVC: read-write for the fetch stage, read-only for every other stage."""
    read_only = stage_name != FETCH_STAGE
    volume = {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}
    return volume, {"name": CACHE_VOLUME, "mountPath": MODEL_CACHE_ROOT, "readOnly": read_only}

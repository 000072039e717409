"""The fetch stage: the model downloaded into the shared cache PVC by a pod without GPUs.

With a cache claim (``spec.model.cacheClaimName``, else the operator's ``modelCache.claimName``)
and a Hugging Face or S3 model, the plan becomes ``fetch -> quantize -> build-*``. The fetch
Job requests no GPU and prefers nodes without GPUs; it mounts the cache read-write. GPU stages
mount it read-only and start from the entry the fetch stage recorded, so no GPU waits for a
download and a second job (or a retry) on the same model downloads nothing. The fetch stage
also reads the fetched files' safetensors headers and reports the model's size
(``status.modelSize``: it sizes the GPU pods' disk, and automatic sizing plans from it, so no
separate inspect stage runs).

**Across namespaces** (the operator's ``modelCache.shared`` policy; see docs/model-cache.md): a
PVC is namespaced, and whatever enters a cache becomes readable by everyone who mounts it, so a
cache shared by several namespaces is filled only from the shared cache's own namespace, by a
*fill Job* that reads sources the policy declares shareable with the *platform's* credentials
(never a job's). Each namespace of the policy gets a read-only view of the same volume (a
PersistentVolume copied from the cache's, bound to a claim in that namespace: KServe's
LocalModelCache binds its node caches into namespaces the same way). The job's own fetch stage
mounts that view, downloads nothing and follows the fill Job's record. A job that names its own
Hub token, or a source the policy does not list, uses its namespace's cache as before.
Pure functions only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from qjob_api.v1alpha1 import ModelSpec, QuantizationJobSpec, SecretKeyRef

from .config import OperatorConfig, SharedCacheSettings

FETCH_STAGE = "fetch"
MODEL_CACHE_ROOT = "/mnt/model-cache"
CACHE_VOLUME = "model-cache"


#: Key of the platform's Hub token in ``modelCache.shared.huggingFace.tokenSecret``.
SHARED_TOKEN_KEY = "token"


@dataclass(frozen=True)
class CacheUse:
    """The model cache a job's pods mount, and how its fetch stage fills it (RunnerModel.cache_role)."""

    claim: str
    #: ``own``: the fetch stage downloads into ``claim``; ``wait``: ``claim`` is the namespace's
    #: read-only view of the shared cache, which a fill Job fills; ``fill``: that fill Job.
    role: Literal["own", "wait", "fill"] = "own"

    def read_only(self, stage_name: str) -> bool:
        return stage_name != FETCH_STAGE or self.role == "wait"


def _under(prefix: str, root: str) -> bool:
    prefix, root = prefix.strip("/"), root.strip("/")
    return not root or prefix == root or prefix.startswith(f"{root}/")


def shared_model(model: ModelSpec, shared: SharedCacheSettings) -> ModelSpec | None:
    """The model as the fill Job reads it, with the platform's credentials, when the policy shares
    its source; else None. A job that names its own Hub token asks for what that token can read,
    which is its team's, so it is never shared."""
    if hf := model.hugging_face:
        if not shared.hugging_face.enabled or hf.token_secret_ref:
            return None
        token = shared.hugging_face.token_secret
        platform = hf.model_copy(
            update={"token_secret_ref": SecretKeyRef(name=token, key=SHARED_TOKEN_KEY) if token else None}
        )
        return model.model_copy(update={"hugging_face": platform})
    if s3 := model.s3:
        for listed in shared.s3:
            same_store = (listed.endpoint or "", listed.region, listed.bucket) == (
                s3.endpoint or "",
                s3.region,
                s3.bucket,
            )
            if same_store and _under(s3.prefix, listed.prefix):
                return model.model_copy(update={"s3": listed.model_copy(update={"prefix": s3.prefix})})
    return None


def cache_use(spec: QuantizationJobSpec, config: OperatorConfig, namespace: str) -> CacheUse | None:
    """The cache a job in ``namespace`` uses, or None (a model on a PVC is read in place; no cache
    configured: the quantize pod downloads the model itself). A claim the job names wins; then the
    shared cache, when the policy covers the namespace and shares the source (and the Hub, for a
    Hub calibration dataset, which the fill Job fetches too); then the namespace's cache."""
    if spec.model.pvc:
        return None
    if spec.model.cache_claim_name:
        return CacheUse(spec.model.cache_claim_name)
    shared = config.model_cache.shared
    hub_data = spec.calibration.dataset.hugging_face is not None
    if shared.covers(namespace) and shared_model(spec.model, shared) and (shared.hugging_face.enabled or not hub_data):
        return CacheUse(shared.view_claim_name, "wait")
    return CacheUse(config.model_cache.claim_name) if config.model_cache.claim_name else None


def shared_namespace(config: OperatorConfig) -> str:
    """Where the shared cache's claim lives and its fill Jobs run."""
    return config.model_cache.shared.namespace or config.operator_namespace


def fill_job_name(namespace: str, name: str, uid: str) -> str:
    """The fill Job of one job's fetch stage (in the shared cache's namespace), also its record's
    name: one per job, so two jobs' records never mix; the cache's lock makes them download once."""
    return "qjob-fill-" + hashlib.sha256(f"{namespace}/{name}/{uid}".encode()).hexdigest()[:16]


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


def cache_volume(cache: CacheUse, stage_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The cache PVC: read-write for the fetch stage that fills it, read-only for every other stage."""
    read_only = cache.read_only(stage_name)
    volume = {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache.claim, "readOnly": read_only}}
    return volume, {"name": CACHE_VOLUME, "mountPath": MODEL_CACHE_ROOT, "readOnly": read_only}

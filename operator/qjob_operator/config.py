"""Operator configuration: a YAML file (the Helm chart mounts it from a ConfigMap) plus a few
environment overrides. Every setting has a default, so ``qjob-operator`` runs with none."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel
from qjob_api.capabilities import COMPUTE_CAPABILITIES, GPUArchitecture
from qjob_api.v1alpha1 import S3Location

CONFIG_ENV = "QJOB_OPERATOR_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/qjob-operator/config.yaml"


class _Settings(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class NodeLabelKeys(_Settings):
    """Node label keys (GPU feature discovery's by default; clusters that relabel set their own)."""

    compute_major: str = "nvidia.com/gpu.compute.major"
    compute_minor: str = "nvidia.com/gpu.compute.minor"
    family: str = "nvidia.com/gpu.family"
    product: str = "nvidia.com/gpu.product"
    memory_mib: str = "nvidia.com/gpu.memory"
    gpu_resource: str = "nvidia.com/gpu"


class Policy(_Settings):
    """What the cluster's platform team allows."""

    allow_trust_remote_code: bool = False
    max_gpus_per_pod: int = Field(8, ge=1)
    # Automatic sizing (spec.resources.gpus 0) plans within these; larger plans are refused.
    max_gpus_per_job: int = Field(16, ge=1)
    # Pods (torchrun nodes) one quantize stage may span: 2 = maxGpusPerJob / maxGpusPerPod.
    max_pods_per_stage: int = Field(2, ge=1)
    allowed_output_claims: list[str] = Field(default_factory=list, description="Empty: any claim.")
    allowed_output_buckets: list[str] = Field(default_factory=list, description="S3 buckets; empty: any bucket.")
    # What job authors may set on runner pods (spec.scheduling).
    allowed_priority_classes: list[str] = Field(
        default_factory=list, description="Empty: any PriorityClass except system-* (cluster components')."
    )
    allow_tolerate_all: bool = Field(False, description="Allow a toleration without a key (tolerates every taint).")
    allowed_toleration_keys: list[str] = Field(default_factory=list, description="Empty: any taint key.")
    allowed_node_selector_keys: list[str] = Field(default_factory=list, description="Empty: any label key.")


class RunnerSettings(_Settings):
    """How runner pods are built."""

    image: str = "ghcr.io/qjob-dev/qjob-runner:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    # Added to every runner pod, e.g. HF_ENDPOINT for a hub mirror or HF_HUB_OFFLINE=1.
    env: dict[str, str] = Field(default_factory=dict)
    # GPU nodes are usually tainted; runner pods tolerate these in addition to spec ones.
    tolerations: list[dict] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    # Added to every runner pod (a job's spec.scheduling.podLabels/podAnnotations add to these).
    pod_labels: dict[str, str] = Field(default_factory=dict)
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    shm_size: str = "16Gi"
    # Scratch volume of a runner pod when nothing better is known (see disk.py), and /tmp's size.
    scratch_size: str = "200Gi"
    tmp_size: str = "4Gi"
    run_as_user: int | None = 1000  # None: the cluster assigns UID and fsGroup (OpenShift)
    # The pods' ServiceAccount. They get no API token from it (automountServiceAccountToken is
    # off), only a projected token for the report endpoint's audience, so its RBAC never applies.
    service_account_name: str = "default"
    # Child Jobs are kept for inspection until the QuantizationJob is deleted; set to clean them earlier.
    job_ttl_seconds_after_finished: int | None = None


class SharedHuggingFace(_Settings):
    """Hugging Face models in the cross-namespace cache."""

    enabled: bool = False
    # Secret (key ``token``) in the shared cache's namespace: the platform's Hub token, so what it can
    # read is shared on purpose. Empty: anonymous, i.e. public models only. A job that names its own
    # token (spec.model.huggingFace.tokenSecretRef) never uses the shared cache.
    token_secret: str = Field("", max_length=253)


class SharedCacheSettings(_Settings):
    """One model cache read by several namespaces: an explicit policy, since whatever enters it
    becomes readable by all of them (see qjob_operator/fetch.py)."""

    # Namespaces whose jobs read the shared cache; ["*"]: every namespace the operator watches.
    namespaces: list[str] = Field(default_factory=list)
    # Where its claim lives and its fill Jobs run; empty: the operator's namespace.
    namespace: str = Field("", max_length=63)
    # PersistentVolumeClaim (ReadWriteMany) holding the cache; empty: nothing is shared.
    claim_name: str = Field("", max_length=253)
    # The read-only claim the operator binds in each namespace to a copy of the cache's volume.
    view_claim_name: str = Field("qjob-shared-model-cache", max_length=253)
    hugging_face: SharedHuggingFace = Field(default_factory=SharedHuggingFace)
    # S3 prefixes whose models are shared, read with these locations' credentials (Secrets in the
    # shared cache's namespace), never a job's; a job's spec.model.s3 under one of them is shared.
    s3: list[S3Location] = Field(default_factory=list)
    # A job's fetch stage fails (retryably) when its fill Job's record has not changed for this long.
    fill_stall_seconds: int = Field(600, ge=10)

    def covers(self, namespace: str) -> bool:
        return bool(self.claim_name and namespace) and ("*" in self.namespaces or namespace in self.namespaces)


class ModelCacheSettings(_Settings):
    """The shared model cache and the pods that fill it (see qjob_operator/fetch.py)."""

    # PersistentVolumeClaim (ReadWriteMany) in each job's namespace; a job's spec.model.cacheClaimName
    # overrides it. Empty: no fetch stage, the quantize pod downloads the model itself.
    claim_name: str = ""
    # Bound of the cache (least recently used entries no running stage reads are evicted to stay
    # under it); empty: 90% of the volume. Entries used within keep_seconds are never evicted.
    max_size: str = Field("", pattern=r"^([0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?)?$")
    keep_seconds: int = Field(86400, ge=0)
    # What a fetch pod (no GPU) requests.
    cpu: str = "1"
    memory: str = "4Gi"
    shared: SharedCacheSettings = Field(default_factory=SharedCacheSettings)


class ReportSettings(_Settings):
    """The HTTPS endpoint runner pods send progress to (see reports.py)."""

    port: int = 8443
    # How runner pods reach it (the chart's Service); its host is the serving certificate's name.
    url: str = "https://qjob-operator.qjob-system.svc:8443"
    # Audience of the runners' projected ServiceAccount tokens (TokenReview checks it).
    audience: str = "qjob.dev/report"
    # Secret (in the operator's namespace) holding ca.crt, tls.crt, tls.key, shared by replicas:
    # created by the first replica when missing, or provided (e.g. by cert-manager). Empty: a
    # certificate made in memory at start (one replica, development).
    tls_secret: str = "qjob-operator-report-tls"
    # Filled in at start from the serving certificate (runner pods trust it); never from the file.
    ca_cert: str = Field("", exclude=True)

    def stage_url(self, namespace: str, name: str, stage: str) -> str:
        return f"{self.url.rstrip('/')}/v1/namespaces/{namespace}/quantizationjobs/{name}/stages/{stage}/progress"


class LeaderElection(_Settings):
    """Active/standby replicas: only the holder of the Lease reconciles (client-go's semantics)."""

    enabled: bool = True
    lease_name: str = "qjob-operator"
    lease_duration_seconds: float = Field(15.0, gt=0)
    renew_deadline_seconds: float = Field(10.0, gt=0)
    retry_period_seconds: float = Field(2.0, gt=0)


class OperatorConfig(_Settings):
    """Top-level operator settings."""

    namespaces: list[str] = Field(default_factory=list, description="Namespaces to watch; empty: all.")
    node_labels: NodeLabelKeys = Field(default_factory=NodeLabelKeys)
    # Architecture -> compute capabilities ("major.minor") that count as that architecture.
    architectures: dict[GPUArchitecture, list[str]] = Field(
        default_factory=lambda: {a: [f"{ma}.{mi}" for ma, mi in ccs] for a, ccs in COMPUTE_CAPABILITIES.items()}
    )
    runner: RunnerSettings = Field(default_factory=RunnerSettings)
    policy: Policy = Field(default_factory=Policy)
    model_cache: ModelCacheSettings = Field(default_factory=ModelCacheSettings)
    reports: ReportSettings = Field(default_factory=ReportSettings)
    leader_election: LeaderElection = Field(default_factory=LeaderElection)
    # Where the Lease and the TLS Secret live ($POD_NAMESPACE in the chart's pod).
    operator_namespace: str = "qjob-system"
    metrics_port: int = 9090
    health_port: int = 8080
    # Status writes per second, all jobs together (bursts of new jobs then create Jobs first).
    status_writes_per_second: float = Field(20.0, gt=0)
    # Per job: a status change that is not a phase or reason change (progress, stage details)
    # waits until this long after the job's previous write; the changes in between coalesce.
    status_write_interval_seconds: float = Field(5.0, ge=0)
    # How often every unfinished job is re-checked for deadlines (events drive everything else).
    resync_seconds: float = Field(30.0, gt=0)

    @field_validator("architectures")
    @classmethod
    def _capabilities_parse(cls, value: dict[GPUArchitecture, list[str]]) -> dict[GPUArchitecture, list[str]]:
        for arch, ccs in value.items():
            for cc in ccs:
                major, _, minor = cc.partition(".")
                if not (major.isdigit() and minor.isdigit()):
                    raise ValueError(f"architectures.{arch.value}: {cc!r} is not a compute capability like '9.0'")
        return value

    def compute_capabilities(self, arch: GPUArchitecture) -> list[tuple[str, str]]:
        return [tuple(cc.split(".", 1)) for cc in self.architectures.get(arch, [])]

    def architecture_of(self, major: str | int, minor: str | int) -> GPUArchitecture | None:
        """The configured architecture of a compute capability (the one the scheduling uses)."""
        cc = f"{int(major)}.{int(minor)}"
        return next((arch for arch, ccs in self.architectures.items() if cc in ccs), None)


def load_config(path: str | os.PathLike | None = None) -> OperatorConfig:
    """Reads the config file (``$QJOB_OPERATOR_CONFIG``, else the default path if present).
    ``QJOB_NAMESPACES`` (comma-separated), ``QJOB_RUNNER_IMAGE`` and ``POD_NAMESPACE`` override the file."""
    path = path or os.environ.get(CONFIG_ENV) or (DEFAULT_CONFIG_PATH if Path(DEFAULT_CONFIG_PATH).exists() else None)
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    config = OperatorConfig.model_validate(data or {})
    if namespaces := os.environ.get("QJOB_NAMESPACES"):
        config.namespaces = [n.strip() for n in namespaces.split(",") if n.strip()]
    if image := os.environ.get("QJOB_RUNNER_IMAGE"):
        config.runner.image = image
    if namespace := os.environ.get("POD_NAMESPACE"):
        config.operator_namespace = namespace
    return config

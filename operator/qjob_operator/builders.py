"""Pure functions that turn a QuantizationJob into the Kubernetes objects that run it.

No I/O here: every function takes the parsed job and the operator config and returns plain
manifests (dicts), so they are unit-tested without a cluster and reused by ``qjob run --local``.
"""

from __future__ import annotations

from typing import Any

from qjob_api.runner import (
    CONFIG_ENV,
    INSPECT_STAGE,
    NON_RETRYABLE_EXIT_CODES,
    REPORT_TOKEN_PATH,
    REUSE_STAGE,
    ExitCode,
    Reporting,
    RunnerCalibration,
    RunnerConfig,
    RunnerDataset,
    RunnerModel,
    RunnerReuse,
)
from qjob_api.v1alpha1 import API_VERSION, KIND, PVCLocation, QuantizationJobSpec, quantity_to_mib
from qjob_api.work import recipe_of

from . import multipod, reuse
from .config import OperatorConfig
from .disk import quantity, scratch_plan
from .fetch import (
    FETCH_STAGE,
    MODEL_CACHE_ROOT,
    cache_volume,
    fetch_resources,
    fill_job_name,
    prefer_nodes_without_gpus,
    shared_namespace,
)
from .objectstore import S3Use
from .plan import (
    GPU_LESS_STAGES,
    LABEL_QUANTIZATION_JOB,
    LABEL_STAGE,
    MANAGED_BY,
    QUANTIZE_STAGE,
    NodeRequirement,
    Stage,
)

RUNNER_CONTAINER = "runner"
PVC_ROOT = "/mnt/pvc"
CALIBRATION_ROOT = "/mnt/calibration"
CACHE_ROOT = "/var/cache/qjob"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: The inspect stage reads safetensors headers and config.json: no GPU, little memory.
INSPECT_RESOURCES = {"cpu": "500m", "memory": "1Gi"}


class QuantizationJobRef:
    """The identity of the QuantizationJob that children are built for."""

    def __init__(self, name: str, namespace: str, uid: str):
        self.name, self.namespace, self.uid = name, namespace, uid

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> QuantizationJobRef:
        meta = body["metadata"]
        return cls(meta["name"], meta["namespace"], meta["uid"])


def owner_reference(ref: QuantizationJobRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(ref: QuantizationJobRef, name: str, stage: str | None = None) -> dict[str, Any]:
    labels = {**MANAGED_BY, LABEL_QUANTIZATION_JOB: ref.name, "app.kubernetes.io/name": "qjob-runner"}
    if stage:
        labels[LABEL_STAGE] = stage
    return {"name": name, "namespace": ref.namespace, "labels": labels, "ownerReferences": [owner_reference(ref)]}


# ------------------------------------------------------------------------------- paths & configs


def pvc_path(location: PVCLocation) -> str:
    """Where a PVC location appears inside runner pods (each claim is mounted once, whole)."""
    return "/".join(p for p in (PVC_ROOT, location.claim_name, location.path.strip("/")) if p)


def output_location(ref: QuantizationJobRef, spec: QuantizationJobSpec) -> PVCLocation:
    out = spec.output.pvc
    return out if out.path else out.model_copy(update={"path": f"{ref.namespace}/{ref.name}"})


def s3_uses(ref: QuantizationJobRef, spec: QuantizationJobSpec, stage: Stage | None = None) -> list[S3Use]:
    """The S3 locations a job's runner pods read or write (model source, output; a reuse stage
    also reads the S3 outputs of the earlier jobs it checks)."""
    uses = []
    if spec.model.s3:
        uses.append(S3Use("model", "spec.model.s3", spec.model.s3, spec.model.s3.prefix))
    if out := spec.output.s3:
        uses.append(S3Use("output", "spec.output.s3", out, out.prefix or f"{ref.namespace}/{ref.name}"))
    candidates = stage.candidates if stage else ()
    return uses + [use for i, c in enumerate(candidates) if (use := c.s3_use(i))]


def _s3_use(ref: QuantizationJobRef, spec: QuantizationJobSpec, role: str) -> S3Use | None:
    return next((u for u in s3_uses(ref, spec) if u.role == role), None)


def output_uri(ref: QuantizationJobRef, spec: QuantizationJobSpec) -> str:
    if out := _s3_use(ref, spec, "output"):
        return out.runner().uri
    loc = output_location(ref, spec)
    return f"pvc://{loc.claim_name}/{loc.path}"


def build_runner_config(
    ref: QuantizationJobRef, spec: QuantizationJobSpec, stage: Stage, config: OperatorConfig
) -> RunnerConfig:
    """The runner's whole input for one stage: no Kubernetes objects, only paths and settings."""
    source = spec.model
    model_s3, output_s3 = _s3_use(ref, spec, "model"), _s3_use(ref, spec, "output")
    model = RunnerModel(
        path=pvc_path(source.pvc) if source.pvc else None,
        s3=model_s3.runner() if model_s3 else None,
        cache_dir=MODEL_CACHE_ROOT if stage.cache else None,
        cache_role=stage.cache.role if stage.cache else "own",
        fill_record=fill_job_name(ref.namespace, ref.name, ref.uid)
        if stage.cache and stage.cache.role != "own"
        else None,
        fill_stall_seconds=config.model_cache.shared.fill_stall_seconds,
        cache_max_bytes=quantity_to_mib(config.model_cache.max_size) * 2**20 if config.model_cache.max_size else None,
        cache_keep_seconds=config.model_cache.keep_seconds,
        hf_repo=source.hugging_face.repo if source.hugging_face else None,
        revision=source.hugging_face.revision if source.hugging_face else "main",
        task=source.task,
        trust_remote_code=source.trust_remote_code,
        dtype=source.dtype,
    )
    data = spec.calibration.dataset
    if data.pvc:
        dataset = RunnerDataset(path=pvc_path(data.pvc))
    elif data.config_map:
        dataset = RunnerDataset(path=f"{CALIBRATION_ROOT}/{data.config_map.key}")
    else:
        dataset = RunnerDataset(hugging_face=data.hugging_face)
    engine = next((e for e in spec.engines if e.architecture == stage.architecture), None)
    plan = stage.plan
    return RunnerConfig(
        job=ref.name,
        job_uid=ref.uid,
        stage=stage.name,
        model=model,
        quantization=spec.quantization,
        calibration=RunnerCalibration(
            dataset=dataset,
            samples=spec.calibration.samples,
            sequence_length=spec.calibration.sequence_length,
            batch_size=plan.batch_size if plan else spec.calibration.batch_size,
            layerwise=plan.layerwise if plan else spec.calibration.layerwise,
        ),
        export=spec.export,
        evaluation=spec.evaluation,
        serving=spec.serving,
        target_architectures=spec.target_architectures(),
        engine=engine,
        # An S3 output is staged in the pod's scratch volume and uploaded from there.
        output_dir=f"{CACHE_ROOT}/output" if output_s3 else pvc_path(output_location(ref, spec)),
        output_uri=output_uri(ref, spec),
        output_s3=output_s3.runner() if output_s3 else None,
        reporting=report_channel(ref, stage, config),
        work_recipe=recipe_of(spec),
        reuse=RunnerReuse(candidates=reuse.runner_candidates(list(stage.candidates), pvc_path), engines=spec.engines)
        if stage.name == REUSE_STAGE
        else None,
    )


def report_channel(ref: QuantizationJobRef, stage: Stage, config: OperatorConfig) -> Reporting:
    """How a runner pod reports progress: to the operator's endpoint, as its own pod."""
    return Reporting(
        kind="operator",
        url=config.reports.stage_url(ref.namespace, ref.name, stage.name),
        ca_cert=config.reports.ca_cert or None,
    )


# ----------------------------------------------------------------------------------- scheduling


def node_affinity(req: NodeRequirement, config: OperatorConfig) -> dict[str, Any] | None:
    """Required node affinity: one term per compute capability of the architecture (terms are
    ORed), each also requiring the minimum GPU memory when set."""
    keys = config.node_labels
    memory = (
        [{"key": keys.memory_mib, "operator": "Gt", "values": [str(req.min_gpu_memory_mib - 1)]}]
        if req.min_gpu_memory_mib
        else []
    )
    terms = [
        {
            "matchExpressions": [
                {"key": keys.compute_major, "operator": "In", "values": [major]},
                {"key": keys.compute_minor, "operator": "In", "values": [minor]},
                *memory,
            ]
        }
        for major, minor in req.compute_capabilities
    ]
    if not terms and memory:
        terms = [{"matchExpressions": memory}]
    if not terms:
        return None
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}


def _volumes(
    ref: QuantizationJobRef, spec: QuantizationJobSpec, stage: Stage, config: OperatorConfig
) -> tuple[list[dict], list[dict]]:
    claims: dict[str, bool] = {spec.output.pvc.claim_name: False} if spec.output.pvc else {}  # claim -> read-only
    if spec.model.pvc:
        claims.setdefault(spec.model.pvc.claim_name, True)
    if spec.calibration.dataset.pvc:
        claims.setdefault(spec.calibration.dataset.pvc.claim_name, True)
    for candidate in stage.candidates:  # the reuse stage reads earlier jobs' outputs
        if candidate.output_pvc:
            claims.setdefault(candidate.output_pvc.claim_name, True)
    scratch = scratch_plan(spec, stage, config)
    volumes = [
        {"name": "cache", "emptyDir": {"sizeLimit": quantity(scratch.scratch_bytes)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": quantity(scratch.tmp_bytes)}},
    ]
    mounts = [
        {"name": "cache", "mountPath": CACHE_ROOT},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    for i, (claim, read_only) in enumerate(claims.items()):
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
        mounts.append({"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": read_only})
    if cm := spec.calibration.dataset.config_map:
        volumes.append(
            {"name": "calibration", "configMap": {"name": cm.name, "items": [{"key": cm.key, "path": cm.key}]}}
        )
        mounts.append({"name": "calibration", "mountPath": CALIBRATION_ROOT, "readOnly": True})
    for use in s3_uses(ref, spec, stage):
        ca_volumes, ca_mounts = use.volumes()
        volumes += ca_volumes
        mounts += ca_mounts
    if stage.cache:
        volume, mount = cache_volume(stage.cache, stage.name)
        volumes.append(volume)
        mounts.append(mount)
    return volumes, mounts


def _env(
    ref: QuantizationJobRef, spec: QuantizationJobSpec, stage: Stage, config: OperatorConfig
) -> list[dict[str, Any]]:
    # The RunnerConfig travels inline in the Job (one object fewer per job than a ConfigMap,
    # nothing to mount, and `kubectl get job -o yaml` shows exactly what the runner ran).
    env = runner_env(build_runner_config(ref, spec, stage, config), spec)
    # With a cache, only the fetch stage that fills it reads the model source (and the reuse stage,
    # which resolves its revision); a fetch stage waiting on the shared cache's fill Job reads nothing.
    fills = stage.name == FETCH_STAGE and stage.cache and stage.cache.role != "wait"
    reads_source = not stage.cache or fills or stage.name == REUSE_STAGE
    for use in s3_uses(ref, spec, stage):
        if reads_source or use.role != "model":
            env += use.env()
    if stage.cache and stage.cache.role == "wait":  # its messages name where the fill Job runs
        env.append({"name": "QJOB_SHARED_CACHE_NAMESPACE", "value": shared_namespace(config)})
    env += [{"name": k, "value": v} for k, v in sorted(config.runner.env.items())]
    return env


def runner_env(runner_config: RunnerConfig, spec: QuantizationJobSpec) -> list[dict[str, Any]]:
    """What every runner container has: its config, where it caches, and the Hub token if any."""
    env = [
        {"name": CONFIG_ENV, "value": runner_config.model_dump_json(by_alias=True, exclude_none=True)},
        {"name": "HF_HOME", "value": f"{CACHE_ROOT}/huggingface"},
        {"name": "QJOB_MODEL_CACHE", "value": f"{CACHE_ROOT}/models"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "QJOB_TERMINATION_LOG", "value": "/dev/termination-log"},
        {"name": "QJOB_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]
    hf = spec.model.hugging_face
    if hf and hf.token_secret_ref:
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": hf.token_secret_ref.name, "key": hf.token_secret_ref.key}},
            }
        )
    return env


def runner_container(config: OperatorConfig, env: list[dict], resources: dict, mounts: list[dict]) -> dict[str, Any]:
    return {
        "name": RUNNER_CONTAINER,
        "image": config.runner.image,
        "imagePullPolicy": config.runner.image_pull_policy,
        "command": ["qjob-runner"],
        "env": env,
        "resources": resources,
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def runner_pod_spec(config: OperatorConfig, container: dict, volumes: list[dict], tolerations: list[dict]) -> dict:
    """A runner pod: no API token, non-root, the runtime's seccomp profile."""
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": config.runner.service_account_name,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            **(
                {"runAsUser": config.runner.run_as_user, "fsGroup": config.runner.run_as_user}
                if config.runner.run_as_user is not None
                else {}
            ),
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
        "tolerations": tolerations,
    }
    if config.runner.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in config.runner.image_pull_secrets]
    return pod_spec


def failure_policy(stage_name: str) -> dict[str, Any]:
    """Exit codes that fail the Job at once (retrying cannot help), disruptions that do not count."""
    return {
        "rules": [
            # Bad config, bad input or a failed quality gate: retrying cannot help.
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": RUNNER_CONTAINER,
                    "operator": "In",
                    "values": [int(c) for c in NON_RETRYABLE_EXIT_CODES],
                },
            },
            # Evictions and preemptions are not the runner's fault: do not count them.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            # Out of memory: the same pod would fail the same way; the operator re-plans.
            *(
                [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": RUNNER_CONTAINER,
                            "operator": "In",
                            "values": [int(ExitCode.OUT_OF_MEMORY)],
                        },
                    }
                ]
                if stage_name == QUANTIZE_STAGE
                else []
            ),
        ]
    }


def build_job(
    ref: QuantizationJobRef, spec: QuantizationJobSpec, stage: Stage, config: OperatorConfig
) -> dict[str, Any]:
    """The batch/v1 Job of one stage."""
    volumes, mounts = _volumes(ref, spec, stage, config)
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": config.runner.shm_size}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    # The runner's only credential: a token for the report endpoint's audience, bound to this pod
    # (invalid once the pod is gone). The Kubernetes API refuses it.
    token_dir, token_file = REPORT_TOKEN_PATH.rsplit("/", 1)
    volumes.append(
        {
            "name": "report-token",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": config.reports.audience,
                            "expirationSeconds": 3600,
                            "path": token_file,
                        }
                    }
                ]
            },
        }
    )
    mounts.append({"name": "report-token", "mountPath": token_dir, "readOnly": True})
    gpu = config.node_labels.gpu_resource
    if stage.name in (FETCH_STAGE, REUSE_STAGE):  # downloads, hashes and copies: the model cache's share
        resources = fetch_resources(config)
    elif stage.name == INSPECT_STAGE:
        resources = {"requests": dict(INSPECT_RESOURCES), "limits": {"memory": INSPECT_RESOURCES["memory"]}}
    else:
        gpus = {gpu: str(stage.requirement.gpus)}
        requests = {"cpu": spec.resources.cpu, "memory": spec.resources.memory, **gpus}
        resources = {"requests": requests, "limits": {"memory": spec.resources.memory, **gpus}}
    resources["requests"]["ephemeral-storage"] = quantity(scratch_plan(spec, stage, config).request_bytes)
    container = runner_container(config, _env(ref, spec, stage, config), resources, mounts)
    pod_spec = runner_pod_spec(config, container, volumes, list(stage.requirement.tolerations))
    if spec.scheduling.node_selector:
        pod_spec["nodeSelector"] = dict(spec.scheduling.node_selector)
    if stage.name in GPU_LESS_STAGES:
        pod_spec["affinity"] = prefer_nodes_without_gpus(config)
    elif affinity := node_affinity(stage.requirement, config):
        pod_spec["affinity"] = affinity
    if spec.scheduling.priority_class_name:
        pod_spec["priorityClassName"] = spec.scheduling.priority_class_name

    metadata = _metadata(ref, stage.job_name(ref.name), stage.name)
    queued = bool(spec.scheduling.queue_name)
    if queued:
        metadata["labels"][KUEUE_QUEUE_LABEL] = spec.scheduling.queue_name
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.run_policy.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        # Kueue admits a queued Job by un-suspending it; otherwise suspend follows runPolicy.
        "suspend": True if queued else spec.run_policy.suspend,
        "podFailurePolicy": failure_policy(stage.name),
        "template": {
            "metadata": {
                "labels": {**config.runner.pod_labels, **spec.scheduling.pod_labels, **metadata["labels"]},
                "annotations": {**config.runner.pod_annotations, **spec.scheduling.pod_annotations},
            },
            "spec": pod_spec,
        },
    }
    if spec.run_policy.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    if config.runner.job_ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = config.runner.job_ttl_seconds_after_finished
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}
    return multipod.spread(job, stage.plan) if stage.plan and stage.plan.pods > 1 else job

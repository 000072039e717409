"""Stages of a QuantizationJob (each one a batch/v1 Job) and what each needs from a node.

A GPU-less ``reuse`` stage comes first when an identical finished job may be reused (reuse.py);
once it reused that job's artifacts it is the only stage. At most one GPU-less *model stage*
comes next (``model_stage``): ``fetch`` with a shared model
cache (fetch.py) downloads the model and reports its size; without a cache, ``inspect`` reads only
the size when GPUs are sized automatically. ``quantize`` (calibrate, quantize, export, evaluate)
then runs on any GPU node that fits;
``build-<arch>`` stages then run in parallel, one per engine target, each on a node of that
architecture because an engine only runs on the compute capability that built it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

from qjob_api.capabilities import GPUArchitecture
from qjob_api.runner import INSPECT_STAGE, REUSE_STAGE
from qjob_api.v1alpha1 import ModelSize, QuantizationJobSpec, QuantizePlan, quantity_to_mib

from .config import OperatorConfig
from .fetch import FETCH_STAGE, CacheUse, cache_use
from .reuse import Candidate, ReuseState

#: The GPU-less stages that come before ``quantize`` (a job has at most one of them).
MODEL_STAGES = (FETCH_STAGE, INSPECT_STAGE)
#: Stages whose pods request no GPU and prefer nodes without GPUs.
GPU_LESS_STAGES = (REUSE_STAGE, *MODEL_STAGES)

QUANTIZE_STAGE = "quantize"
LABEL_PREFIX = "qjob.dev"
LABEL_QUANTIZATION_JOB = f"{LABEL_PREFIX}/job-name"
LABEL_STAGE = f"{LABEL_PREFIX}/stage"
MANAGED_BY = {"app.kubernetes.io/managed-by": "qjob-operator"}


def build_stage(arch: GPUArchitecture) -> str:
    return f"build-{arch.value}"


@dataclass(frozen=True)
class NodeRequirement:
    """What a stage's pod needs from a node; becomes required node affinity and resource requests,
    and is evaluated against the node list to detect "no node can ever run this"."""

    architecture: GPUArchitecture | None
    compute_capabilities: tuple[tuple[str, str], ...]  # (major, minor) label values; empty: any
    gpus: int
    min_gpu_memory_mib: int | None
    node_selector: dict[str, str] = field(default_factory=dict)
    #: the operator's runner tolerations, then the spec's (pod tolerations and the fit check)
    tolerations: tuple[dict[str, Any], ...] = ()

    def describe(self, config: OperatorConfig) -> str:
        parts = [f"{self.gpus} allocatable {config.node_labels.gpu_resource}"]
        if self.architecture:
            ccs = " or ".join(f"{ma}.{mi}" for ma, mi in self.compute_capabilities)
            parts.append(f"{self.architecture.value} GPUs (compute capability {ccs})")
        if self.min_gpu_memory_mib:
            parts.append(f"at least {self.min_gpu_memory_mib} MiB per GPU ({config.node_labels.memory_mib})")
        parts += [f"{k}={v}" for k, v in sorted(self.node_selector.items())]
        return ", ".join(parts)


@dataclass(frozen=True)
class Stage:
    name: str
    requirement: NodeRequirement
    after: tuple[str, ...] = ()
    architecture: GPUArchitecture | None = None
    #: Weight bytes the model stage reported (status.modelSize; sizes the disk of the stages after it).
    model_bytes: int | None = None
    #: The quantize stage's current plan (GPUs, pods, batch); its attempt names the Job.
    plan: QuantizePlan | None = None
    #: The earlier jobs the reuse stage checks (reuse stage only).
    candidates: tuple[Candidate, ...] = ()
    #: The model cache its pod mounts (fetch.cache_use), if any.
    cache: CacheUse | None = None

    @property
    def pods(self) -> int:
        return self.plan.pods if self.plan else 1

    def job_name(self, job_name: str) -> str:
        return self.plan.job_name if self.plan else child_name(job_name, self.name)


def quantize_job_name(job_name: str, attempt: int) -> str:
    """Attempt 1 keeps the plain stage name; a re-planned attempt gets its own Job."""
    return child_name(job_name, QUANTIZE_STAGE if attempt == 1 else f"{QUANTIZE_STAGE}-{attempt}")


def model_stage(spec: QuantizationJobSpec, config: OperatorConfig, namespace: str) -> str | None:
    """The one GPU-less stage before ``quantize``, if any: ``fetch`` with a model cache (it
    downloads the model, or follows the shared cache's fill Job, and reports its size), else
    ``inspect`` when GPUs are sized automatically (spec.resources.gpus 0: it only reads the size),
    else none."""
    if cache_use(spec, config, namespace):
        return FETCH_STAGE
    return INSPECT_STAGE if spec.resources.gpus == 0 else None


def plan_stages(
    spec: QuantizationJobSpec,
    config: OperatorConfig,
    plan: QuantizePlan | None = None,
    model_size: ModelSize | None = None,
    reuse: ReuseState | None = None,
    *,
    namespace: str = "",
) -> list[Stage]:
    """The stages of a job in ``namespace``, in order: ``reuse`` when ``reuse`` says so (once it
    reused, only the builds of engines that did not come with the checkpoint follow it), the model
    stage (``model_stage``), then ``quantize`` (with ``plan`` once there is one), then the builds.
    ``model_size``: what the model stage reported (sizes the later stages' disk). No namespace (a
    local run): the shared cache, a policy over namespaces, does not apply."""
    memory = quantity_to_mib(spec.resources.min_gpu_memory) if spec.resources.min_gpu_memory else None
    tolerations = (*config.runner.tolerations, *(t.to_api() for t in spec.scheduling.tolerations))

    def requirement(arch: GPUArchitecture | None, gpus: int, min_memory: int | None = memory) -> NodeRequirement:
        return NodeRequirement(
            architecture=arch,
            compute_capabilities=tuple(config.compute_capabilities(arch)) if arch else (),
            gpus=gpus,
            min_gpu_memory_mib=min_memory,
            node_selector=dict(spec.scheduling.node_selector),
            tolerations=tolerations,
        )

    calibration = spec.scheduling.calibration_architecture
    weights = model_size.weight_bytes if model_size else None
    cache = cache_use(spec, config, namespace)
    stages = []
    builds = [
        Stage(
            build_stage(e.architecture),
            requirement(e.architecture, spec.resources.gpus or 1),
            after=(QUANTIZE_STAGE,),
            architecture=e.architecture,
            model_bytes=weights,
            cache=cache,
        )
        for e in spec.engines
    ]
    if reuse and reuse.mode:
        stages.append(Stage(REUSE_STAGE, requirement(None, 0, None), candidates=tuple(reuse.candidates), cache=cache))
        if reuse.mode == "reused":  # only the engines that did not come with the checkpoint are built
            missing = [b for b in builds if b.architecture.value not in reuse.reused_engines]
            return stages + [replace(b, after=(REUSE_STAGE,)) for b in missing]
    start = tuple(s.name for s in stages)
    first = model_stage(spec, config, namespace)
    if first:
        stages.append(Stage(first, requirement(None, 0, None), after=start, cache=cache))
        start = (first,)
    if plan:
        planned_memory = max(memory or 0, plan.gpu_memory_mib or 0) or None
        quantize = requirement(calibration, plan.gpus_per_pod, planned_memory)
    else:
        quantize = requirement(calibration, spec.resources.gpus or 1)
    stages.append(Stage(QUANTIZE_STAGE, quantize, after=start, plan=plan, model_bytes=weights, cache=cache))
    return stages + builds


def child_name(job_name: str, suffix: str) -> str:
    """Deterministic child object name within the 63-character label/name limit."""
    name = f"{job_name}-{suffix}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{job_name[: 63 - len(suffix) - 10]}-{digest}-{suffix}"[:63]

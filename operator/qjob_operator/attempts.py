"""Attempts of the quantize stage and their plans: the first plan, and a bigger one after an OOM.

Pure: from the spec, the operator policy, the status written so far (``status.plans``,
``status.modelSize``) and the observed Jobs and pods of the model stage (fetch or inspect) and
of quantize, ``advance`` returns the plans to record and the one to run now. The status keeps
every plan, so a restarted operator continues where it was, and an attempt is never re-run with
a plan that already failed. ``observe_attempts`` wraps it for the reconciler: the stages with the current plan and what
``status.decide`` sees of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from qjob_api.reasons import EXIT_CODE_REASONS, Reason
from qjob_api.runner import INSPECT_STAGE, NON_RETRYABLE_EXIT_CODES
from qjob_api.v1alpha1 import ModelSize, QuantizationJobSpec, QuantizePlan, quantity_to_mib

from . import sizing
from .config import OperatorConfig
from .multipod import JOB_NAME_LABEL
from .nodes import NodeFit, node_fits
from .plan import QUANTIZE_STAGE, NodeRequirement, Stage, child_name, model_stage, plan_stages, quantize_job_name
from .reuse import ReuseState
from .status import Observed, classify_failed_pod, observe, runner_result

NON_RETRYABLE_REASONS = frozenset(EXIT_CODE_REASONS[c] for c in NON_RETRYABLE_EXIT_CODES)
#: Batch sizes a hand-sized plan steps down through after an OOM when the runner probed (batch 0).
MANUAL_BATCHES = (4, 2, 1)


@dataclass
class Sizing:
    """What ``advance`` decided: the plans so far (the last is current) and, when there can be
    no plan, the stable reason and message the job fails with."""

    plans: list[QuantizePlan] = field(default_factory=list)
    model_size: ModelSize | None = None
    refusal: tuple[Reason, str] | None = None

    @property
    def current(self) -> QuantizePlan | None:
        return self.plans[-1] if self.plans else None

    def status_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"plans": [p.to_api() for p in self.plans]}
        if self.model_size:
            fields["modelSize"] = self.model_size.to_api()
        return fields


def _condition(job: Mapping[str, Any] | None, type_: str) -> bool:
    return any(
        c.get("type") == type_ and c.get("status") == "True"
        for c in ((job or {}).get("status") or {}).get("conditions") or []
    )


def pods_of_job(pods: Iterable[Mapping[str, Any]], job_name: str) -> list[dict[str, Any]]:
    """The pods of one Job among those of its stage (attempts of one stage share the stage
    label; the Job controller's job-name label tells them apart; pods without it are kept)."""
    return [
        p for p in pods if ((p.get("metadata") or {}).get("labels") or {}).get(JOB_NAME_LABEL, job_name) == job_name
    ]


def limits(config: OperatorConfig) -> sizing.Limits:
    policy = config.policy
    return sizing.Limits(policy.max_gpus_per_pod, policy.max_gpus_per_job, policy.max_pods_per_stage)


def inputs(spec: QuantizationJobSpec) -> sizing.Inputs:
    return sizing.Inputs(
        algorithm=sizing.algorithm_of(spec.quantization.format, spec.quantization.algorithm),
        samples=spec.calibration.samples,
        sequence_length=spec.calibration.sequence_length,
        batch_size=spec.calibration.batch_size,
        layerwise=spec.calibration.layerwise,
        gpus=spec.resources.gpus,
    )


def node_shapes(
    nodes: Iterable[Mapping[str, Any]], base: NodeRequirement, config: OperatorConfig
) -> list[sizing.NodeShape]:
    """Nodes that could run the quantize stage with at least one GPU, by GPU memory and count."""
    keys = config.node_labels
    one = replace(base, gpus=1)
    facts = []
    for node in nodes:
        if not node_fits(node, one, config):
            continue
        labels = node["metadata"].get("labels") or {}
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        try:
            facts.append((int(labels.get(keys.memory_mib, 0)), int(allocatable.get(keys.gpu_resource, 0))))
        except ValueError:
            continue
    return sizing.node_shapes(facts)


def _from_candidate(c: sizing.Candidate, job: str, attempt: int, reason: str) -> QuantizePlan:
    return QuantizePlan(
        attempt=attempt,
        job_name=quantize_job_name(job, attempt),
        gpus_per_pod=c.gpus_per_pod,
        pods=c.pods,
        batch_size=c.batch_size,
        layerwise=c.layerwise,
        gpu_memory_mib=c.shape.memory_mib,
        estimate=c.estimate,
        reason=reason,
    )


def _signature(p: QuantizePlan) -> tuple[int, int, int, bool]:
    return (p.gpus_per_pod, p.pods, p.batch_size, p.layerwise)


def _auto_plan(
    spec: QuantizationJobSpec,
    config: OperatorConfig,
    size: ModelSize,
    shapes: list[sizing.NodeShape],
    job: str,
    tried: list[QuantizePlan],
) -> QuantizePlan | sizing.Refusal:
    correction = 1.0
    failed = [p for p in tried if p.estimate and p.outcome == Reason.OOM_KILLED]
    if failed:
        correction = sizing.correction_after_oom(failed[-1].estimate)  # type: ignore[arg-type]
    try:
        found = sizing.plan_quantize(
            size,
            inputs(spec),
            shapes,
            limits(config),
            correction=correction,
            tried=frozenset(_signature(p) for p in failed),
        )
    except sizing.SizeUnknownError as exc:
        return sizing.Refusal(Reason.INVALID_INPUT, str(exc))
    if isinstance(found, sizing.Refusal):
        return found
    basis = (
        f"{size.weight_bytes / 1e9:.2f} GB of {size.dtype} weights, {size.layers} layers, "
        f"{inputs(spec).algorithm} calibration of {spec.calibration.samples} x {spec.calibration.sequence_length} "
        f"tokens; {'; '.join(s.describe() for s in shapes)} can run it"
    )
    if failed:
        last = failed[-1]
        why = f"attempt {last.attempt} ran out of memory; estimates now x{correction:.2f}: {found.describe()}"
    else:
        why = f"{found.describe()}; from {basis}"
    return _from_candidate(found, job, len(tried) + 1, why)


def _manual_plan(spec: QuantizationJobSpec, job: str, tried: list[QuantizePlan]) -> QuantizePlan | sizing.Refusal:
    """spec.resources.gpus set by hand: the GPUs stay; after an OOM the batch shrinks, then
    calibration goes layer-wise."""
    attempt = len(tried) + 1
    base = dict(gpus_per_pod=spec.resources.gpus, pods=1, attempt=attempt, job_name=quantize_job_name(job, attempt))
    if spec.resources.min_gpu_memory:
        base["gpu_memory_mib"] = quantity_to_mib(spec.resources.min_gpu_memory)
    if not tried:
        return QuantizePlan(
            **base,
            batch_size=spec.calibration.batch_size,
            layerwise=spec.calibration.layerwise,
            reason=f"spec.resources.gpus: {spec.resources.gpus} (set by hand)",
        )
    last = tried[-1]
    smaller = [b for b in MANUAL_BATCHES if b < (last.batch_size or MANUAL_BATCHES[0] + 1)]
    if last.batch_size != 1 and smaller:
        batch, layerwise = (last.batch_size // 2 if last.batch_size > 1 else smaller[0]), last.layerwise
        change = f"calibration batch {last.batch_size or 'probed'} -> {batch}"
    elif not last.layerwise:
        batch, layerwise, change = last.batch_size, True, "layer-wise calibration"
    else:
        return sizing.Refusal(
            Reason.OOM_KILLED,
            f"attempt {last.attempt} ran out of memory with batch {last.batch_size} and layer-wise calibration on "
            f"{spec.resources.gpus} GPU(s), the smallest plan with that many GPUs: raise spec.resources.gpus or set "
            "it to 0 (auto) so the operator may add GPUs and pods",
        )
    return QuantizePlan(
        **base,
        batch_size=batch,
        layerwise=layerwise,
        reason=f"attempt {last.attempt} ran out of memory; next: {change} (GPUs fixed by spec.resources.gpus)",
    )


def _reported_size(pods: list[dict[str, Any]]) -> ModelSize | None:
    for pod in pods:
        result = runner_result(pod)
        if result and result.outcome == "Succeeded" and result.model_size:
            return result.model_size
    return None


def advance(
    spec: QuantizationJobSpec,
    config: OperatorConfig,
    namespace: str,
    job: str,
    status: Mapping[str, Any],
    jobs: Mapping[str, Mapping[str, Any]],
    pods: Mapping[str, list[dict[str, Any]]],
    shapes: list[sizing.NodeShape],
) -> Sizing:
    """``jobs``/``pods``: Jobs by name and pods by stage. Returns the plans after this reconcile."""
    plans = [QuantizePlan.model_validate(p) for p in status.get("plans") or []]
    size = ModelSize.model_validate(status["modelSize"]) if status.get("modelSize") else None
    auto = spec.resources.gpus == 0
    pre = model_stage(spec, config, namespace)
    if auto and pre == INSPECT_STAGE and spec.model.s3:
        return Sizing(
            refusal=(
                Reason.INVALID_CONFIG,
                "automatic sizing reads an S3 model's size in the fetch stage, and this job has no model cache: "
                "set spec.model.cacheClaimName (or the operator's modelCache.claimName), or spec.resources.gpus "
                "to a number",
            )
        )
    done = pre is not None and _condition(jobs.get(child_name(job, pre)), "Complete")
    if size is None and done:
        size = _reported_size(pods.get(pre, []))
    if auto and size is None:
        if not done:
            return Sizing()  # the model stage runs first
        return Sizing(
            refusal=(
                Reason.INVALID_INPUT,
                f"the {pre} stage finished without reporting the model's size (no safetensors weights?): "
                "set spec.resources.gpus to a number",
            )
        )
    if not plans:
        first = _auto_plan(spec, config, size, shapes, job, []) if auto else _manual_plan(spec, job, [])
        if isinstance(first, sizing.Refusal):
            return Sizing(model_size=size, refusal=(first.reason, first.message))
        return Sizing([first], size)

    current = plans[-1]
    if current.outcome is not None:
        return Sizing(plans, size)
    attempt_job = jobs.get(current.job_name)
    if _condition(attempt_job, "Complete"):
        plans[-1] = current.model_copy(update={"outcome": "Succeeded"})
        return Sizing(plans, size)
    if not _condition(attempt_job, "Failed"):
        return Sizing(plans, size)
    failed = [
        p
        for p in pods_of_job(pods.get(QUANTIZE_STAGE, []), current.job_name)
        if (p.get("status") or {}).get("phase") == "Failed"
    ]
    newest = max(failed, key=lambda p: p["metadata"].get("creationTimestamp") or "", default=None)
    reason = classify_failed_pod(newest)[0] if newest else Reason.RUNNER_FAILED
    plans[-1] = current = current.model_copy(update={"outcome": reason})
    attempts_left = len(plans) <= spec.run_policy.backoff_limit
    if reason == Reason.OOM_KILLED and attempts_left:
        bigger = _auto_plan(spec, config, size, shapes, job, plans) if auto else _manual_plan(spec, job, plans)
        if isinstance(bigger, sizing.Refusal):
            plans[-1] = current.model_copy(update={"outcome": f"{reason}: no bigger plan: {bigger.message}"})
            return Sizing(plans, size)
        return Sizing([*plans, bigger], size)
    if current.pods > 1 and reason not in NON_RETRYABLE_REASONS and attempts_left:
        # A gang fails as a whole (any rank's failure fails its Job): retry all of it.
        nxt = len(plans) + 1
        again = current.model_copy(
            update={
                "attempt": nxt,
                "job_name": quantize_job_name(job, nxt),
                "outcome": None,
                "reason": f"attempt {current.attempt} failed ({reason}); the whole stage runs again with the same plan",
            }
        )
        return Sizing([*plans, again], size)
    return Sizing(plans, size)


def observe_attempts(
    body: dict[str, Any],
    spec: QuantizationJobSpec,
    config: OperatorConfig,
    stage_jobs: Mapping[str, list[dict[str, Any]]],
    stage_pods: Mapping[str, list[dict[str, Any]]],
    nodes: NodeFit,
    now: datetime,
    reuse: ReuseState | None = None,
) -> tuple[list[Stage], Observed, Sizing]:
    """``stage_jobs``/``stage_pods``: every Job and pod of each stage (a re-planned quantize stage
    has one Job per attempt). Returns the stages with the current plan, what ``decide`` sees of
    them (the current attempt's Job and pods only) and the plans to record. ``reuse``: whether a
    reuse stage comes first (a job that reused has no quantize stage, so no plan)."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    unplanned = plan_stages(spec, config, reuse=reuse, namespace=namespace)
    jobs = {j["metadata"]["name"]: j for s in unplanned for j in stage_jobs.get(s.name, [])}
    quantize = next((s for s in unplanned if s.name == QUANTIZE_STAGE), None)
    found = Sizing()
    if quantize is not None:
        shapes = node_shapes(nodes.nodes, quantize.requirement, config) if spec.resources.gpus == 0 else []
        found = advance(spec, config, namespace, name, body.get("status") or {}, jobs, stage_pods, shapes)
    planned = found.current is not None or found.model_size is not None
    stages = (
        plan_stages(spec, config, found.current, found.model_size, reuse, namespace=namespace) if planned else unplanned
    )
    obs = observe(
        body,
        stages,
        {s.name: jobs.get(s.job_name(name)) for s in stages},
        {s.name: pods_of_job(stage_pods.get(s.name, []), s.job_name(name)) for s in stages},
        nodes,
        now,
        refusal=found.refusal,
    )
    return stages, obs, found

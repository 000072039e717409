"""Pure functions from observed state (stage Jobs, their Pods, nodes, runner reports) to the
QuantizationJob's status and the actions that move it forward.

``observe()`` turns what the in-memory indexes hold into an ``Observed``; ``decide()`` is the
whole reconcile decision on it; the reconciler carries out what it returns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError
from qjob_api.reasons import EXIT_CODE_REASONS, Reason
from qjob_api.runner import ExitCode, RunnerResult
from qjob_api.v1alpha1 import (
    STAGE_PODS_LISTED,
    TERMINAL_PHASES,
    Artifact,
    Phase,
    Progress,
    Quality,
    QuantizationJobSpec,
    RunnerReport,
    StageStatus,
)

from .builders import RUNNER_CONTAINER
from .config import OperatorConfig
from .fetch import FETCH_STAGE
from .nodes import NodeFit
from .plan import GPU_LESS_STAGES, QUANTIZE_STAGE, REUSE_STAGE, Stage

_IMAGE_PULL_WAITING = {"ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
# The kubelet cannot build the container: a missing Secret/ConfigMap (or key) it must resolve.
_CONFIG_WAITING = {"CreateContainerConfigError", "CreateContainerError"}


@dataclass
class Observed:
    """Everything ``decide`` looks at (built by ``observe``)."""

    body: dict[str, Any]
    stage_jobs: dict[str, dict[str, Any]]  # stage name -> its batch/v1 Job
    stage_pods: dict[str, list[dict[str, Any]]]  # stage name -> pods of that Job
    node_matches: dict[str, list[str]]  # stage name -> nodes that could ever run it
    node_products: dict[str, str]  # node name -> nvidia.com/gpu.product
    node_architectures: dict[str, str]  # node name -> architecture (the configured mapping)
    now: datetime
    refusal: tuple[Reason, str] | None = None  # (reason, message): the quantize stage cannot be planned


def observe(
    body: dict[str, Any],
    stages: list[Stage],
    stage_jobs: Mapping[str, dict[str, Any]],
    stage_pods: Mapping[str, list[dict[str, Any]]],
    nodes: NodeFit,
    now: datetime,
    refusal: tuple[Reason, str] | None = None,
) -> Observed:
    """What ``decide`` needs from the objects a QuantizationJob owns and the cluster's nodes
    (``nodes`` refreshed: its facts and fit results are computed once per node-index change);
    ``refusal``: why the quantize stage cannot be planned (``attempts.advance``), if it cannot."""
    return Observed(
        body=body,
        stage_jobs={s.name: stage_jobs[s.name] for s in stages if stage_jobs.get(s.name)},
        stage_pods={s.name: list(stage_pods.get(s.name, [])) for s in stages},
        node_matches={s.name: nodes.matching(s.requirement) for s in stages},
        node_products=nodes.products,
        node_architectures=nodes.architectures,
        now=now,
        refusal=refusal,
    )


@dataclass
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class Decision:
    status: dict[str, Any] | None = None  # merge patch for .status (None: nothing to write)
    create: list[Stage] = field(default_factory=list)
    delete_stage_jobs: list[str] = field(default_factory=list)  # batch Job names
    suspend_stage_jobs: dict[str, bool] = field(default_factory=dict)  # batch Job name -> spec.suspend to set
    delete_self: bool = False  # the QuantizationJob itself (TTL after finishing)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None


# ------------------------------------------------------------------------------------ helpers


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def fmt_time(value: datetime | None) -> str | None:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def _job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def _runner_status(pod: dict[str, Any]) -> dict[str, Any]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == RUNNER_CONTAINER:
            return cs
    return {}


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    return (_runner_status(pod).get("state") or {}).get("terminated")


def runner_result(pod: dict[str, Any]) -> RunnerResult | None:
    """The runner's termination message, when it is the JSON summary the runner writes."""
    message = (_terminated(pod) or {}).get("message")
    if not message:
        return None
    try:
        return RunnerResult.model_validate(json.loads(message))
    except (ValueError, ValidationError):
        return None


def classify_failed_pod(pod: dict[str, Any]) -> tuple[str, str]:
    """Stable reason and message for a failed runner pod."""
    status = pod.get("status") or {}
    if status.get("reason") == "Evicted":
        return Reason.EVICTED, status.get("message") or "the pod was evicted from its node"
    terminated = _terminated(pod) or {}
    code = terminated.get("exitCode")
    result = runner_result(pod)
    detail = (result.message if result and result.message else None) or (terminated.get("message") or "").strip()
    if terminated.get("reason") == "OOMKilled" or code == ExitCode.OUT_OF_MEMORY:
        return Reason.OOM_KILLED, (
            f"the runner ran out of memory{': ' + detail if detail else ''}; raise spec.resources.memory, "
            "add GPUs (spec.resources.gpus, or 0 to let the operator size and re-plan), or lower "
            "spec.calibration.batchSize / sequenceLength"
        )
    if code in EXIT_CODE_REASONS and code != ExitCode.TRANSIENT:
        return EXIT_CODE_REASONS[code], detail or f"runner exited with code {code}"
    if code is not None:
        return Reason.RUNNER_FAILED, detail or f"runner exited with code {code}"
    return Reason.RUNNER_FAILED, status.get("message") or "the runner pod failed"


def _pending_reason(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """Why the newest pod is not running yet, if it says."""
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True):
        waiting = (_runner_status(pod).get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _IMAGE_PULL_WAITING | {"ErrImagePull"}:
            image = pod["spec"]["containers"][0].get("image")
            return (
                Reason.IMAGE_PULL_ERROR,
                f"cannot pull runner image {image}: {waiting.get('message') or waiting['reason']}",
            )
        if waiting.get("reason") in _CONFIG_WAITING:
            return (
                Reason.CONTAINER_CONFIG_ERROR,
                f"the runner container cannot be created: {waiting.get('message') or waiting['reason']} "
                "(create the Secret or ConfigMap named in spec.model.huggingFace.tokenSecretRef or "
                "spec.calibration.dataset.configMap, or fix the reference)",
            )
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return Reason.UNSCHEDULABLE, cond.get("message") or "no node can take the pod now"
        return None
    return None


def _running(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((p for p in pods if (p.get("status") or {}).get("phase") == "Running"), None)


def _latest(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    placed = [p for p in pods if p.get("spec", {}).get("nodeName")]
    return max(placed, key=lambda p: p["metadata"].get("creationTimestamp") or "", default=None)


# ------------------------------------------------------------------------------- stage records


def observe_stage(stage: Stage, obs: Observed, deadline: timedelta) -> StageStatus:
    """The record of one stage, with the reason it waits or failed."""
    ref_name = obs.body["metadata"]["name"]
    job = obs.stage_jobs.get(stage.name)
    pods = obs.stage_pods.get(stage.name, [])
    record = StageStatus(
        name=stage.name,
        architecture=stage.architecture.value if stage.architecture else None,
        job_name=stage.job_name(ref_name) if job else None,
    )
    if job is None:
        return record
    js = job.get("status") or {}
    record.attempts = len(pods) or (js.get("failed", 0) + js.get("succeeded", 0) + js.get("active", 0))
    newest = sorted(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))
    record.pods = [p["metadata"]["name"] for p in reversed(newest)][:STAGE_PODS_LISTED]
    if latest := _latest(pods):
        record.node = latest["spec"]["nodeName"]
        record.gpu_product = obs.node_products.get(record.node)
    starts = [parse_time((p.get("status") or {}).get("startTime")) for p in pods]
    record.start_time = min((s for s in starts if s), default=None)

    if cond := _job_condition(job, "Complete"):
        record.phase, record.reason = Phase.SUCCEEDED, Reason.SUCCEEDED
        record.completion_time = parse_time(js.get("completionTime") or cond.get("lastTransitionTime"))
        return record
    if cond := _job_condition(job, "Failed"):
        record.phase = Phase.FAILED
        record.completion_time = parse_time(cond.get("lastTransitionTime"))
        if cond.get("reason") == "DeadlineExceeded":
            record.reason = Reason.DEADLINE_EXCEEDED
            record.message = (
                f"the stage ran longer than spec.runPolicy.activeDeadlineSeconds: {cond.get('message', '')}".strip()
            )
        else:
            failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
            newest = max(failed, key=lambda p: p["metadata"].get("creationTimestamp") or "", default=None)
            record.reason, record.message = (
                classify_failed_pod(newest)
                if newest
                else (Reason.RUNNER_FAILED, cond.get("message") or "the stage failed")
            )
        return record
    if (job.get("spec") or {}).get("suspend"):
        record.reason, record.message = Reason.SUSPENDED, "the stage's Job is suspended"
        return record
    if _running(pods):
        record.phase, record.reason = Phase.RUNNING, Reason.RUNNING
        return record
    # Not running yet: fail fast on a bad image, and after the pending deadline on no capacity.
    created = parse_time(job["metadata"].get("creationTimestamp")) or obs.now
    overdue = obs.now - created > deadline
    waited = f"pending longer than spec.runPolicy.pendingDeadlineSeconds ({int(deadline.total_seconds())}s)"
    if why := _pending_reason(pods):
        record.reason, record.message = why
        # A pod stuck before its container starts has a startTime but never ran.
        never_ran = record.start_time is None or why[0] == Reason.CONTAINER_CONFIG_ERROR
        if why[0] == Reason.IMAGE_PULL_ERROR or (never_ran and overdue):
            record.phase = Phase.FAILED
            record.completion_time = obs.now
            if why[0] != Reason.IMAGE_PULL_ERROR:
                record.message = f"{waited}: {why[1]}"
    elif not pods and overdue:
        # The Job controller could not create a pod (admission refused it: a missing PriorityClass,
        # a ResourceQuota, a policy webhook); the reason is in the Job's FailedCreate events.
        record.phase, record.reason = Phase.FAILED, Reason.PODS_NOT_CREATED
        record.completion_time = obs.now
        record.message = (
            f"{waited}: the Job controller created no pod; `kubectl describe job {record.job_name}` shows why "
            "(e.g. a missing spec.scheduling.priorityClassName, a ResourceQuota or an admission policy)"
        )
    return record


# ------------------------------------------------------------------------------------ progress


def _weights(stages: list[Stage]) -> dict[str, float]:
    names = [s.name for s in stages]
    # A job that reused has no quantize stage: the reuse stage stands in for it.
    main = QUANTIZE_STAGE if QUANTIZE_STAGE in names else REUSE_STAGE
    builds = [s for s in stages if s.name not in (QUANTIZE_STAGE, *GPU_LESS_STAGES)]
    weights = {main: 0.6, **{s.name: 0.4 / len(builds) for s in builds}} if builds else {main: 1.0}
    # A download of a large model takes a while; reading its headers or checking a reuse does not.
    for first in (name for name in reversed(names) if name in GPU_LESS_STAGES and name != main):
        share = 0.2 if first == FETCH_STAGE else 0.02
        weights = {first: share, **{name: (1 - share) * w for name, w in weights.items()}}
    return weights


def progress(stages: list[Stage], records: dict[str, StageStatus], reports: dict[str, RunnerReport]) -> Progress:
    weights = _weights(stages)
    percent, current, eta, message = 0.0, None, None, None
    for stage in stages:
        record, report = records[stage.name], reports.get(stage.name)
        if record.phase == Phase.SUCCEEDED:
            percent += 100 * weights[stage.name]
        elif record.phase == Phase.RUNNING:
            percent += (report.percent if report else 0) * weights[stage.name]
            if current is None:
                current = f"{stage.name}/{report.step}" if report and report.step else stage.name
                message = report.message if report else None
            if report and report.eta_seconds is not None:
                eta = max(eta or 0, report.eta_seconds)
    return Progress(stage=current, percent=min(100, int(percent)), eta_seconds=eta, message=message)


def _collect(stages: list[Stage], obs: Observed) -> tuple[list[Artifact], Quality | None]:
    """Artifacts and quality from the termination messages of succeeded runner pods: written by
    the runner when it exits 0, read by the kubelet, so only a finished pod of ours can claim
    them (a progress report cannot)."""
    artifacts: dict[str, Artifact] = {}
    quality = None
    # What earlier reconciles recorded stays: a finished stage's Job and pods may be gone (TTL).
    old = obs.body.get("status") or {}
    for artifact in old.get("artifacts") or []:
        artifacts.setdefault(artifact["uri"], Artifact.model_validate(artifact))
    if old.get("quality"):
        quality = Quality.model_validate(old["quality"])
    for stage in stages:
        job_uid = ((obs.stage_jobs.get(stage.name) or {}).get("metadata") or {}).get("uid")
        for pod in obs.stage_pods.get(stage.name, []):
            owner = next((r for r in pod["metadata"].get("ownerReferences") or [] if r.get("controller")), {})
            if not job_uid or owner.get("uid") != job_uid or (pod.get("status") or {}).get("phase") != "Succeeded":
                continue
            if (result := runner_result(pod)) and result.outcome == "Succeeded":
                for artifact in result.artifacts:
                    artifacts.setdefault(artifact.uri, artifact)
                quality = quality or result.quality
    return list(artifacts.values()), quality


# ---------------------------------------------------------------------------------- conditions


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[dict[str, Any]]:
    """metav1.Condition semantics: lastTransitionTime changes only when status changes."""
    old = next((c for c in conditions if c["type"] == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status else fmt_time(now)
    new = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }
    return [c for c in conditions if c["type"] != type_] + [new]


@dataclass
class _Draft:
    """The status ``decide`` is writing, with the time and generation its conditions carry."""

    now: datetime
    generation: int | None
    conditions: list[dict[str, Any]]
    status: dict[str, Any]
    decision: Decision = field(default_factory=Decision)

    def condition(self, type_: str, status: str, reason: str, message: str) -> None:
        self.conditions = set_condition(self.conditions, type_, status, reason, message, self.now, self.generation)

    def write(self, phase: str, reason: str, message: str, **extra: Any) -> Decision:
        self.status.update(phase=phase, reason=reason, message=message, conditions=self.conditions, **extra)
        self.decision.status = self.status
        return self.decision


# Condition helpers, one per condition type (in the style of Kubeflow Trainer's
# setSuspendedCondition, pkg/controller/trainjob_controller.go): each states when its condition
# is True or False and with which reason.


def set_accepted_condition(
    draft: _Draft, stages: list[Stage], problems: list[str], reason: Reason = Reason.POLICY_VIOLATION
) -> None:
    if problems:
        draft.condition("Accepted", "False", reason, "; ".join(problems))
    else:
        draft.condition(
            "Accepted", "True", Reason.ACCEPTED, f"{len(stages)} stage(s): {', '.join(s.name for s in stages)}"
        )


def set_nodes_available_condition(draft: _Draft, unplaceable: str | None, counts: str) -> None:
    if unplaceable:
        draft.condition("NodesAvailable", "False", Reason.NO_MATCHING_NODES, unplaceable)
    elif counts:  # nothing to say once every stage has its Job
        draft.condition("NodesAvailable", "True", Reason.NODES_AVAILABLE, f"nodes that fit: {counts}")


def set_quality_gate_condition(draft: _Draft, quality: Quality) -> None:
    if quality.gate_passed is None:
        return
    draft.condition(
        "QualityGate",
        "True" if quality.gate_passed else "False",
        Reason.QUALITY_GATE_PASSED if quality.gate_passed else Reason.QUALITY_GATE_FAILED,
        f"{quality.metric}: baseline {quality.baseline}, quantized {quality.quantized}",
    )


def set_finished_conditions(draft: _Draft, phase: str, reason: str, message: str) -> None:
    if phase == Phase.FAILED:
        draft.condition("Failed", "True", reason, message)
        draft.condition("Complete", "False", reason, message)
    else:
        draft.condition("Complete", "True", reason, message)
    draft.condition("Running", "False", reason, message)


def set_running_condition(draft: _Draft, phase: str, reason: str, message: str) -> None:
    if phase == Phase.RUNNING:
        draft.condition("Running", "True", Reason.RUNNING, message)
    else:
        draft.condition("Running", "False", reason, message)


# ---------------------------------------------------------------------------------------- decide


def policy_violations(spec: QuantizationJobSpec, config: OperatorConfig) -> list[str]:
    problems = []
    if spec.model.trust_remote_code and not config.policy.allow_trust_remote_code:
        problems.append(
            "spec.model.trustRemoteCode is true but this cluster's operator policy refuses remote "
            "code: set it to false, or ask the platform team to set policy.allowTrustRemoteCode"
        )
    if spec.resources.gpus > config.policy.max_gpus_per_pod:
        problems.append(
            f"spec.resources.gpus is {spec.resources.gpus} but the policy allows at most "
            f"{config.policy.max_gpus_per_pod} GPUs per pod: lower it"
        )
    claims = config.policy.allowed_output_claims
    if claims and spec.output.pvc and spec.output.pvc.claim_name not in claims:
        problems.append(
            f"spec.output.pvc.claimName {spec.output.pvc.claim_name!r} is not an allowed output "
            f"claim; use one of: {', '.join(claims)}"
        )
    buckets = config.policy.allowed_output_buckets
    if buckets and spec.output.s3 and spec.output.s3.bucket not in buckets:
        problems.append(
            f"spec.output.s3.bucket {spec.output.s3.bucket!r} is not an allowed output bucket; use one of: "
            f"{', '.join(buckets)}"
        )
    return problems + scheduling_violations(spec, config)


def scheduling_violations(spec: QuantizationJobSpec, config: OperatorConfig) -> list[str]:
    """What a job author set on runner pods that the platform team's policy does not allow."""
    policy, scheduling, problems = config.policy, spec.scheduling, []
    priority = scheduling.priority_class_name
    if priority and (
        priority not in policy.allowed_priority_classes
        if policy.allowed_priority_classes
        else priority.startswith("system-")
    ):
        allowed = ", ".join(policy.allowed_priority_classes) or "any but system-*"
        problems.append(f"spec.scheduling.priorityClassName {priority!r} is not allowed by policy ({allowed})")
    for toleration in scheduling.tolerations:
        if not toleration.key and not policy.allow_tolerate_all:
            problems.append(
                "spec.scheduling.tolerations has a toleration without a key, which tolerates every taint: "
                "name the taint key (policy.allowTolerateAll is false)"
            )
        elif toleration.key and policy.allowed_toleration_keys and toleration.key not in policy.allowed_toleration_keys:
            problems.append(
                f"spec.scheduling.tolerations key {toleration.key!r} is not allowed by policy; use one of: "
                f"{', '.join(policy.allowed_toleration_keys)}"
            )
    keys = policy.allowed_node_selector_keys
    if keys and (bad := sorted(set(scheduling.node_selector) - set(keys))):
        problems.append(f"spec.scheduling.nodeSelector keys {bad} are not allowed by policy; use: {', '.join(keys)}")
    return problems


def decide(obs: Observed, spec: QuantizationJobSpec, stages: list[Stage], config: OperatorConfig) -> Decision:
    """The reconcile decision, in phases: a finished job only waits for its TTL; an unfinished
    one is admitted (policy) and placed (a node can run each stage), then its stage records say
    which Jobs to create, and the phase follows from them."""
    old = obs.body.get("status") or {}
    if old.get("phase") in TERMINAL_PHASES:
        return decide_ttl(obs, spec)
    draft = _Draft(
        now=obs.now,
        generation=obs.body["metadata"].get("generation"),
        conditions=list(old.get("conditions") or []),
        status={
            "observedGeneration": obs.body["metadata"].get("generation"),
            "targetArchitectures": ",".join(a.value for a in spec.target_architectures()) or "none",
        },
    )
    if obs.refusal and QUANTIZE_STAGE not in obs.stage_jobs:
        reason, message = obs.refusal
        set_accepted_condition(draft, stages, [message], reason)
        return finish(draft, Phase.FAILED, reason, message, obs)
    # The CRD refuses unservable specs at apply; the operator checks again for objects an older CRD let in.
    for reason, problems in (
        (Reason.POLICY_VIOLATION, policy_violations(spec, config)),
        (Reason.INVALID_SPEC, spec.serving_problems()),
    ):
        if problems:
            set_accepted_condition(draft, stages, problems, reason)
            return finish(draft, Phase.FAILED, reason, "; ".join(problems), obs)
    set_accepted_condition(draft, stages, [])
    if placement := decide_placement(draft, obs, spec, stages, config):
        return placement
    records = decide_stage_records(draft, obs, spec, stages)
    return decide_phase(draft, obs, spec, records, config)


def decide_ttl(obs: Observed, spec: QuantizationJobSpec) -> Decision:
    """A finished job: delete it once spec.runPolicy.ttlSecondsAfterFinished has passed. A failed
    one also stops what still runs (the reconcile that failed it may have stopped short)."""
    decision = Decision()
    if (obs.body.get("status") or {}).get("phase") == Phase.FAILED:
        decision.delete_stage_jobs = _unfinished_jobs(obs)
    ttl = spec.run_policy.ttl_seconds_after_finished
    done = parse_time((obs.body.get("status") or {}).get("completionTime"))
    if ttl is not None and done:
        left = (done + timedelta(seconds=ttl) - obs.now).total_seconds()
        decision.delete_self = left <= 0
        decision.requeue_after = None if left <= 0 else left
    return decision


def _unfinished_jobs(obs: Observed) -> list[str]:
    return [
        job["metadata"]["name"]
        for job in obs.stage_jobs.values()
        if not _job_condition(job, "Complete") and not _job_condition(job, "Failed")
    ]


def finish(draft: _Draft, phase: str, reason: str, message: str, obs: Observed) -> Decision:
    if phase == Phase.FAILED:
        # A failed job stops everything it started (a failed stage's Job may still be active).
        draft.decision.delete_stage_jobs = _unfinished_jobs(obs)
    set_finished_conditions(draft, phase, reason, message)
    return draft.write(phase, reason, message, completionTime=fmt_time(draft.now))


def finished_stages(obs: Observed) -> dict[str, dict[str, Any]]:
    """Stages the status records as Succeeded: done even when their Job is gone (TTL, by hand)."""
    old = obs.body.get("status") or {}
    return {r["name"]: r for r in old.get("stages") or [] if r.get("phase") == Phase.SUCCEEDED}


def decide_placement(
    draft: _Draft, obs: Observed, spec: QuantizationJobSpec, stages: list[Stage], config: OperatorConfig
) -> Decision | None:
    """Fail fast when some stage can never be placed, before creating anything; None: all fit."""
    policy = spec.run_policy
    done = set(obs.stage_jobs) | set(finished_stages(obs))
    unplaceable = [s for s in stages if s.name not in done and not obs.node_matches.get(s.name)]
    message = "; ".join(
        f"no node can run stage {s.name}: it needs {s.requirement.describe(config)}" for s in unplaceable
    )
    counts = ", ".join(f"{s.name}: {len(obs.node_matches.get(s.name, []))}" for s in stages if s.name not in done)
    set_nodes_available_condition(draft, message, counts)
    if not unplaceable:
        return None
    created = parse_time(obs.body["metadata"].get("creationTimestamp")) or obs.now
    waited = (obs.now - created).total_seconds()
    if waited >= policy.pending_deadline_seconds:
        return finish(
            draft,
            Phase.FAILED,
            Reason.NO_MATCHING_NODES,
            f"{message} (waited {int(waited)}s, spec.runPolicy.pendingDeadlineSeconds)",
            obs,
        )
    draft.decision.requeue_after = policy.pending_deadline_seconds - waited + 0.5
    return draft.write(Phase.PENDING, Reason.NO_MATCHING_NODES, message)


def decide_stage_records(
    draft: _Draft, obs: Observed, spec: QuantizationJobSpec, stages: list[Stage]
) -> dict[str, StageStatus]:
    """One record per stage; a stage without a Job whose dependencies succeeded is to be created.
    Writes the stage records, progress, artifacts, quality and start time into the draft."""
    old = obs.body.get("status") or {}
    reports = {k: RunnerReport.model_validate(v) for k, v in (old.get("runnerReports") or {}).items()}
    deadline = timedelta(seconds=spec.run_policy.pending_deadline_seconds)
    records = {s.name: observe_stage(s, obs, deadline) for s in stages}
    remember_history(records, old)
    finished = finished_stages(obs)
    for stage in stages:
        record = records[stage.name]
        if stage.name in obs.stage_jobs:
            continue
        if stage.name in finished:  # never redo finished work
            records[stage.name] = StageStatus.model_validate(finished[stage.name])
            continue
        if all(records[d].phase == Phase.SUCCEEDED for d in stage.after):
            draft.decision.create.append(stage)
            record.reason, record.message = Reason.PENDING, "its Job is being created"
        else:
            record.reason = Reason.WAITING
            record.message = f"waits for {', '.join(stage.after)}"
    status = draft.status
    status["stages"] = [r.to_api() for r in records.values()]
    status["progress"] = progress(stages, records, reports).to_api()
    artifacts, quality = _collect(stages, obs)
    status["artifacts"] = [a.to_api() for a in artifacts]
    if quality:
        status["quality"] = quality.to_api()
        set_quality_gate_condition(draft, quality)
    starts = [r.start_time for r in records.values() if r.start_time]
    if old.get("startTime"):
        starts.append(parse_time(old["startTime"]))
    status["startTime"] = fmt_time(min(starts)) if starts else None
    return records


def remember_history(records: dict[str, StageStatus], old: Mapping[str, Any]) -> None:
    """A stage's first start and its attempts are history: the pods they came from may be gone
    (a node deleted, pods garbage-collected), the status keeps them. An attempt is a pod the
    last status write did not list (only the newest are listed: an older pod never shows up as new)."""
    for before in old.get("stages") or []:
        record = records.get(before.get("name"))
        if record is None:
            continue
        started = parse_time(before.get("startTime"))
        if started and (record.start_time is None or started < record.start_time):
            record.start_time = started
        attempts = int(before.get("attempts") or 0)
        if "pods" in before:  # written by an operator that lists them
            attempts += len(set(record.pods) - set(before["pods"]))
        record.attempts = max(record.attempts, attempts)


def unproven_success(
    spec: QuantizationJobSpec, artifacts: list[Artifact], quality: Quality | None
) -> tuple[str, str] | None:
    """Every runner exited 0, but did the work happen? (A broken image or entrypoint exits 0 too.)"""
    if not artifacts:
        return Reason.NO_ARTIFACTS, (
            "every stage exited 0 but no runner reported an artifact: the runner image or its command is "
            "not the qjob jobrunner (check the operator's runner.image)"
        )
    gate = spec.evaluation.gate
    gated = gate is not None and (gate.max_perplexity_increase is not None or gate.min_cosine_similarity is not None)
    if spec.evaluation.enabled and gated and (quality is None or quality.gate_passed is None):
        return Reason.QUALITY_NOT_MEASURED, (
            "spec.evaluation.gate is set but no runner reported a gated quality measurement: the job "
            "cannot be called good; check the runner image, or remove the gate"
        )
    if quality is not None and quality.gate_passed is False:
        return Reason.QUALITY_GATE_FAILED, f"{quality.metric} is outside spec.evaluation.gate"
    return None


def decide_phase(
    draft: _Draft, obs: Observed, spec: QuantizationJobSpec, records: dict[str, StageStatus], config: OperatorConfig
) -> Decision:
    """The job's phase from its stage records; which stage Jobs to stop, suspend or resume."""
    policy, decision = spec.run_policy, draft.decision
    failed = [r for r in records.values() if r.phase == Phase.FAILED]
    if failed:
        first = failed[0]
        return finish(
            draft,
            Phase.FAILED,
            first.reason or Reason.RUNNER_FAILED,
            f"stage {first.name}: {first.message or first.reason}",
            obs,
        )
    if all(r.phase == Phase.SUCCEEDED for r in records.values()):
        artifacts = [Artifact.model_validate(a) for a in draft.status["artifacts"]]
        quality = Quality.model_validate(draft.status["quality"]) if draft.status.get("quality") else None
        if problem := unproven_success(spec, artifacts, quality):
            return finish(draft, Phase.FAILED, *problem, obs)
        return finish(
            draft,
            Phase.SUCCEEDED,
            Reason.SUCCEEDED,
            f"{len(artifacts)} artifact(s) written; {len(records)} stage(s) succeeded",
            obs,
        )

    if not spec.scheduling.queue_name:  # with Kueue, Kueue owns Job.spec.suspend
        decision.suspend_stage_jobs = {
            records[s].job_name: policy.suspend
            for s, job in obs.stage_jobs.items()
            if bool((job.get("spec") or {}).get("suspend")) != policy.suspend
            and records[s].phase not in TERMINAL_PHASES
        }
    running = [r for r in records.values() if r.phase == Phase.RUNNING]
    # Pending too: a Job whose pods admission refuses has none to send events (PodsNotCreated).
    stuck = (Reason.UNSCHEDULABLE, Reason.IMAGE_PULL_ERROR, Reason.CONTAINER_CONFIG_ERROR, Reason.PENDING)
    waiting = next((r for r in records.values() if r.reason in stuck), None)
    if waiting:
        decision.requeue_after = config.resync_seconds  # re-check the pending deadline
    if policy.suspend and not running:
        phase, reason, message = Phase.SUSPENDED, Reason.SUSPENDED, "spec.runPolicy.suspend is true"
        decision.create = []
    elif running or draft.status["startTime"]:
        # Once work has started the job stays Running between stages; the reason says if a
        # stage is stuck waiting for a node or an image.
        phase = Phase.RUNNING
        reason, message = (
            (waiting.reason, f"stage {waiting.name}: {waiting.message}")
            if waiting
            else (
                Reason.RUNNING,
                f"running {', '.join(r.name for r in running)}" if running else "starting the next stage",
            )
        )
    else:
        phase = Phase.PENDING
        reason, message = (
            (waiting.reason, f"stage {waiting.name}: {waiting.message}")
            if waiting
            else (Reason.PENDING, "waiting for runner pods to start")
        )
    set_running_condition(draft, phase, reason, message)
    return draft.write(phase, reason, message)


_WARNING_REASONS = {
    Reason.NO_MATCHING_NODES,
    Reason.UNSCHEDULABLE,
    Reason.IMAGE_PULL_ERROR,
    Reason.CONTAINER_CONFIG_ERROR,
    Reason.RECONCILE_FAILED,
}


def transition_events(old: dict[str, Any], new: dict[str, Any]) -> list[Event]:
    """Kubernetes Events only for what status alone does not tell a user watching Events: the
    job finished (Succeeded, or Failed with its reason) or got stuck (a Warning reason). Stage
    starts and ends are in status.stages; an Event each would double the job's API writes."""
    phase, reason = new.get("phase"), new.get("reason")
    if not phase or (phase, reason) == (old.get("phase"), old.get("reason")):
        return []
    if phase == Phase.FAILED or reason in _WARNING_REASONS:
        return [Event("Warning", reason or phase, new.get("message") or phase)]
    if phase == Phase.SUCCEEDED:
        return [Event("Normal", Reason.SUCCEEDED, new.get("message") or phase)]
    return []

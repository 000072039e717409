"""Stable reasons: the one table of words the operator writes to conditions, ``status.reason``
and Events, and the runner writes to its result. Users and automation match on them."""

from __future__ import annotations

from enum import StrEnum

from .runner import ExitCode


class Reason(StrEnum):
    ACCEPTED = "Accepted"
    NO_MATCHING_NODES = "NoMatchingNodes"
    NODES_AVAILABLE = "NodesAvailable"
    POLICY_VIOLATION = "PolicyViolation"
    INVALID_SPEC = "InvalidSpec"
    WAITING = "WaitingForDependencies"
    SUSPENDED = "Suspended"
    PENDING = "Pending"
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_ERROR = "ImagePullError"
    RUNNING = "Running"
    OOM_KILLED = "OOMKilled"
    RENDEZVOUS_FAILED = "RendezvousFailed"
    EVICTED = "Evicted"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    RUNNER_FAILED = "RunnerFailed"
    INVALID_CONFIG = "InvalidConfig"
    INVALID_INPUT = "InvalidInput"
    SUCCEEDED = "Succeeded"
    QUALITY_GATE_PASSED = "QualityGatePassed"
    QUALITY_GATE_FAILED = "QualityGateFailed"
    NO_ARTIFACTS = "NoArtifacts"
    QUALITY_NOT_MEASURED = "QualityNotMeasured"
    CONTAINER_CONFIG_ERROR = "ContainerConfigError"
    PODS_NOT_CREATED = "PodsNotCreated"
    PRIORITY_CLASS_NOT_FOUND = "PriorityClassNotFound"
    OUTPUT_PATH_CONFLICT = "OutputPathConflict"
    OBJECT_CONFLICT = "ObjectConflict"
    JOB_REJECTED = "JobRejected"
    RECONCILE_FAILED = "ReconcileFailed"
    RECONCILED = "Reconciled"
    # The reuse check (spec.reuse): reused, or why the job runs normally after all.
    REUSED = "Reused"
    REUSE_INPUTS_CHANGED = "ReuseInputsChanged"  # the model revision, data or libraries differ
    REUSE_ARTIFACT_MISSING = "ReuseArtifactMissing"  # the earlier job's manifest or files are gone
    REUSE_ARTIFACT_CHANGED = "ReuseArtifactChanged"  # a file no longer matches its sha256
    # this job's inputs could not be resolved without its fetch stage (a source only the shared
    # model cache's fill Job may read, an unreachable Hub): the job runs, and fails there if it must
    REUSE_INPUTS_UNRESOLVED = "ReuseInputsUnresolved"


#: The reason for each runner exit code: the runner reports it, the operator reads it back from
#: the exit code when the runner could not say.
EXIT_CODE_REASONS: dict[ExitCode, Reason] = {
    ExitCode.INVALID_CONFIG: Reason.INVALID_CONFIG,
    ExitCode.INVALID_INPUT: Reason.INVALID_INPUT,
    ExitCode.QUALITY_GATE_FAILED: Reason.QUALITY_GATE_FAILED,
    ExitCode.TRANSIENT: Reason.RUNNER_FAILED,
    ExitCode.OUT_OF_MEMORY: Reason.OOM_KILLED,
    ExitCode.RENDEZVOUS_FAILED: Reason.RENDEZVOUS_FAILED,
}
